"""Prometheus metrics of the queue-worker, with the OpenFaaS Pro names where they exist."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# From a few milliseconds (an idle worker) to an hour (a backlog, or a function at its
# max_inflight for a long time).
QUEUED_BUCKETS_S = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1800.0,
    3600.0,
)


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self._functions: dict[str, FunctionSeries] = {}
        self._pending_seen: set[str] = set()
        self.processed = Counter(
            "queue_worker_messages_processed_total",
            "Queued calls finished here, by outcome (succeeded, failed, cancelled, malformed, "
            "crashed); retried attempts are not counted until the call ends.",
            ["function_name", "outcome"],
            registry=self.registry,
        )
        self.inflight = Gauge(
            "queue_worker_function_invocation_inflight",
            "Calls running now.",
            ["function_name"],
            registry=self.registry,
        )
        self.pending = Gauge(
            "queue_worker_pending_messages",
            "Calls on this worker's queue not finished yet (waiting, running or waiting for a "
            "retry), per function; read from the stream on each scrape.",
            ["function_name", "queue_name"],
            registry=self.registry,
        )
        self.queued = Histogram(
            "queue_worker_queued_seconds",
            "Time from the call's enqueue to the start of its first attempt.",
            ["function_name"],
            registry=self.registry,
            buckets=QUEUED_BUCKETS_S,
        )
        self.callbacks = Counter(
            "queue_worker_callbacks_total",
            "Callbacks by outcome (delivered, failed).",
            ["function_name", "outcome"],
            registry=self.registry,
        )
        self.retries = Counter(
            "queue_worker_retries_total",
            "Function calls that failed in a retryable way and went back to the queue.",
            ["function_name"],
            registry=self.registry,
        )
        self.dead_letters = Counter(
            "queue_worker_dead_letters_total",
            "Calls that failed for good and were kept as dead letters.",
            ["function_name"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "queue_worker_function_duration_seconds",
            "Function call time, by status code (every attempt).",
            ["function_name", "code"],
            registry=self.registry,
        )
        self.nats_reconnects = Counter(
            "queue_worker_nats_reconnects_total",
            "Times the connection to NATS was lost and made again.",
            registry=self.registry,
        )

    def function(self, name: str) -> "FunctionSeries":
        """The series of one function; kept, since label lookups cost more than increments."""
        series = self._functions.get(name)
        if series is None:
            series = self._functions[name] = FunctionSeries(self, name)
        return series

    def set_pending(self, queue: str, counts: dict[str, int] | None) -> None:
        """Per-function counts from the stream; None when NATS did not answer.

        A function that drained reads 0 rather than its last count. Unknown counts remove the
        series: a gap on a graph, rather than an old number that looks current.
        """
        if counts is None:
            self.pending.clear()  # the functions seen stay known: back at 0 if drained meanwhile
            return
        for function in self._pending_seen - counts.keys():
            self.pending.labels(function, queue).set(0)
        for function, count in counts.items():
            self.pending.labels(function, queue).set(count)
        self._pending_seen.update(counts)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class FunctionSeries:
    """One function's label children, bound once."""

    __slots__ = (
        "_called_back",
        "_durations",
        "_metrics",
        "_name",
        "_processed",
        "inflight",
        "queued",
    )

    def __init__(self, metrics: WorkerMetrics, name: str) -> None:
        self._metrics = metrics
        self._name = name
        self._processed: dict[str, Counter] = {}
        self._durations: dict[int, Histogram] = {}
        self.inflight = metrics.inflight.labels(name)
        self.queued = metrics.queued.labels(name)
        self._called_back: dict[bool, Counter] = {}

    def processed(self, outcome: str) -> None:
        child = self._processed.get(outcome)
        if child is None:
            child = self._processed[outcome] = self._metrics.processed.labels(self._name, outcome)
        child.inc()

    def duration(self, code: int, duration_s: float) -> None:
        child = self._durations.get(code)
        if child is None:
            child = self._durations[code] = self._metrics.duration.labels(self._name, str(code))
        child.observe(duration_s)

    def called_back(self, delivered: bool) -> None:
        child = self._called_back.get(delivered)
        if child is None:
            outcome = "delivered" if delivered else "failed"
            child = self._called_back[delivered] = self._metrics.callbacks.labels(
                self._name, outcome
            )
        child.inc()

    # Rare: looked up each time.

    def retried(self) -> None:
        self._metrics.retries.labels(self._name).inc()

    def dead_lettered(self) -> None:
        self._metrics.dead_letters.labels(self._name).inc()
