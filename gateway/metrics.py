"""Prometheus metrics of the gateway, with the OpenFaaS names and labels."""

import os
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from faas_gateway.core.functions import Registry
from faas_gateway.runtime.metrics import DEFAULT_BUCKETS_S, Buckets

# Requests for names that are invalid or not registered are counted under this label value,
# which no function can have, so random paths cannot create unbounded series.
UNKNOWN_FUNCTION = "(unknown)"


INVOCATIONS = ("gateway_function_invocation", "Function invocations by final status code.")
SECONDS = (
    "gateway_functions_seconds",
    "Time until the function's response headers, by status code.",
)
# A gauge only because prometheus-client would expose a counter as
# gateway_function_invocation_started_total, and OpenFaaS dashboards query the bare name.
STARTED = (
    "gateway_function_invocation_started",
    "Function invocations started (only ever increases).",
)


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self._services: ServiceCount | None = None
        self._started: dict[str, Gauge] = {}
        self._sync: dict[tuple[str, int], tuple[Counter, Histogram]] = {}
        # The series every sync call changes: plain numbers in one process (SyncSeries);
        # with gateway_workers > 1 prometheus_client's, whose values its files share.
        self._plain: SyncSeries | None = None
        if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
            self._plain = SyncSeries()
            self.registry.register(self._plain)
        else:
            self.invocation_total = Counter(
                INVOCATIONS[0] + "_total",
                INVOCATIONS[1],
                ["function_name", "code"],
                registry=self.registry,
            )
            self.functions_seconds = Histogram(
                *SECONDS, ["function_name", "code"], registry=self.registry
            )
            self.invocation_started = Gauge(
                *STARTED, ["function_name"], registry=self.registry, multiprocess_mode="sum"
            )
        self.async_requests = Counter(
            "gateway_async_requests_total",
            "Async requests by outcome (accepted or rejected) and response code.",
            ["function_name", "outcome", "code"],
            registry=self.registry,
        )
        self.client_disconnects = Counter(
            "gateway_client_disconnects_total",
            "Invocations whose client went away before the call ended: during its request "
            "body or the response.",
            ["function_name"],
            registry=self.registry,
        )

        # Registered now, so the name is exported from the start; filled by watch_queues.
        self._queues = QueueUnserved()
        self.registry.register(self._queues)

        self.nats_reconnects = Counter(
            "gateway_nats_reconnects_total",
            "Times the gateway lost its NATS connection and made it again.",
            registry=self.registry,
        )

        # Events (gateway/events/): fires by where they came from, the fan-out's invocations,
        # and how late alarm ticks are published (the scheduler's jitter).
        self.event_fires = Counter(
            "gateway_event_fires_total",
            "Events by source (api, alarm, subject, cron, topic) and outcome (accepted, "
            "duplicate, no_rules, rejected).",
            ["source", "outcome"],
            registry=self.registry,
        )
        self.fanout_invocations = Counter(
            "gateway_fanout_invocations_total",
            "Invocations the fan-out of fires made, by outcome (queued, called, failed).",
            ["outcome"],
            registry=self.registry,
        )
        self.alarm_lateness = Histogram(
            "gateway_alarm_lateness_seconds",
            "How long after its tick an alarm's fire was published by this gateway.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=self.registry,
        )

    async def count_reconnect(self) -> None:
        """A NATS link hook: the connection was lost and made again."""
        self.nats_reconnects.inc()

    def started(self, function: str) -> None:
        if self._plain is not None:
            started = self._plain.started
            started[function] = started.get(function, 0) + 1
            return
        child = self._started.get(function)
        if child is None:
            child = self._started[function] = self.invocation_started.labels(function)
        child.inc()

    def observe_sync(self, function: str, code: int, duration_s: float) -> None:
        if self._plain is not None:
            calls = self._plain.calls
            buckets = calls.get((function, code))
            if buckets is None:
                buckets = calls[(function, code)] = Buckets(DEFAULT_BUCKETS_S)
            buckets.observe(duration_s)
            return
        # Label lookups cost more than the increments; the children are kept per series.
        children = self._sync.get((function, code))
        if children is None:
            label = str(code)
            children = (
                self.invocation_total.labels(function, label),
                self.functions_seconds.labels(function, label),
            )
            self._sync[(function, code)] = children
        children[0].inc()
        children[1].observe(duration_s)

    def observe_async(self, function: str, code: int) -> None:
        outcome = "accepted" if code == 202 else "rejected"
        self.async_requests.labels(function, outcome, str(code)).inc()

    def count_fire(self, source: str, outcome: str) -> None:
        self.event_fires.labels(source, outcome).inc()

    def count_fanout(self, outcome: str, count: int = 1) -> None:
        self.fanout_invocations.labels(outcome).inc(count)

    def client_disconnected(self, function: str) -> None:
        self.client_disconnects.labels(function).inc()

    def count_services(self, functions: Registry) -> None:
        """Export gateway_service_count for the functions registered now, at each scrape."""
        if self._services is None:
            self._services = ServiceCount(functions)
            self.registry.register(self._services)

    def watch_queues(self, served: Callable[[], Mapping[str, bool]]) -> None:
        """Export gateway_queue_unserved from ``served`` ({queue: served}) at each scrape."""
        self._queues.source = served

    def invocation_counts(self) -> dict[str, float]:
        """Invocations per function since start: sync calls (any status) and accepted async
        calls, summed over this gateway's processes. FunctionStatus.invocationCount."""
        counts: dict[str, float] = defaultdict(float)
        for family in self._collected().collect():
            for sample in family.samples:
                if sample.name == "gateway_function_invocation_total" or (
                    sample.name == "gateway_async_requests_total"
                    and sample.labels.get("outcome") == "accepted"
                ):
                    counts[sample.labels["function_name"]] += sample.value
        return counts

    def render(self) -> bytes:
        return generate_latest(self._collected())

    def _collected(self) -> CollectorRegistry:
        if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
            return self.registry
        # Several gateway processes (gateway_workers): the sum over all of them, plus what
        # only this process knows (which functions exist is the same in every process).
        combined = CollectorRegistry()
        MultiProcessCollector(combined)  # type: ignore[no-untyped-call]  # untyped upstream
        if self._services is not None:
            combined.register(self._services)
        combined.register(self._queues)
        return combined


