"""Serving in one process, or in several that share the listening port (SO_REUSEPORT).

One Python process proxies on one core. With ``gateway_workers`` > 1, the kernel spreads
connections over that many gateway processes, each with its own event loop, client session and
NATS connection; this process only supervises them. Metrics then use prometheus-client's
multiprocess mode, so any process's /metrics answers for all of them.
"""

import asyncio
import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import sys
import tempfile
from types import FrameType

import prometheus_client
from aiohttp import web

from faas_gateway.core.functions import Registry
from faas_gateway.nats.auth import NatsCredentialsError
from faas_gateway.nats.provision import StreamConfigConflictError
from faas_gateway.runtime.logs import configure_logging
from faas_gateway.runtime.loops import new_event_loop
from gateway.app import create_app
from gateway.invocation_server import INVOCATIONS, InvocationSite
from gateway.settings import GatewaySettings

log = logging.getLogger("faas.gateway")

MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"


def serve(settings: GatewaySettings, registry: Registry, *, reuse_port: bool = False) -> None:
    loop = new_event_loop(settings.event_loop)
    try:
        app = create_app(settings, registry)
        if settings.invocation_server == "aiohttp":
            web.run_app(
                app,
                host=settings.gateway_host,
                port=settings.gateway_port,
                reuse_port=reuse_port or None,
                shutdown_timeout=settings.shutdown_grace_s,
                access_log=None,
                print=None,
                loop=loop,
            )
        else:
            _run_with_invocation_server(app, settings, reuse_port, loop)
    except (StreamConfigConflictError, NatsCredentialsError) as exc:
        sys.exit(f"faas-gateway: {exc}")


def _run_with_invocation_server(
    app: web.Application,
    settings: GatewaySettings,
    reuse_port: bool,
    loop: asyncio.AbstractEventLoop,
) -> None:
    """web.run_app's steps, with gateway/invocation_server.py's site in place of its TCP site:
    SIGTERM/SIGINT stop it gracefully (aiohttp's runner: running calls get shutdown_grace)."""

    async def run() -> None:
        runner = web.AppRunner(
            app, handle_signals=True, access_log=None, shutdown_timeout=settings.shutdown_grace_s
        )
        await runner.setup()
        try:
            site = InvocationSite(
                runner,
                app[INVOCATIONS],
                settings.gateway_host,
                settings.gateway_port,
                reuse_port=reuse_port,
            )
            await site.start()
            await asyncio.Event().wait()  # until a signal raises GracefulExit
        finally:
            await runner.cleanup()

    asyncio.set_event_loop(loop)
    main = loop.create_task(run())
    try:
        loop.run_until_complete(main)
    except (web.GracefulExit, KeyboardInterrupt):
        pass
    finally:
        main.cancel()
        with contextlib.suppress(asyncio.CancelledError, web.GracefulExit):
            loop.run_until_complete(main)  # the runner's cleanup, inside run()
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


def process_count(settings: GatewaySettings) -> int:
    return settings.gateway_workers or os.cpu_count() or 1


def serve_in_processes(settings: GatewaySettings, registry: Registry) -> int:
    """Run ``process_count`` gateway processes until SIGTERM/SIGINT; return an exit code."""
    count = process_count(settings)
    metrics_dir = tempfile.mkdtemp(prefix="faas-gateway-metrics-")
    os.environ[MULTIPROC_DIR_ENV] = metrics_dir  # inherited by the children before they import
    context = multiprocessing.get_context("spawn")
    children = [
        context.Process(
            target=_child, args=(settings, registry), name=f"faas-gateway-{index}", daemon=False
        )
        for index in range(count)
    ]
    stopping = False

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            if child.is_alive() and child.pid is not None:
                os.kill(child.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for child in children:
        child.start()
    log.info("%d gateway processes share port %d", count, settings.gateway_port)
    exit_code = 0
    try:
        running = list(children)
        while running:
            multiprocessing.connection.wait([child.sentinel for child in running])
            for child in [child for child in running if not child.is_alive()]:
                running.remove(child)
                if not stopping:
                    log.error("%s exited with %s; stopping the others", child.name, child.exitcode)
                    exit_code = 1
                    stop(signal.SIGTERM, None)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return exit_code


def _child(settings: GatewaySettings, registry: Registry) -> None:
    # Our own process group: Ctrl-C reaches the supervisor, which stops us in order.
    os.setpgrp()
    configure_logging(settings)
    prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped upstream
    try:
        serve(settings, registry, reuse_port=True)
    except Exception:
        # Logged, not left to multiprocessing, which prints it bare: not one JSON line.
        log.critical("gateway process failed", exc_info=True)
        sys.exit(1)
