"""Prometheus metrics of the queue-worker, with the OpenFaaS Pro names where they exist."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.processed = Counter(
            "queue_worker_messages_processed_total",
            "Queued calls finished, by outcome (succeeded, failed, cancelled, malformed, crashed).",
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
            "Queued calls not yet taken by any worker (read from the consumer on each scrape).",
            registry=self.registry,
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
            "Function call time, by status code.",
            ["function_name", "code"],
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
