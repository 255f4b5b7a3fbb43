"""What several of the gateway's test files share: for the synchronous proxy, the shape of a
function handler, gateway limits that leave timeouts to the function, and checks of the gateway's
JSON errors and call ids; for activation records, reading records and listings, and a function
that answers the status it is asked for."""

import inspect
import json
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web

from tests.conftest import RunningGateway
from tests.harness import DEADLINE_S, RecordedRequest, get_json, wait_until

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
    """A generated call id: a version 4 UUID as 32 lower-case hex characters."""
    assert uuid.UUID(value).hex == value
    assert uuid.UUID(value).version == 4


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


async def record_of(http: aiohttp.ClientSession, gateway: RunningGateway, call_id: str) -> Any:
    status, record = await get_json(http, gateway.url(f"/system/activations/{call_id}"))
    assert status == 200, record
    return record


async def wait_for_status(
    http: aiohttp.ClientSession, gateway: RunningGateway, call_id: str, *statuses: str
) -> Any:
    async def reached() -> Any:
        record = await record_of(http, gateway, call_id)
        return record if record["status"] in statuses else None

    return await wait_until(reached, DEADLINE_S, f"{call_id} to be {' or '.join(statuses)}")


async def answer_with_status(request: web.Request, recorded: RecordedRequest) -> web.Response:
    code = int(request.query.get("code", "200"))
    return web.Response(
        status=code, body=json.dumps({"code": code}).encode(), content_type="application/json"
    )


async def listed(http: aiohttp.ClientSession, gateway: RunningGateway, query: str) -> list[Any]:
    status, body = await get_json(http, gateway.url(f"/system/activations{query}"))
    assert status == 200, body
    assert isinstance(body, list)
    return body


def handler_of(gateway: RunningGateway, path: str, method: str) -> Any:
    """The object whose bound method serves ``method`` on ``path`` (a route of gateway/app.py:
    the handlers sit in the route wrapper's closure)."""
    for route in gateway.app.router.routes():
        if route.resource is not None and route.resource.canonical == path:
            handlers = inspect.getclosurevars(route.handler).nonlocals["handlers"]
            return handlers[method].__self__
    raise AssertionError(f"no route {path}")
