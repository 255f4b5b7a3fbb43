"""Fixtures for UpstreamClient's tests: servers the client talks to, and clients closed after
the test. Every test here runs on both the asyncio loop and uvloop (tests/conftest.py)."""

import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from faas_gateway.http.client import UpstreamClient
from tests.http.helpers import AppServer, Handler, RawHandler, RawServer


@pytest.fixture
async def raw_server() -> AsyncIterator[Callable[..., Awaitable[RawServer]]]:
    """``server = await raw_server(handler, host="127.0.0.1")``."""
    servers: list[RawServer] = []

    async def start(handler: RawHandler, host: str = "127.0.0.1") -> RawServer:
        server = RawServer(handler, host)
        servers.append(server)
        return await server.start()

    yield start
    for server in servers:
        await server.close()


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., Awaitable[AppServer]]]:
    """``server = await serve(handler, ssl_context=None)``: an aiohttp app on every path."""
    servers: list[TestServer] = []

    async def start(handler: Handler, ssl_context: ssl.SSLContext | None = None) -> AppServer:
        app = web.Application(client_max_size=1024**3)
        server = TestServer(app, host="127.0.0.1")
        running = AppServer(server, "https" if ssl_context else "http")

        async def recording(request: web.Request) -> web.StreamResponse:
            assert request.transport is not None
            running.peers.append(request.transport.get_extra_info("peername"))
            return await handler(request)

        app.router.add_route("*", "/{tail:.*}", recording)
        await server.start_server(ssl=ssl_context)
        servers.append(server)
        return running

    yield start
    for server in servers:
        await server.close()


@pytest.fixture
async def make_client() -> AsyncIterator[Callable[..., UpstreamClient]]:
    clients: list[UpstreamClient] = []

    def make(**options: Any) -> UpstreamClient:
        made = UpstreamClient(**options)
        clients.append(made)
        return made

    yield make
    for made in clients:
        await made.close()


@pytest.fixture
def client(make_client: Callable[..., UpstreamClient]) -> UpstreamClient:
    return make_client()
