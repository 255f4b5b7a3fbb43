"""Bounded memory in the worker: its sets of recent call ids are bounded in number and age."""

from queue_worker.admission import RecentIds


def test_recent_ids_are_bounded_in_number_and_age() -> None:
    now = [0.0]
    ids = RecentIds(keep_s=10.0, max_ids=3, clock=lambda: now[0])
    for call_id in ("a", "b", "c", "d"):
        ids.add(call_id)
    assert "a" not in ids and all(call_id in ids for call_id in "bcd")
    assert len(ids) == 3
    now[0] = 5.0
    ids.add("b")  # seen again: kept from now on
    now[0] = 12.0
    assert "c" not in ids and "d" not in ids and "b" in ids
    assert len(ids) == 1
