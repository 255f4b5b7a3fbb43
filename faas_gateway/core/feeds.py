"""The built-in feeds, pure: OpenWhisk's alarms (``/whisk.system/alarms/alarm``,
``interval``, ``once``) and a NATS subject (``/whisk.system/nats/subject``), their
parameters as OpenWhisk's alarms package names them, the state kept per trigger, the READ
answer, and when an alarm ticks.

Cron expressions are parsed by croniter: five fields, or six with seconds first (as the
alarms package's node ``cron`` reads them). The gateway's scheduler (gateway/events/
scheduler.py) asks ``Schedule.next_tick_ms``; every gateway asks the same question of the same
stored state and gets the same ticks, which is what lets each tick be published under one
message id by all of them.
"""

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter
from croniter.croniter import CroniterError

from faas_gateway.core.events import is_valid_subject, subject_within

BUILTIN_NAMESPACE = "whisk.system"
ALARM = "alarms/alarm"
INTERVAL = "alarms/interval"
ONCE = "alarms/once"
SUBJECT = "nats/subject"
BUILTIN_FEEDS = (ALARM, INTERVAL, ONCE, SUBJECT)
ALARMS = (ALARM, INTERVAL, ONCE)

CREATE, READ, UPDATE, DELETE, PAUSE, UNPAUSE = (
    "CREATE",
    "READ",
    "UPDATE",
    "DELETE",
    "PAUSE",
    "UNPAUSE",
)
LIFECYCLE_EVENTS = (CREATE, READ, UPDATE, DELETE, PAUSE, UNPAUSE)

# What each feed takes besides lifecycleEvent, triggerName and authKey (others are ignored,
# as OpenWhisk's feeds ignore them). strict is the alarms package's; it is taken and has no
# effect here (every gateway fires a tick at its exact time).
PARAMETERS = {
    ALARM: ("cron", "timezone", "trigger_payload", "startDate", "stopDate", "strict"),
    INTERVAL: ("minutes", "trigger_payload", "startDate", "stopDate"),
    ONCE: ("date", "trigger_payload", "deleteAfterFire"),
    SUBJECT: ("subject", "queue"),
}
QUEUE_GROUP_PATTERN = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}")
MAX_CRON_CHARS = 256


class FeedError(ValueError):
    """A feed's parameters or lifecycle event cannot be taken; the message says why."""


# parameters


def parse_cron(value: Any) -> str:
    """A cron expression of 5 fields, or 6 with seconds first, that fires at least once."""
    if not isinstance(value, str) or not value.strip():
        raise FeedError(f"cron pattern {value!r} is not valid: a cron expression is a string")
    expression = " ".join(value.split())
    fields = expression.split(" ")
    if len(expression) > MAX_CRON_CHARS or len(fields) not in (5, 6):
        raise FeedError(
            f"cron pattern '{value[:MAX_CRON_CHARS]}' is not valid: it needs 5 fields "
            "(minute hour day month weekday), or 6 with seconds first"
        )
    seconds = len(fields) == 6
    if not croniter.is_valid(expression, second_at_beginning=seconds):
        raise FeedError(f"cron pattern '{expression}' is not valid")
    try:
        croniter(expression, datetime.now(UTC), second_at_beginning=seconds).get_next(float)
    except (CroniterError, ValueError, OverflowError) as exc:
        raise FeedError(f"cron pattern '{expression}' never fires") from exc
    return expression


def parse_timezone(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > 64:
        raise FeedError("timezone must be an IANA time zone name, like Europe/Paris")
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise FeedError(f"timezone '{value}' is not a known time zone") from exc
    return value


def parse_date_ms(value: Any, name: str) -> int:
    """Epoch milliseconds, or an ISO 8601 date (UTC unless it says otherwise)."""
    if isinstance(value, bool):
        raise FeedError(f"{name} parameter '{value}' is not a valid Date")
    if isinstance(value, int):
        millis = value
    elif isinstance(value, str) and value.isdigit() and len(value) <= 16:
        millis = int(value)
    elif isinstance(value, str) and len(value) <= 64:
        try:
            moment = datetime.fromisoformat(value)
        except ValueError as exc:
            raise FeedError(
                f"{name} parameter '{value}' is not a valid Date: give epoch milliseconds or "
                "an ISO 8601 date"
            ) from exc
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        millis = int(moment.timestamp() * 1000)
    else:
        raise FeedError(
            f"{name} parameter is not a valid Date: give epoch milliseconds or an ISO 8601 date"
        )
    if not 0 <= millis < 253_402_300_800_000:  # year 10000
        raise FeedError(f"{name} parameter '{value}' is not a valid Date")
    return millis


def parse_minutes(value: Any) -> int:
    if isinstance(value, str) and value.isdigit() and len(value) <= 9:
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 10_000_000:
        raise FeedError("the minutes parameter must be an integer greater than zero")
    return value


def parse_trigger_payload(value: Any) -> dict[str, Any]:
    """The payload each alarm fires with: an object, or text as ``{"payload": text}``."""
    if value is None:
        return {}
    if isinstance(value, str):
        return {"payload": value}
    if isinstance(value, dict):
        return value
    raise FeedError("trigger_payload must be a JSON object or a string")


def parse_delete_after_fire(value: Any) -> bool | str:
    """false (keep the trigger), true (delete it after it fired) or "rules" (its rules too)."""
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "rules"):
        lowered = value.lower()
        return "rules" if lowered == "rules" else lowered == "true"
    raise FeedError("deleteAfterFire parameter must be one of [false, true, rules].")


