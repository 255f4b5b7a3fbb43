"""What the synchronous proxy's tests share: the shape of a function handler, gateway limits that
leave timeouts to the function, and checks of the gateway's JSON errors and call ids."""

import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web

from tests.harness import RecordedRequest

# Gateway-wide upstream limits far beyond any deadline here, so a 504 can only come from the
# function's own exec_timeout.
LONG_GATEWAY_LIMITS = {"upstream_timeout_s": 600.0, "read_timeout_s": 600.0}
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def echo_responder(request: web.Request, recorded: RecordedRequest) -> web.StreamResponse:
    return web.Response(
        status=200,
        body=b"echo:" + recorded.body,
        headers={"X-Upstream": "yes", "Content-Type": "application/octet-stream"},
    )


def assert_uuid(value: str) -> None:
    assert str(uuid.UUID(value)) == value


async def assert_json_error(response: aiohttp.ClientResponse, status: int) -> dict[str, Any]:
    assert response.status == status
    assert response.content_type == "application/json"
    body = await response.json()
    assert set(body) == {"error", "callId"}
    assert isinstance(body["error"], str)
    assert body["error"]
    assert body["callId"] == response.headers["X-Call-Id"]
    assert "X-Start-Time" in response.headers
    assert "X-Duration-Seconds" in response.headers
    return dict(body)
