"""faas-queue-worker: run queued calls from JetStream and post their callbacks."""

import sys
from pathlib import Path

import prometheus_client

from faas_gateway import __version__
from faas_gateway.core.functions import FunctionsFileError, load_functions_file
from faas_gateway.nats.auth import NatsCredentialsError, check_credential_files
from faas_gateway.nats.jetstream import StreamConfigConflictError
from faas_gateway.runtime.command import load_settings, new_parser
from faas_gateway.runtime.logs import configure_logging
from queue_worker.settings import WorkerSettings
from queue_worker.worker import Worker

FLAG_FIELDS = (
    "worker_host",
    "worker_port",
    "functions_file",
    "nats_url",
    "max_inflight",
    "worker_queue",
    "log_level",
)


def main(argv: list[str] | None = None) -> None:
    parser = new_parser(
        "faas-queue-worker",
        "Queue-worker: pulls async calls from NATS JetStream, calls the functions with their "
        "timeouts and posts each outcome to the call's X-Callback-Url.",
        WorkerSettings,
    )
    parser.add_argument("--host", dest="worker_host", help="address of /healthz and /metrics")
    parser.add_argument(
        "--port", dest="worker_port", type=int, help="port of /healthz and /metrics"
    )
    parser.add_argument(
        "--functions-file", dest="functions_file", type=Path, help="YAML functions file"
    )
    parser.add_argument("--nats-url", dest="nats_url", help="NATS server URL")
    parser.add_argument("--max-inflight", dest="max_inflight", type=int, help="calls run at once")
    parser.add_argument(
        "--queue",
        dest="worker_queue",
        help="serve this queue only (functions annotated com.openfaas.queue: NAME)",
    )
    parser.add_argument(
        "--log-level", dest="log_level", choices=["debug", "info", "warning", "error"]
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    args = parser.parse_args(argv)
    # Only the counters' values, not a *_created series beside each one.
    prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped upstream
    settings = load_settings(WorkerSettings, args, FLAG_FIELDS)
    configure_logging(settings)
    try:
        registry = load_functions_file(settings.functions_file, settings.function_namespace)
        check_credential_files(settings)  # here, to stop with a clear message before starting
    except (FunctionsFileError, NatsCredentialsError) as exc:
        sys.exit(f"faas-queue-worker: {exc}")
    try:
        Worker(settings, registry, handle_signals=True).run()
    except (StreamConfigConflictError, NatsCredentialsError) as exc:
        sys.exit(f"faas-queue-worker: {exc}")
