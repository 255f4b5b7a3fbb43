"""OpenWhisk's triggers and rules, and the built-in feeds' state, in three NATS key-value
buckets that every gateway process watches (like the function registry), and the fire stream
they are fanned out from.

Writes go through ``EventStore`` (create once, then conditional on the revision read: two
gateways cannot lose each other's change); ``EventWatch`` keeps each process's copy, from
which requests are answered and fires take their rules. A process applies its own writes at
once, so its next request sees them; other processes get them from their watch within
milliseconds.
"""

import logging
from collections.abc import Callable
from typing import Any, TypeVar

import orjson

from faas_gateway.core.events import Rule, Trigger
from faas_gateway.core.feeds import FeedState
from faas_gateway.nats.buckets import BucketWatch, Documents
from faas_gateway.nats.link import NatsLink
from faas_gateway.nats.names import Names

log = logging.getLogger("faas.events")

T = TypeVar("T")


def _decoder(parse: Callable[[dict[str, Any]], T], what: str) -> Callable[[str, bytes], T | None]:
    def decode(key: str, value: bytes) -> T | None:
        try:
            document = orjson.loads(value)
            if not isinstance(document, dict):
                raise ValueError("not a JSON object")
            return parse(document)
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("%s %s: unreadable entry ignored: %s", what, key, exc)
            return None

    return decode


class EventStore:
    """Writes to the three buckets (faas_gateway/nats/buckets.py ``Documents``)."""

    def __init__(self, link: NatsLink, names: Names) -> None:
        self.triggers = Documents(link, names.triggers_bucket, "trigger")
        self.rules = Documents(link, names.rules_bucket, "rule")
        self.feeds = Documents(link, names.feeds_bucket, "feed")


class EventWatch:
    """This process's copy of the triggers, rules and built-in feeds, with the rules of each
    trigger at hand (a fire reads them)."""

    def __init__(self, link: NatsLink, names: Names) -> None:
        self.triggers: BucketWatch[Trigger] = BucketWatch(
            link, names.triggers_bucket, _decoder(Trigger.from_json, "trigger"), "triggers"
        )
        self.rules: BucketWatch[Rule] = BucketWatch(
            link, names.rules_bucket, _decoder(Rule.from_json, "rule"), "rules"
        )
        self.feeds: BucketWatch[FeedState] = BucketWatch(
            link, names.feeds_bucket, _decoder(FeedState.from_json, "feed"), "feeds"
        )
        self._by_trigger: dict[str, list[Rule]] | None = None
        self.rules.listeners.append(self._rules_changed)

    @property
    def watches(self) -> tuple[BucketWatch[Any], ...]:
        return (self.triggers, self.rules, self.feeds)

    @property
    def synced(self) -> bool:
        return all(watch.synced.is_set() for watch in self.watches)

    def _rules_changed(self) -> None:
        self._by_trigger = None  # made again at the next read

    def rules_of(self, trigger: str) -> list[Rule]:
        """The rules that name ``trigger``, by name."""
        if self._by_trigger is None:
            by_trigger: dict[str, list[Rule]] = {}
            for rule in sorted(self.rules.entries.values(), key=lambda rule: rule.name):
                by_trigger.setdefault(rule.trigger, []).append(rule)
            self._by_trigger = by_trigger
        return self._by_trigger.get(trigger, [])

    def active_rules(self, trigger: str) -> list[Rule]:
        return [rule for rule in self.rules_of(trigger) if rule.active]
