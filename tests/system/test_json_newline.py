"""Every JSON body the gateway and the worker make ends with a newline, so that curl's output
of one call does not run into the next prompt. A finished call's result is the function's
body as it sent it, untouched."""

import asyncio
import json

import aiohttp
from aiohttp import web

from tests.conftest import ready_gateway
from tests.harness import RecordedRequest, free_port, registry_of, wait_until

WAIT_S = 30.0


async def body_of(http: aiohttp.ClientSession, method: str, url: str) -> tuple[int, bytes]:
    async with http.request(method, url) as response:
        assert response.content_type == "application/json", (method, url, response.content_type)
        return response.status, await response.read()


async def test_json_bodies_of_the_gateway_and_the_worker_end_with_a_newline(
    recorder, start_gateway, start_worker, http
):
    release = asyncio.Event()

    async def function(request: web.Request, recorded: RecordedRequest) -> web.Response:
        if recorded.query_string == "hold":
            await release.wait()
        if recorded.query_string == "fail":
            return web.Response(status=400, body=b"no newline here", content_type="text/plain")
        return web.Response(
            body=b'{"the function":"as it sent it"}', content_type="application/json"
        )

    upstream = await recorder(function)
    registry = registry_of(fn=upstream.url, gone=f"http://127.0.0.1:{free_port()}")
    gateway = await ready_gateway(start_gateway, http, registry, sync_async_after_s=0.2)
    worker = await start_worker(registry)
    worker_url = f"http://127.0.0.1:{worker.status_port}"
    bodies: dict[str, bytes] = {}

    status, bodies["202 accepted"] = await body_of(http, "POST", gateway.url("/async-function/fn"))
    assert status == 202
    call_id = json.loads(bodies["202 accepted"])["callId"]

    async def finished() -> bool:
        status, body = await body_of(http, "GET", gateway.url(f"/system/activations/{call_id}"))
        bodies["record"] = body
        return status == 200 and b'"succeeded"' in body

    await wait_until(finished, WAIT_S, "the call to finish")
    # The result is the function's body, not one of ours: no newline added.
    async with http.get(gateway.url(f"/system/activations/{call_id}/result")) as response:
        assert await response.read() == b'{"the function":"as it sent it"}'

    status, bodies["failed"] = await body_of(http, "POST", gateway.url("/async-function/fn?fail"))
    failed_id = json.loads(bodies["failed"])["callId"]

    async def letter() -> bool:
        status, body = await body_of(http, "GET", gateway.url("/system/dead-letters"))
        bodies["dead letters"] = body
        return status == 200 and failed_id.encode() in body

    await wait_until(letter, WAIT_S, "the dead letter")
    status, bodies["retry"] = await body_of(
        http, "POST", gateway.url(f"/system/activations/{failed_id}/retry")
    )
    assert status == 202
    status, bodies["listing"] = await body_of(http, "GET", gateway.url("/system/activations"))
    assert status == 200

    # The worker's own body for a function it could not reach, kept as the call's result.
    status, body = await body_of(http, "POST", gateway.url("/async-function/gone"))
    gone_id = json.loads(body)["callId"]

    async def unreachable() -> bool:
        async with http.get(gateway.url(f"/system/activations/{gone_id}/result")) as response:
            bodies["unreachable result"] = await response.read()
            return response.status == 502

    await wait_until(unreachable, WAIT_S, "the unreachable function's outcome")

    # A sync call that turns async: 202 with its record.
    task = asyncio.create_task(body_of(http, "POST", gateway.url("/function/fn?hold")))
    status, bodies["turned async"] = await task
    assert status == 202
    release.set()
    status, bodies["cancel"] = await body_of(
        http, "DELETE", gateway.url(f"/async-function/{failed_id}")
    )
    status, bodies["404 no route"] = await body_of(http, "GET", gateway.url("/no/such/route"))
    assert status == 404
    status, bodies["404 function"] = await body_of(http, "POST", gateway.url("/function/nope"))
    assert status == 404
    status, bodies["gateway health"] = await body_of(http, "GET", gateway.url("/healthz"))
    assert status == 200
    status, bodies["worker health"] = await body_of(http, "GET", f"{worker_url}/healthz")
    assert status == 200
    status, bodies["openapi"] = await body_of(http, "GET", gateway.url("/openapi.json"))
    # The management API (faas-cli's) and the OpenWhisk API, errors included.
    status, bodies["functions"] = await body_of(http, "GET", gateway.url("/system/functions"))
    status, bodies["info"] = await body_of(http, "GET", gateway.url("/system/info"))
    status, bodies["501 logs"] = await body_of(http, "GET", gateway.url("/system/logs"))
    assert status == 501
    whisk = "/api/v1/namespaces/_/actions"
    status, bodies["whisk actions"] = await body_of(http, "GET", gateway.url(whisk))
    status, bodies["whisk 404"] = await body_of(http, "GET", gateway.url(f"{whisk}/nope"))
    assert status == 404
    status, bodies["whisk invoke"] = await body_of(http, "POST", gateway.url(f"{whisk}/fn"))
    assert status == 202

    without_newline = [name for name, body in bodies.items() if not body.endswith(b"\n")]
    assert not without_newline, {name: bodies[name][-80:] for name in without_newline}
    # One line each: the newline is added once, not to a body that had one.
    assert all(body.count(b"\n") == 1 for name, body in bodies.items() if name != "openapi")
