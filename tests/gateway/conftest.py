"""Fixtures for the gateway's tests: ``serve``, a plain aiohttp app as a function, for the
synchronous proxy's tests that need to shape the function's answer themselves."""

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.gateway.helpers import Handler


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., Awaitable[str]]]:
    """``url = await serve(handler, **server_options)``: an aiohttp app answering every method
    and path; ``server_options`` go to aiohttp's request handler (e.g. auto_decompress)."""
    servers: list[TestServer] = []

    async def start(handler: Handler, **server_options: Any) -> str:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handler)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server(**server_options)
        servers.append(server)
        return str(server.make_url("")).rstrip("/")

    yield start
    for server in servers:
        await server.close()
