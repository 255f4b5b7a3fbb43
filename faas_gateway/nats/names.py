"""Every name of a NATS object this project uses: streams, buckets, subjects and consumers.

All of them derive from a few settings, here and nowhere else, so that the gateway, the worker
and the permissions the local stack gives each of them (faas_gateway/nats/auth.py) always
agree. Key-value buckets and object stores are JetStream streams with a prefix (``KV_``,
``OBJ_``); their entries are messages on ``$KV.<bucket>.<key>`` and ``$O.<bucket>.*``.
"""

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from faas_gateway.runtime.settings import CommonSettings

DEFAULT_QUEUE = "default"


@dataclass(frozen=True, slots=True)
class Names:
    stream: str  # the async queue (work-queue retention)
    subject_prefix: str  # calls go to <prefix>.<queue>.<function>
    consumer: str  # the durable consumer of the default queue; others get -<queue>
    activation_bucket: str  # one record per call id
    index_stream: str  # one message per accepted call, on <index_stream>.<function>
    dead_letter_stream: str  # one message per call that failed for good
    cancellation_bucket: str  # one key per cancelled call id
    functions_bucket: str  # one key per function deployed through the API
    triggers_bucket: str  # one key per trigger (OpenWhisk's API)
    rules_bucket: str  # one key per rule
    feeds_bucket: str  # one key per trigger with a built-in feed (alarms, NATS subjects)
    fire_stream: str  # accepted fires, fanned out by the gateways (work-queue retention)

    @classmethod
    def of(cls, settings: "CommonSettings") -> "Names":
        return cls(
            stream=settings.nats_stream,
            subject_prefix=settings.nats_subject_prefix,
            consumer=settings.nats_consumer,
            activation_bucket=settings.activation_bucket,
            index_stream=settings.activation_index_stream,
            dead_letter_stream=settings.dead_letter_stream,
            cancellation_bucket=settings.cancellation_bucket,
            functions_bucket=settings.functions_bucket,
            triggers_bucket=settings.triggers_bucket,
            rules_bucket=settings.rules_bucket,
            feeds_bucket=settings.feeds_bucket,
            fire_stream=settings.fire_stream,
        )

    # the async queue

    @property
    def subjects(self) -> str:
        return f"{self.subject_prefix}.>"

    def subject_for(self, queue: str, function: str) -> str:
        return f"{self.subject_prefix}.{queue}.{function}"

    def queue_subjects(self, queue: str) -> str:
        return f"{self.subject_prefix}.{queue}.>"

    def consumer_for(self, queue: str) -> str:
        """The durable consumer the workers of ``queue`` share."""
        return self.consumer if queue == DEFAULT_QUEUE else f"{self.consumer}-{queue}"

    # activation records, their large results, and the index for listing them

    @property
    def activation_stream(self) -> str:
        return f"KV_{self.activation_bucket}"

    def record_subject(self, call_id: str) -> str:
        return f"$KV.{self.activation_bucket}.{call_id}"

    @property
    def results_bucket(self) -> str:
        return f"{self.activation_bucket}-results"

    @property
    def results_stream(self) -> str:
        return f"OBJ_{self.results_bucket}"

    @property
    def index_subjects(self) -> str:
        return f"{self.index_stream}.>"

    def index_subject(self, function: str) -> str:
        return f"{self.index_stream}.{function}"

    # dead letters, cancellations, deployed functions

    @property
    def dead_letter_subjects(self) -> str:
        return f"{self.dead_letter_stream}.>"

    def dead_letter_subject(self, call_id: str) -> str:
        return f"{self.dead_letter_stream}.{call_id}"

    @property
    def cancellation_stream(self) -> str:
        return f"KV_{self.cancellation_bucket}"

    @property
    def functions_stream(self) -> str:
        return f"KV_{self.functions_bucket}"

    def function_subject(self, name: str) -> str:
        return f"$KV.{self.functions_bucket}.{name}"

    # events: triggers, rules, built-in feeds, and the fires fanned out from one stream

    @property
    def triggers_stream(self) -> str:
        return f"KV_{self.triggers_bucket}"

    @property
    def rules_stream(self) -> str:
        return f"KV_{self.rules_bucket}"

    @property
    def feeds_stream(self) -> str:
        return f"KV_{self.feeds_bucket}"

    @property
    def event_streams(self) -> tuple[str, ...]:
        """The three buckets every gateway watches."""
        return (self.triggers_stream, self.rules_stream, self.feeds_stream)

    @property
    def fire_subjects(self) -> str:
        return f"{self.fire_stream}.>"

    def fire_subject(self, kind: str, target: str) -> str:
        """A fire of a trigger (``kind`` "trigger") or an event for a function ("function")."""
        return f"{self.fire_stream}.{kind}.{target}"

    @property
    def fanout_consumer(self) -> str:
        """The durable consumer of the fire stream that all gateway processes share."""
        return f"{self.fire_stream}-fanout"

    @property
    def all_streams(self) -> tuple[str, ...]:
        return (
            self.stream,
            self.activation_stream,
            self.results_stream,
            self.index_stream,
            self.dead_letter_stream,
            self.cancellation_stream,
            self.functions_stream,
            *self.event_streams,
            self.fire_stream,
        )
