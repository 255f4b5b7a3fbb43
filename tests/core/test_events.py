"""faas_gateway/core/events.py and core/feeds.py, by tables: names, versions, references,
the ids a fire derives, its wire form, NATS subjects, cron expressions and when alarms tick."""

from datetime import UTC, datetime

import pytest

from faas_gateway.core.events import (
    Fire,
    InvalidEntityError,
    MalformedFireError,
    entity_reference,
    fire_arguments,
    is_valid_entity_name,
    is_valid_subject,
    next_version,
    rule_call_id,
    subject_within,
    tick_fire_id,
    tick_message_id,
)
from faas_gateway.core.feeds import (
    ALARM,
    INTERVAL,
    ONCE,
    FeedError,
    Schedule,
    configure,
    parse_cron,
)


def ms(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp() * 1000)


@pytest.mark.parametrize(
    ("name", "valid"),
    [
        ("t1", True),
        ("_private", True),
        ("a.b-c_d", True),
        ("a" * 256, True),
        ("a" * 257, False),
        ("", False),
        (".a", False),
        ("a.", False),
        ("a..b", False),
        ("-a", False),
        ("has space", False),
        ("at@sign", False),
        ("a/b", False),
        ("ünï", False),
    ],
)
def test_entity_names(name: str, valid: bool) -> None:
    assert is_valid_entity_name(name) is valid


@pytest.mark.parametrize(
    ("before", "after"), [("0.0.1", "0.0.2"), ("1.2.9", "1.2.10"), ("junk", "0.0.1")]
)
def test_an_update_bumps_the_patch_number(before: str, after: str) -> None:
    assert next_version(before) == after


@pytest.mark.parametrize(
    ("reference", "expected"),
    [
        ("/_/t", (None, "t")),
        ("/guest/t", (None, "t")),
        ("/guest/pkg/a", ("pkg", "a")),
        ("t", (None, "t")),
        ("pkg/a", ("pkg", "a")),
    ],
)
def test_references_of_this_namespace(reference: str, expected: tuple[str | None, str]) -> None:
    assert entity_reference(reference, "guest", "trigger") == expected


@pytest.mark.parametrize("reference", ["/other/t", "/_/a/b/c", "a/b/c", "", "/_/", 3, None])
def test_references_that_name_nothing_here(reference: object) -> None:
    with pytest.raises(InvalidEntityError):
        entity_reference(reference, "guest", "trigger")


def test_the_payload_wins_over_the_headers_and_the_trigger_parameters() -> None:
    merged = fire_arguments(
        [{"key": "a", "value": 1}, {"key": "b", "value": 1}],
        {"b": 2, "__ow_headers": "mine"},
        {"x-h": "v"},
    )
    assert merged == {"a": 1, "b": 2, "__ow_headers": "mine"}
    assert fire_arguments([], {}, None) == {}


def test_derived_ids_are_activation_ids_that_only_their_parts_decide() -> None:
    fire = tick_fire_id("alarm", "t", 1_000)
    assert fire == tick_fire_id("alarm", "t", 1_000)
    assert len(fire) == 32 and fire == fire.lower() and int(fire, 16) >= 0
    assert len({fire, tick_fire_id("alarm", "t", 2_000), tick_fire_id("cron", "t", 1_000)}) == 3
    assert rule_call_id(fire, "r") != rule_call_id(fire, "s")
    assert tick_message_id("alarm", "t", 1_000) == "alarm-t-1000"
    assert tick_message_id("cron", "f", 5) == "cron-f-5"


def test_a_fire_goes_through_the_stream_as_it_was() -> None:
    fire = Fire(
        fire_id="f" * 32,
        source="alarm",
        fired_at_ns=1,
        trigger="t",
        rules=(("r", "pkg__a"),),
        arguments=b'{"a":\n1}',
        payload=b"{}",
        scheduled_at_ms=1000,
    )
    assert Fire.decode(fire.encode()) == fire
    event = Fire("e" * 32, "topic", 2, function="f", headers=(("X-Topic", "s"),), arguments=b"x")
    assert Fire.decode(event.encode()) == event


@pytest.mark.parametrize(
    "data",
    [
        b"no newline",
        b"not json\n",
        b'{"v": 2}\n',
        b'{"v": 1, "fireId": "x", "source": "api", "firedAtNs": 1, "argumentsSize": 0}\n',
        b'{"v": 1, "fireId": "x", "source": "api", "firedAtNs": 1, "argumentsSize": 9, '
        b'"trigger": "t"}\nshort',
    ],
)
def test_a_message_that_is_not_a_fire(data: bytes) -> None:
    with pytest.raises(MalformedFireError):
        Fire.decode(data)


