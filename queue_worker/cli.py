"""faas-queue-worker: run queued calls from JetStream and post their callbacks."""

import sys

from faas_gateway.nats.auth import NatsCredentialsError
from faas_gateway.nats.provision import StreamConfigConflictError
from faas_gateway.runtime.command import Flag, start_command
from queue_worker.settings import WorkerSettings
from queue_worker.worker import Worker

FLAGS = (
    Flag("--host", "worker_host", "address of /healthz and /metrics"),
    Flag("--port", "worker_port", "port of /healthz and /metrics", int),
    Flag("--max-inflight", "max_inflight", "calls run at once", int),
    Flag(
        "--queue",
        "worker_queue",
        "serve this queue only (functions annotated com.openfaas.queue: NAME)",
    ),
)


def main(argv: list[str] | None = None) -> None:
    settings, registry = start_command(
        "faas-queue-worker",
        "Queue-worker: pulls async calls from NATS JetStream, calls the functions with their "
        "timeouts and posts each outcome to the call's X-Callback-Url.",
        WorkerSettings,
        FLAGS,
        argv,
    )
    try:
        Worker(settings, registry, handle_signals=True).run()
    except (StreamConfigConflictError, NatsCredentialsError) as exc:
        sys.exit(f"faas-queue-worker: {exc}")
