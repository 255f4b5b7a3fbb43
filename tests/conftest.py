import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import nats
import pytest
import uvloop
from nats.aio.client import Client as NatsClient

from faas_gateway.core.functions import Registry
from faas_gateway.nats.link import NatsLink, close_quietly
from faas_gateway.nats.provision import Plan, ensure_all
from faas_gateway.runtime.settings import CommonSettings
from gateway.app import create_app
from gateway.settings import GatewaySettings
from queue_worker.settings import WorkerSettings
from queue_worker.worker import Worker
from tests.harness import (
    GatewayServer,
    NatsServer,
    Recorder,
    Responder,
    RunningGateway,
    default_responder,
    wait_until,
)

# The fixtures that start things, as types for annotating tests.
StartGateway = Callable[..., Awaitable[RunningGateway]]
StartWorker = Callable[..., Awaitable[Worker]]
StartRecorder = Callable[..., Awaitable[Recorder]]


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Any]:
    """Tests run on uvloop, the loop both processes use in production; the HTTP client's own
    tests (tests/http) run on both loops, since its transports must work with either."""
    if item.module is not None and item.module.__name__.startswith("tests.http."):
        return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
    if os.environ.get("FAAS_TEST_LOOP") == "asyncio":  # for debugging with asyncio's tools
        return {"asyncio": asyncio.new_event_loop}
    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture
async def nats_server(tmp_path: Path) -> AsyncIterator[NatsServer]:
    server = NatsServer(tmp_path / "nats-store")
    await server.start()
    yield server
    server.kill()


@pytest.fixture
async def nats_client(nats_server: NatsServer) -> AsyncIterator[NatsClient]:
    """A plain client for the test to look into the stream; reconnects across restarts."""
    client = await nats.connect(nats_server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.1)
    yield client
    await close_quietly(client)


async def stream_message_count(client: NatsClient, stream: str = "faas-async") -> int:
    from nats.js.errors import NotFoundError

    try:
        info = await client.jetstream().stream_info(stream)
    except NotFoundError:
        return 0
    return int(info.state.messages)


@pytest.fixture
async def connected_link() -> AsyncIterator[Callable[[CommonSettings], Awaitable[NatsLink]]]:
    """``await connected_link(settings)``: a NATS link as both processes make it, connected,
    with every stream and bucket set up; for tests of the stores. Closed after the test."""
    links: list[NatsLink] = []

    async def connect(settings: CommonSettings) -> NatsLink:
        link = NatsLink(settings, "test")
        await link.connect()
        links.append(link)
        await ensure_all(link.js, Plan.of(settings))
        return link

    yield connect
    for link in links:
        await link.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


@pytest.fixture
async def recorder() -> AsyncIterator[Callable[..., Awaitable[Recorder]]]:
    """Start recorders: ``await recorder()`` or ``await recorder(responder)``."""
    started: list[Recorder] = []

    async def start(responder: Responder = default_responder) -> Recorder:
        server = await Recorder(responder).start()
        started.append(server)
        return server

    yield start
    for server in started:
        await server.close()


def gateway_settings(nats_url: str, **overrides: Any) -> GatewaySettings:
    """Settings for a gateway under test; ``overrides`` win, ``nats_url`` included."""
    values: dict[str, Any] = {
        "nats_url": nats_url,
        "nats_reconnect_wait_s": 0.1,
        "nats_startup_wait_s": 5.0,
        "publish_timeout_s": 2.0,
        "shutdown_grace_s": 2.0,
    }
    values.update(overrides)
    return GatewaySettings(**values)


def worker_settings(nats_url: str, **overrides: Any) -> WorkerSettings:
    values: dict[str, Any] = {
        "nats_url": nats_url,
        "nats_reconnect_wait_s": 0.1,
        "worker_port": 0,
        "shutdown_grace_s": 2.0,
        "fetch_wait_s": 0.5,
        "callback_initial_wait_s": 0.05,
        "callback_max_wait_s": 0.2,
        # One attempt per call unless a test asks for retries (tests/worker/test_reliability.py).
        "max_retry_attempts": 1,
        "initial_retry_wait_s": 0.05,
        "max_retry_wait_s": 0.2,
        "running_record_delay_s": 0.05,
    }
    values.update(overrides)
    return WorkerSettings(**values)


@pytest.fixture
async def start_gateway(
    nats_server: NatsServer,
) -> AsyncIterator[Callable[..., Awaitable[RunningGateway]]]:
    """``await start_gateway(registry, **settings)``: a real gateway on a free port, served
    as in production, except that a call is cancelled when its client leaves (as aiohttp's
    TestServer does)."""
    running: list[GatewayServer] = []

    async def start(registry: Registry, **overrides: Any) -> RunningGateway:
        settings = gateway_settings(overrides.pop("nats_url", nats_server.url), **overrides)
        app = create_app(settings, registry)
        server = await GatewayServer(app, settings, handler_cancellation=True).start()
        running.append(server)
        return RunningGateway(server, app, settings)

    yield start
    for server in running:
        await server.close()


@pytest.fixture
async def start_worker(
    nats_server: NatsServer,
) -> AsyncIterator[Callable[..., Awaitable[Worker]]]:
    """``await start_worker(registry, **settings)``: a worker that is consuming on return."""
    running: list[tuple[Worker, asyncio.Task[None]]] = []

    async def start(registry: Registry, **overrides: Any) -> Worker:
        settings = worker_settings(overrides.pop("nats_url", nats_server.url), **overrides)
        worker = Worker(settings, registry)
        task = asyncio.create_task(worker.main())
        running.append((worker, task))
        ready = asyncio.create_task(worker.ready.wait())
        await asyncio.wait({ready, task}, timeout=15, return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        if task.done():
            task.result()
        assert worker.ready.is_set(), "worker did not start consuming within 15s"
        return worker

    yield start
    for worker, _ in running:
        worker.request_stop()
        worker.request_stop()  # tests end at once: running calls go back to the queue
    for _, task in running:
        await asyncio.wait_for(task, 30)


@pytest.fixture
async def start_production_like_gateway(
    nats_server: NatsServer,
) -> AsyncIterator[Callable[..., Awaitable[str]]]:
    """A gateway served the way gateway/cli.py serves it (web.run_app: handlers are not
    cancelled when the client disconnects; TestServer cancels them). Returns its base URL."""
    servers: list[GatewayServer] = []

    async def start(registry: Registry, **overrides: Any) -> str:
        settings = gateway_settings(overrides.pop("nats_url", nats_server.url), **overrides)
        server = await GatewayServer(
            create_app(settings, registry), settings, handler_cancellation=False
        ).start()
        servers.append(server)
        return str(server.make_url("")).rstrip("/")

    yield start
    for server in servers:
        await server.close()


async def ready_gateway(
    start_gateway: Callable[..., Awaitable[RunningGateway]],
    http: aiohttp.ClientSession,
    registry: Registry,
    **overrides: Any,
) -> RunningGateway:
    """A gateway that is connected to NATS with its streams and buckets in place."""
    gateway = await start_gateway(registry, **overrides)

    async def healthy() -> bool:
        async with http.get(gateway.url("/healthz")) as response:
            return response.status == 200

    await wait_until(healthy, 30.0, "the gateway to reach NATS")
    return gateway