@pytest.mark.parametrize(
    ("subject", "valid"),
    [
        ("events.orders", True),
        ("events.*", True),
        ("events.>", True),
        (">", True),
        ("events..x", False),
        ("events.>.x", False),
        ("events.a*", False),
        ("events. x", False),
        ("", False),
    ],
)
def test_subjects(subject: str, valid: bool) -> None:
    assert is_valid_subject(subject) is valid


@pytest.mark.parametrize(
    ("subject", "space", "within"),
    [
        ("events.orders", "events.>", True),
        ("events.a.b", "events.>", True),
        ("events.*", "events.>", True),
        ("events.*", "events.*", True),
        ("events.>", "events.*", False),
        ("events", "events.>", False),
        ("other.x", "events.>", False),
        ("events.a.b", "events.*", False),
        (">", "events.>", False),
        ("anything.at.all", ">", True),
    ],
)
def test_subjects_within_the_space_feeds_may_listen_on(
    subject: str, space: str, within: bool
) -> None:
    assert subject_within(subject, space) is within


@pytest.mark.parametrize(
    "expression", ["* * * * *", "*/5 * * * * *", "0 9 * * MON-FRI", "  1  2 * * *  "]
)
def test_cron_expressions_of_five_or_six_fields(expression: str) -> None:
    assert parse_cron(expression) == " ".join(expression.split())


@pytest.mark.parametrize(
    "expression", ["* * *", "* * * * * * *", "61 * * * *", "@daily", "0 0 31 2 *", "", 7, None]
)
def test_cron_expressions_refused(expression: object) -> None:
    with pytest.raises(FeedError):
        parse_cron(expression)


def test_cron_ticks_in_seconds_and_in_a_time_zone() -> None:
    every_second = Schedule(anchor_ms=0, cron="* * * * * *")
    assert every_second.next_tick_ms(ms("2030-01-01T00:00:00.500")) == ms("2030-01-01T00:00:01")
    assert every_second.next_tick_ms(ms("2030-01-01T00:00:01")) == ms("2030-01-01T00:00:02")
    nine_in_paris = Schedule(anchor_ms=0, cron="0 9 * * *", timezone="Europe/Paris")
    assert nine_in_paris.next_tick_ms(ms("2030-01-01T00:00:00")) == ms("2030-01-01T08:00:00")
    assert nine_in_paris.next_tick_ms(ms("2030-07-01T00:00:00")) == ms("2030-07-01T07:00:00")


def test_start_and_stop_dates_bound_the_ticks() -> None:
    bounded = Schedule(
        anchor_ms=0,
        cron="* * * * * *",
        start_ms=ms("2030-01-01T00:00:10"),
        stop_ms=ms("2030-01-01T00:00:12"),
    )
    assert bounded.next_tick_ms(ms("2030-01-01T00:00:00")) == ms("2030-01-01T00:00:10")
    assert bounded.next_tick_ms(ms("2030-01-01T00:00:11")) == ms("2030-01-01T00:00:12")
    assert bounded.next_tick_ms(ms("2030-01-01T00:00:12")) is None


def test_intervals_tick_from_their_start_or_their_creation_and_once_ticks_once() -> None:
    created = ms("2030-01-01T00:00:00")
    every_5 = Schedule(anchor_ms=created, minutes=5)
    assert every_5.next_tick_ms(created) == created + 300_000
    assert every_5.next_tick_ms(created + 300_000) == created + 600_000
    assert every_5.next_tick_ms(created + 301_000) == created + 600_000
    started = Schedule(anchor_ms=created, minutes=5, start_ms=created + 60_000)
    assert started.next_tick_ms(created) == created + 60_000
    once = Schedule(anchor_ms=created, date_ms=created + 5_000)
    assert once.next_tick_ms(created) == created + 5_000
    assert once.next_tick_ms(created + 5_000) is None


def test_configure_checks_and_an_update_keeps_what_it_leaves_out() -> None:
    now = ms("2030-01-01T00:00:00")
    state = configure(ALARM, "t", {"cron": "* * * * *", "trigger_payload": "hi"}, now, [])
    assert (state.options, state.payload) == ({"cron": "* * * * *"}, {"payload": "hi"})
    updated = configure(ALARM, "t", {"timezone": "UTC"}, now + 1, [], before=state)
    assert updated.options == {"cron": "* * * * *", "timezone": "UTC"}
    assert (updated.payload, updated.created_ms) == ({"payload": "hi"}, now)
    with pytest.raises(FeedError, match="no updatable parameters"):
        configure(ALARM, "t", {"lifecycleEvent": "UPDATE"}, now, [], before=state)
    interval = configure(INTERVAL, "t", {"minutes": "3"}, now, [])
    assert interval.schedule() == Schedule(anchor_ms=now, minutes=3)
    once = configure(
        ONCE, "t", {"date": "2030-01-02T00:00:00Z", "deleteAfterFire": "true"}, now, []
    )
    assert once.options == {"date": ms("2030-01-02T00:00:00"), "deleteAfterFire": True}
