"""faas-gateway: serve /function, /async-function, /healthz and /metrics."""

import logging
import sys
from pathlib import Path

import prometheus_client

from faas_gateway import __version__
from faas_gateway.core.functions import FunctionsFileError, Registry, load_functions_file
from faas_gateway.nats.auth import NatsCredentialsError, check_credential_files
from faas_gateway.runtime.command import load_settings, new_parser
from faas_gateway.runtime.logs import configure_logging
from gateway.auth import AuthSetupError, load_credentials
from gateway.loops import gateway_url_problem_now
from gateway.processes import process_count, serve, serve_in_processes
from gateway.settings import GatewaySettings

log = logging.getLogger("faas.gateway")

FLAG_FIELDS = ("gateway_host", "gateway_port", "functions_file", "nats_url", "log_level")


def main(argv: list[str] | None = None) -> None:
    parser = new_parser(
        "faas-gateway",
        "Function gateway: sync proxy on /function/<name>, durable async calls on "
        "/async-function/<name> through NATS JetStream.",
        GatewaySettings,
    )
    parser.add_argument("--host", dest="gateway_host", help="listen address")
    parser.add_argument("--port", dest="gateway_port", type=int, help="listen port")
    parser.add_argument(
        "--functions-file", dest="functions_file", type=Path, help="YAML functions file"
    )
    parser.add_argument("--nats-url", dest="nats_url", help="NATS server URL")
    parser.add_argument(
        "--log-level", dest="log_level", choices=["debug", "info", "warning", "error"]
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    args = parser.parse_args(argv)
    # Only the counters' values, not a *_created series beside each one.
    prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped upstream
    settings = load_settings(GatewaySettings, args, FLAG_FIELDS)
    configure_logging(settings)
    try:
        registry = load_functions_file(settings.functions_file, settings.function_namespace)
        refuse_functions_at_the_gateway(registry, settings)
        if settings.basic_auth:
            load_credentials(settings)  # here, to stop with a clear message before serving
        check_credential_files(settings)
    except (FunctionsFileError, AuthSetupError, NatsCredentialsError) as exc:
        sys.exit(f"faas-gateway: {exc}")
    log.info(
        "%d functions from %s; listening on http://%s:%d",
        len(registry),
        settings.functions_file,
        settings.gateway_host,
        settings.gateway_port,
    )
    if process_count(settings) > 1:
        sys.exit(serve_in_processes(settings, registry))
    serve(settings, registry)


def refuse_functions_at_the_gateway(registry: Registry, settings: GatewaySettings) -> None:
    """A file function whose URL is this gateway would call itself for ever: stop here, as
    for any other bad entry of the file."""
    for function in registry:
        problem = gateway_url_problem_now(
            function.url, settings.gateway_host, settings.gateway_port
        )
        if problem is not None:
            raise FunctionsFileError(
                f"{settings.functions_file}: function {function.name!r}: {problem}"
            )
