"""Prometheus metrics of the queue-worker, with the OpenFaaS Pro names where they exist.

The series every call touches (processed, inflight, queued time, duration, callbacks) are plain
numbers that a collector of ours turns into metric families on each scrape: prometheus_client's
Counter, Gauge and Histogram take a lock and check their state on every change, five or six
times per call, 4-5% of the worker's CPU in bench scenario 6's drain. Same names, labels,
buckets and help texts; the worker changes them from its event loop only.
"""

from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from faas_gateway.runtime.metrics import DEFAULT_BUCKETS_S, Buckets

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
DURATION_BUCKETS_S = DEFAULT_BUCKETS_S

PROCESSED = (
    "queue_worker_messages_processed",
    "Queued calls finished here, by outcome (succeeded, failed, cancelled, malformed, "
    "crashed); retried attempts are not counted until the call ends.",
)
INFLIGHT = ("queue_worker_function_invocation_inflight", "Calls running now.")
QUEUED = (
    "queue_worker_queued_seconds",
    "Time from the call's enqueue to the start of its first attempt.",
)
CALLBACKS = ("queue_worker_callbacks", "Callbacks by outcome (delivered, failed).")
DURATION = (
    "queue_worker_function_duration_seconds",
    "Function call time, by status code (every attempt).",
)


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self._functions: dict[str, FunctionSeries] = {}
        self._pending_seen: set[str] = set()
        self.registry.register(CallSeriesCollector(self._functions))
        self.pending = Gauge(
            "queue_worker_pending_messages",
            "Calls on this worker's queue not finished yet (waiting, running or waiting for a "
            "retry), per function; read from the stream on each scrape.",
            ["function_name", "queue_name"],
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
        self.nats_reconnects = Counter(
            "queue_worker_nats_reconnects_total",
            "Times the connection to NATS was lost and made again.",
            registry=self.registry,
        )

    def function(self, name: str) -> "FunctionSeries":
        """The series of one function, made on first use."""
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
    """One function's numbers, changed on every call."""

    __slots__ = ("_metrics", "_name", "callbacks", "durations", "inflight", "outcomes", "queued")

    def __init__(self, metrics: WorkerMetrics, name: str) -> None:
        self._metrics = metrics
        self._name = name
        self.inflight = 0
        self.queued = Buckets(QUEUED_BUCKETS_S)
        self.outcomes: dict[str, int] = {}
        self.durations: dict[int, Buckets] = {}
        self.callbacks: dict[str, int] = {}

    def processed(self, outcome: str) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1

    def duration(self, code: int, duration_s: float) -> None:
        buckets = self.durations.get(code)
        if buckets is None:
            buckets = self.durations[code] = Buckets(DURATION_BUCKETS_S)
        buckets.observe(duration_s)

    def called_back(self, delivered: bool) -> None:
        outcome = "delivered" if delivered else "failed"
        self.callbacks[outcome] = self.callbacks.get(outcome, 0) + 1

    # Rare: prometheus_client's own.

    def retried(self) -> None:
        self._metrics.retries.labels(self._name).inc()

    def dead_lettered(self) -> None:
        self._metrics.dead_letters.labels(self._name).inc()


class CallSeriesCollector(Collector):
    """The per-call series of every function, as metric families, on each scrape."""

    def __init__(self, functions: dict[str, FunctionSeries]) -> None:
        self._functions = functions

    def describe(self) -> Iterator[Metric]:
        return self._families(())

    def collect(self) -> Iterator[Metric]:
        return self._families(list(self._functions.items()))

    def _families(self, functions: Iterable[tuple[str, FunctionSeries]]) -> Iterator[Metric]:
        processed = CounterMetricFamily(*PROCESSED, labels=["function_name", "outcome"])
        inflight = GaugeMetricFamily(*INFLIGHT, labels=["function_name"])
        queued = HistogramMetricFamily(*QUEUED, labels=["function_name"])
        callbacks = CounterMetricFamily(*CALLBACKS, labels=["function_name", "outcome"])
        duration = HistogramMetricFamily(*DURATION, labels=["function_name", "code"])
        for name, series in functions:
            for outcome, count in series.outcomes.items():
                processed.add_metric([name, outcome], count)
            inflight.add_metric([name], series.inflight)
            queued.add_metric([name], series.queued.cumulative(), series.queued.total)
            for outcome, count in series.callbacks.items():
                callbacks.add_metric([name, outcome], count)
            for code, buckets in series.durations.items():
                duration.add_metric([name, str(code)], buckets.cumulative(), buckets.total)
        yield from (processed, inflight, queued, callbacks, duration)