def parse_subject(value: Any, spaces: list[str]) -> str:
    if not isinstance(value, str) or not is_valid_subject(value):
        raise FeedError(
            "subject must be a NATS subject: dot-separated tokens without spaces, * for one "
            "token, > for the rest"
        )
    if not any(subject_within(value, space) for space in spaces):
        raise FeedError(
            f"subject '{value}' is outside the subjects feeds may listen on "
            f"({', '.join(spaces) or 'none'}; the setting event_subjects)"
        )
    return value


def parse_queue_group(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str) or not QUEUE_GROUP_PATTERN.fullmatch(value):
        raise FeedError("queue must be a NATS queue group name: letters, digits, _ - .")
    return value


# when alarms tick


@dataclass(frozen=True, slots=True)
class Schedule:
    """When one alarm ticks, in epoch milliseconds: a cron expression (in ``timezone``), every
    ``minutes`` from ``anchor_ms``, or once at ``date_ms``; never before ``start_ms`` or after
    ``stop_ms``."""

    anchor_ms: int
    cron: str | None = None
    timezone: str | None = None
    minutes: int | None = None
    date_ms: int | None = None
    start_ms: int | None = None
    stop_ms: int | None = None

    def next_tick_ms(self, after_ms: int) -> int | None:
        """The first tick later than ``after_ms``; None when there is none any more."""
        if self.start_ms is not None:
            after_ms = max(after_ms, self.start_ms - 1)
        tick = self._next(after_ms)
        if tick is None or (self.stop_ms is not None and tick > self.stop_ms):
            return None
        return tick

    def _next(self, after_ms: int) -> int | None:
        if self.date_ms is not None:
            return self.date_ms if self.date_ms > after_ms else None
        if self.minutes is not None:
            period = self.minutes * 60_000
            # From startDate when given (its first tick), else from the feed's creation.
            first = self.start_ms if self.start_ms is not None else self.anchor_ms + period
            if after_ms < first:
                return first
            return first + ((after_ms - first) // period + 1) * period
        assert self.cron is not None
        zone = ZoneInfo(self.timezone) if self.timezone else UTC
        start = datetime.fromtimestamp(after_ms / 1000, zone)
        seconds = len(self.cron.split(" ")) == 6
        try:
            tick_s = croniter(self.cron, start, second_at_beginning=seconds).get_next(float)
        except (CroniterError, ValueError, OverflowError):
            return None
        return round(tick_s * 1000)


# the state of one trigger's built-in feed


@dataclass(frozen=True, slots=True)
class FeedState:
    """What the feeds bucket keeps for a trigger with a built-in feed."""

    feed: str
    trigger: str
    options: dict[str, Any]  # the feed's parameters, as checked
    payload: dict[str, Any] = field(default_factory=dict)  # what an alarm fires with
    created_ms: int = 0
    active: bool = True  # false once paused
    changed_ms: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "feed": self.feed,
            "trigger": self.trigger,
            "options": self.options,
            "payload": self.payload,
            "createdAt": self.created_ms,
            "active": self.active,
            "changedAt": self.changed_ms,
        }

    @classmethod
    def from_json(cls, document: dict[str, Any]) -> "FeedState":
        feed = str(document["feed"])
        if feed not in BUILTIN_FEEDS:
            raise ValueError(f"unknown feed {feed!r}")
        return cls(
            feed=feed,
            trigger=str(document["trigger"]),
            options=dict(document.get("options") or {}),
            payload=dict(document.get("payload") or {}),
            created_ms=int(document.get("createdAt") or 0),
            active=bool(document.get("active", True)),
            changed_ms=int(document.get("changedAt") or 0),
        )

    def schedule(self) -> Schedule | None:
        """When it ticks (alarms only)."""
        if self.feed not in ALARMS:
            return None
        options = self.options
        return Schedule(
            anchor_ms=self.created_ms,
            cron=options.get("cron"),
            timezone=options.get("timezone"),
            minutes=options.get("minutes"),
            date_ms=options.get("date"),
            start_ms=options.get("startDate"),
            stop_ms=options.get("stopDate"),
        )

    def same_setup(self, other: "FeedState") -> bool:
        """The same feed with the same parameters and payload (a CREATE sent twice)."""
        return (self.feed, self.options, self.payload) == (other.feed, other.options, other.payload)

    def paused(self, active: bool, now_ms: int) -> "FeedState":
        return FeedState(
            self.feed, self.trigger, self.options, self.payload, self.created_ms, active, now_ms
        )

    def read_document(self, namespace: str, now_ms: int) -> dict[str, Any]:
        """The READ answer, as OpenWhisk's alarms package gives it: ``config`` and ``status``."""
        config: dict[str, Any] = {"name": self.trigger, "namespace": namespace}
        if self.feed in ALARMS:
            config["payload"] = self.payload
        config.update(self.options)
        schedule = self.schedule()
        ended = schedule is not None and schedule.next_tick_ms(now_ms) is None
        status: dict[str, Any] = {
            "active": self.active and not ended,
            "dateChanged": self.changed_ms,
            "dateChangedISO": datetime.fromtimestamp(self.changed_ms / 1000, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
        }
        if not self.active:
            status["reason"] = {"kind": "USER", "message": "paused (lifecycleEvent PAUSE)"}
        elif ended:
            status["reason"] = {"kind": "AUTO", "message": "the alarm has no more ticks"}
        return {"config": config, "status": status}


def configure(
    feed: str,
    trigger: str,
    params: dict[str, Any],
    now_ms: int,
    spaces: list[str],
    before: FeedState | None = None,
) -> FeedState:
    """The state a CREATE (``before`` None) or an UPDATE (over ``before``) makes, checked.

    FeedError for a parameter that is missing or cannot be used, naming it.
    """
    given = {key: params[key] for key in PARAMETERS[feed] if key in params}
    if before is not None and not given:
        raise FeedError("no updatable parameters were specified")
    if before is not None:
        merged: dict[str, Any] = {**before.options}
        if before.feed in ALARMS and "trigger_payload" not in given:
            merged["trigger_payload"] = before.payload
        merged.update(given)
        given = merged
    options: dict[str, Any] = {}
    payload: dict[str, Any] = {}
    if feed in ALARMS:
        payload = parse_trigger_payload(given.get("trigger_payload"))
    if feed == ALARM:
        if given.get("cron") is None:
            raise FeedError("alarms trigger feed is missing the cron parameter")
        options["cron"] = parse_cron(given["cron"])
        zone = parse_timezone(given.get("timezone"))
        if zone is not None:
            options["timezone"] = zone
    elif feed == INTERVAL:
        if given.get("minutes") is None:
            raise FeedError("interval trigger feed is missing the minutes parameter")
        options["minutes"] = parse_minutes(given["minutes"])
    elif feed == ONCE:
        if given.get("date") is None:
            raise FeedError("alarms once trigger feed is missing the date parameter")
        options["date"] = parse_date_ms(given["date"], "date")
        changed = before is None or options["date"] != before.options.get("date")
        if changed and options["date"] <= now_ms:
            raise FeedError(f"date parameter '{given['date']}' must be in the future")
        options["deleteAfterFire"] = parse_delete_after_fire(given.get("deleteAfterFire"))
    else:
        if given.get("subject") is None:
            raise FeedError("nats subject feed is missing the subject parameter")
        options["subject"] = parse_subject(given["subject"], spaces)
        group = parse_queue_group(given.get("queue"))
        if group is not None:
            options["queue"] = group
    if feed in (ALARM, INTERVAL):
        for name in ("startDate", "stopDate"):
            if given.get(name) is None:
                continue
            options[name] = parse_date_ms(given[name], name)
            changed = before is None or options[name] != before.options.get(name)
            if changed and options[name] <= now_ms:
                raise FeedError(f"{name} parameter '{given[name]}' must be in the future")
        if options.get("stopDate", now_ms + 1) <= options.get("startDate", 0):
            raise FeedError(
                f"stopDate parameter '{given.get('stopDate')}' must be greater than the "
                f"startDate parameter '{given.get('startDate')}'"
            )
    return FeedState(
        feed=feed,
        trigger=trigger,
        options=options,
        payload=payload,
        created_ms=before.created_ms if before is not None else now_ms,
        active=before.active if before is not None else True,
        changed_ms=now_ms,
    )
