"""Prometheus metrics of the gateway, with the OpenFaaS names and labels."""

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

# Requests for names that are invalid or not registered are counted under this label value,
# which no function can have, so random paths cannot create unbounded series.
UNKNOWN_FUNCTION = "(unknown)"


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self._started: dict[str, Gauge] = {}
        self._sync: dict[tuple[str, int], tuple[Counter, Histogram]] = {}
        self.invocation_total = Counter(
            "gateway_function_invocation_total",
            "Function invocations by final status code.",
            ["function_name", "code"],
            registry=self.registry,
        )
        self.functions_seconds = Histogram(
            "gateway_functions_seconds",
            "Time until the function's response headers, by status code.",
            ["function_name", "code"],
            registry=self.registry,
        )
        # A Gauge only because prometheus-client would expose a Counter as
        # gateway_function_invocation_started_total, and OpenFaaS dashboards query the bare name.
        self.invocation_started = Gauge(
            "gateway_function_invocation_started",
            "Function invocations started (only ever increases).",
            ["function_name"],
            registry=self.registry,
            multiprocess_mode="sum",
        )
        self.async_requests = Counter(
            "gateway_async_requests_total",
            "Async requests by outcome (accepted or rejected) and response code.",
            ["function_name", "outcome", "code"],
            registry=self.registry,
        )

    def started(self, function: str) -> None:
        child = self._started.get(function)
        if child is None:
            child = self._started[function] = self.invocation_started.labels(function)
        child.inc()

    def observe_sync(self, function: str, code: int, duration_s: float) -> None:
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

    def render(self) -> bytes:
        if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
            # Several gateway processes (gateway_workers): report the sum over all of them.
            combined = CollectorRegistry()
            MultiProcessCollector(combined)  # type: ignore[no-untyped-call]  # untyped upstream
            return generate_latest(combined)
        return generate_latest(self.registry)
