"""faas-gateway: serve /function, /async-function, /system, /healthz and /metrics."""

import logging
import sys

from faas_gateway.core.functions import FunctionsFileError, Registry
from faas_gateway.runtime.command import Flag, start_command
from gateway.auth import AuthSetupError, load_credentials
from gateway.loops import gateway_url_problem_now
from gateway.processes import process_count, serve, serve_in_processes
from gateway.settings import GatewaySettings

log = logging.getLogger("faas.gateway")

FLAGS = (
    Flag("--host", "gateway_host", "listen address"),
    Flag("--port", "gateway_port", "listen port", int),
)


def main(argv: list[str] | None = None) -> None:
    settings, registry = start_command(
        "faas-gateway",
        "Function gateway: sync proxy on /function/<name>, durable async calls on "
        "/async-function/<name> through NATS JetStream.",
        GatewaySettings,
        FLAGS,
        argv,
    )
    try:
        refuse_functions_at_the_gateway(registry, settings)
        if settings.basic_auth:
            load_credentials(settings)  # here, to stop with a clear message before serving
    except (FunctionsFileError, AuthSetupError) as exc:
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