class SyncSeries(Collector):
    """The sync calls' series of one gateway process, as plain numbers turned into metric
    families on each scrape (faas_gateway/runtime/metrics.py): prometheus_client's took a
    lock and checked their state three times per call, about 4% of the gateway's CPU per
    sync call in bench scenario 1. Same names, labels, buckets and help texts. A call's
    count is its histogram's count, as both were always changed together."""

    def __init__(self) -> None:
        self.started: dict[str, int] = {}
        self.calls: dict[tuple[str, int], Buckets] = {}

    def describe(self) -> Iterable[Metric]:
        return self._families({}, {})

    def collect(self) -> Iterable[Metric]:
        return self._families(dict(self.started), dict(self.calls))

    def _families(
        self, started: dict[str, int], calls: dict[tuple[str, int], Buckets]
    ) -> Iterable[Metric]:
        invocations = CounterMetricFamily(*INVOCATIONS, labels=["function_name", "code"])
        seconds = HistogramMetricFamily(*SECONDS, labels=["function_name", "code"])
        begun = GaugeMetricFamily(*STARTED, labels=["function_name"])
        for (function, code), buckets in calls.items():
            labels = [function, str(code)]
            invocations.add_metric(labels, sum(buckets.counts))
            seconds.add_metric(labels, buckets.cumulative(), buckets.total)
        for function, count in started.items():
            begun.add_metric([function], count)
        return (invocations, seconds, begun)


class ServiceCount(Collector):
    """gateway_service_count{function_name}: OpenFaaS reports replicas; a function here is one
    service behind one URL, so 1 for each registered function."""

    def __init__(self, functions: Registry) -> None:
        self._functions = functions

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(
            "gateway_service_count", "Registered functions (1 each).", labels=["function_name"]
        )
        for function in self._functions:
            family.add_metric([function.name], 1.0)
        yield family


class QueueUnserved(Collector):
    """gateway_queue_unserved{queue_name}: 1 for a queue that registered functions use and no
    worker serves (gateway/queues.py), 0 for one that a worker serves."""

    def __init__(self) -> None:
        self.source: Callable[[], Mapping[str, bool]] = dict

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(
            "gateway_queue_unserved",
            "1 for a queue of registered functions that no worker serves; its calls pile up.",
            labels=["queue_name"],
        )
        for queue, served in sorted(self.source().items()):
            family.add_metric([queue], 0.0 if served else 1.0)
        yield family
