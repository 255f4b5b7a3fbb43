"""What happens next, decided without I/O so that tests can cover every case with a table."""

import enum


class Settle(enum.Enum):
    ACK = "ack"  # done: the stream forgets the message
    NAK = "nak"  # not done here: redeliver, at once, to any worker
    NAK_LATER = "nak_later"  # not done here: redeliver after a pause (one ack_wait)
    TERM = "term"  # can never succeed: drop without redelivery


class Ending(enum.Enum):
    COMPLETED = "completed"  # the function was called and its outcome reported (or given up)
    MALFORMED = "malformed"  # the message cannot be read
    INTERRUPTED = "interrupted"  # shutdown cut the call short
    CRASHED = "crashed"  # the worker's own handling failed unexpectedly


def settle(ending: Ending) -> Settle:
    """At least once: a call is acked only after its outcome went to the callback (or gave up)."""
    return {
        Ending.COMPLETED: Settle.ACK,
        Ending.MALFORMED: Settle.TERM,
        Ending.INTERRUPTED: Settle.NAK,
        # Keep the call rather than lose it, but not in a hot loop of the same failure.
        Ending.CRASHED: Settle.NAK_LATER,
    }[ending]


def outcome_label(status_code: int) -> str:
    return "succeeded" if 200 <= status_code < 300 else "failed"


def heartbeat_interval_s(ack_wait_s: float) -> float:
    """Renew the lease three times per ack_wait, so one lost renewal does not cost it."""
    return max(ack_wait_s / 3, 0.05)
