"""A call id belongs to one call: a client-chosen X-Call-Id is an idempotency key.

The same request posted again with the same id is the same call (202, never a second run);
any other request with a used id is a 409 with nothing queued or overwritten, inside and after
JetStream's duplicate window, for calls that turned async and for cancelled ids. Cancelling
takes the /system credentials, and the gateway's own credentials never travel with a call.
Real nats-server, gateway, worker, functions and receivers.
"""

import asyncio
import base64
import re
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from nats.aio.client import Client as NatsClient

from gateway.request import new_call_id
from tests.conftest import (
    RunningGateway,
    StartGateway,
    StartRecorder,
    StartWorker,
    ready_gateway,
    stream_message_count,
)
from tests.gateway.helpers import record_of
from tests.harness import RecordedRequest, get_json, registry_of, wait_until

DEADLINE_S = 30.0
ADMIN = {"Authorization": "Basic " + base64.b64encode(b"admin:pw").decode()}


async def post(
    http: aiohttp.ClientSession,
    gateway: RunningGateway,
    path: str,
    data: bytes = b"",
    **headers: str,
) -> tuple[int, dict[str, str], bytes]:
    named = {name.replace("_", "-"): value for name, value in headers.items()}
    async with http.post(gateway.url(path), data=data, headers=named) as response:
        return response.status, dict(response.headers), await response.read()


async def finished(http: aiohttp.ClientSession, gateway: RunningGateway, call_id: str) -> Any:
    async def final() -> Any:
        record = await record_of(http, gateway, call_id)
        return record if record["status"] in ("succeeded", "failed", "cancelled") else None

    return await wait_until(final, DEADLINE_S, f"{call_id} to finish")


def echo_body() -> Callable[[web.Request, RecordedRequest], Awaitable[web.Response]]:
    async def respond(request: web.Request, recorded: RecordedRequest) -> web.Response:
        return web.Response(body=b"result of " + recorded.body, content_type="text/plain")

    return respond


async def test_another_request_cannot_read_a_calls_result_through_its_id(
    recorder: StartRecorder,
    start_gateway: StartGateway,
    start_worker: StartWorker,
    http: aiohttp.ClientSession,
    nats_client: NatsClient,
) -> None:
    function = await recorder(echo_body())
    registry = registry_of(echo=function.url, other=function.url)
    gateway = await ready_gateway(start_gateway, http, registry, duplicate_window_s=1.0)
    await start_worker(registry, duplicate_window_s=1.0)
    status, headers, _ = await post(http, gateway, "/async-function/echo", b"secret")
    assert status == 202
    victim = headers["X-Call-Id"]
    await finished(http, gateway, victim)

    async def attack() -> None:
        for path, body in (("/async-function/echo", b"x"), ("/async-function/other", b"secret")):
            status, _, answer = await post(
                http, gateway, path, body, X_Call_Id=victim, Prefer="wait=5"
            )
            assert status == 409, answer
            assert b"secret" not in answer and b"another call" in answer

    await attack()  # inside JetStream's duplicate window
    accepted_at = time.monotonic()
    await wait_until(lambda: time.monotonic() > accepted_at + 1.5, 5.0, "the window to pass")
    await attack()  # and after it, when only the record knows the id
    assert len(function.requests) == 1
    assert await stream_message_count(nats_client) == 0


async def test_a_sync_call_turning_async_cannot_overwrite_another_calls_record(
    recorder: StartRecorder,
    start_gateway: StartGateway,
    start_worker: StartWorker,
    http: aiohttp.ClientSession,
) -> None:
    function = await recorder(echo_body())
    registry = registry_of(echo=function.url)
    gateway = await ready_gateway(start_gateway, http, registry)
    await start_worker(registry)
    status, headers, _ = await post(http, gateway, "/async-function/echo", b"mine")
    victim = headers["X-Call-Id"]
    before = await finished(http, gateway, victim)

    status, _, answer = await post(
        http, gateway, "/function/echo", b"theirs", X_Call_Id=victim, Prefer="respond-async, wait=0"
    )

    assert status == 409, answer
    assert len(function.requests) == 1  # the attacker's request never reached the function
    assert await record_of(http, gateway, victim) == before
    async with http.get(gateway.url(f"/system/activations/{victim}/result")) as response:
        assert await response.read() == b"result of mine"


async def test_a_used_id_with_another_request_is_a_409_and_nothing_is_queued(
    recorder: StartRecorder,
    start_gateway: StartGateway,
    http: aiohttp.ClientSession,
    nats_client: NatsClient,
) -> None:
    function = await recorder()
    gateway = await ready_gateway(
        start_gateway, http, registry_of(echo=function.url, other=function.url)
    )
    status, _, _ = await post(http, gateway, "/async-function/echo", b"a", X_Call_Id="job-1")
    assert status == 202
    first = await record_of(http, gateway, "job-1")

    different = [
        ("/async-function/other", b"a", {}),  # another function
        ("/async-function/echo", b"b", {}),  # another body
        ("/async-function/echo/sub", b"a", {}),  # another path
        ("/async-function/echo?q=1", b"a", {}),  # another query
        ("/async-function/echo", b"a", {"X_Callback_Url": "http://127.0.0.1:9/cb"}),
    ]
    for path, body, extra in different:
        status, _, answer = await post(http, gateway, path, body, X_Call_Id="job-1", **extra)
        assert status == 409, (path, answer)

    assert await stream_message_count(nats_client) == 1
    assert await record_of(http, gateway, "job-1") == first


async def test_the_same_request_posted_again_is_the_same_call_inside_and_after_the_window(
    recorder: StartRecorder,
    start_gateway: StartGateway,
    start_worker: StartWorker,
    http: aiohttp.ClientSession,
) -> None:
    function = await recorder(echo_body())
    receiver = await recorder()
    registry = registry_of(echo=function.url)
    gateway = await ready_gateway(start_gateway, http, registry, duplicate_window_s=1.0)
    await start_worker(registry, duplicate_window_s=1.0)
    headers = {"X_Call_Id": "pay-7", "X_Callback_Url": receiver.url}
    status, _, _ = await post(http, gateway, "/async-function/echo", b"order", **headers)
    assert status == 202
    await finished(http, gateway, "pay-7")

    status, answered, body = await post(
        http, gateway, "/async-function/echo", b"order", Prefer="wait=5", **headers
    )
    assert (status, body) == (200, b"result of order")  # its result, not a second run
    assert answered["X-Call-Id"] == "pay-7"
    posted_at = time.monotonic()
    await wait_until(lambda: time.monotonic() > posted_at + 1.5, 5.0, "the window to pass")
    status, answered, _ = await post(http, gateway, "/async-function/echo", b"order", **headers)
    assert status == 202 and answered["X-Call-Id"] == "pay-7"

    # A later call shows that nothing more was queued for pay-7.
    status, answered, _ = await post(http, gateway, "/async-function/echo", b"marker")
    await finished(http, gateway, answered["X-Call-Id"])
    assert [r.headers["X-Call-Id"] for r in function.requests] == ["pay-7", answered["X-Call-Id"]]
    assert [r.headers["X-Call-Id"] for r in receiver.requests] == ["pay-7"]


async def test_a_cancelled_id_stays_cancelled_and_another_request_with_it_is_a_409(
    recorder: StartRecorder,
    start_gateway: StartGateway,
    start_worker: StartWorker,
    http: aiohttp.ClientSession,
) -> None:
    function = await recorder()
    registry = registry_of(echo=function.url)
    gateway = await ready_gateway(start_gateway, http, registry)
    status, _, _ = await post(http, gateway, "/async-function/echo", b"a", X_Call_Id="undo-1")
    async with http.delete(gateway.url("/async-function/undo-1")) as response:
        assert response.status == 202

    status, _, answer = await post(http, gateway, "/async-function/echo", b"b", X_Call_Id="undo-1")
    assert status == 409, answer
    status, _, _ = await post(http, gateway, "/async-function/echo", b"a", X_Call_Id="undo-1")
    assert status == 202  # the same call, which stays cancelled
    await start_worker(registry)
    status, answered, _ = await post(http, gateway, "/async-function/echo", b"marker")
    await finished(http, gateway, answered["X-Call-Id"])
    assert [r.headers["X-Call-Id"] for r in function.requests] == [answered["X-Call-Id"]]
    assert (await record_of(http, gateway, "undo-1"))["status"] == "cancelled"


async def test_a_sync_call_that_turned_async_posted_again_is_the_same_call(
    recorder: StartRecorder,
    start_gateway: StartGateway,
    http: aiohttp.ClientSession,
) -> None:
    release = asyncio.Event()

    async def slow(request: web.Request, recorded: RecordedRequest) -> web.Response:
        await release.wait()
        return web.Response(body=b"slow done")

    function = await recorder(slow)
    gateway = await ready_gateway(start_gateway, http, registry_of(slow=function.url))
    prefer = "respond-async, wait=0.2"
    status, _, _ = await post(http, gateway, "/function/slow", b"x", X_Call_Id="s-1", Prefer=prefer)
    assert status == 202
    status, _, body = await post(
        http, gateway, "/function/slow", b"x", X_Call_Id="s-1", Prefer=prefer
    )
    assert status == 202 and b'"running"' in body
    status, _, _ = await post(http, gateway, "/function/slow", b"y", X_Call_Id="s-1", Prefer=prefer)
    assert status == 409
    release.set()
    record = await finished(http, gateway, "s-1")
    assert record["status"] == "succeeded"
    assert len(function.requests) == 1


async def test_a_call_the_queue_refused_frees_its_id(
    recorder: StartRecorder,
    start_gateway: StartGateway,
    start_worker: StartWorker,
    http: aiohttp.ClientSession,
    nats_client: NatsClient,
) -> None:
    """Nothing half-done: a call whose publish was refused leaves no record behind, so the
    client can post it again with the same id once the queue is back."""
    function = await recorder()
    registry = registry_of(echo=function.url)
    gateway = await ready_gateway(start_gateway, http, registry)
    await nats_client.jetstream().delete_stream("faas-async")

    status, _, answer = await post(http, gateway, "/async-function/echo", b"a", X_Call_Id="again-1")
    assert status == 503, answer

    async def record_status() -> int | None:
        status, _ = await get_json(http, gateway.url("/system/activations/again-1"))
        return None if status == 503 else status  # 503 until the stream is set up again

    assert await wait_until(record_status, DEADLINE_S, "the records to answer") == 404

    async def accepted() -> bool:
        status, _, _ = await post(http, gateway, "/async-function/echo", b"a", X_Call_Id="again-1")
        return status == 202

    await wait_until(accepted, DEADLINE_S, "the queue to be set up again")
    await start_worker(registry)
    assert (await finished(http, gateway, "again-1"))["status"] == "succeeded"
    assert [r.headers["X-Call-Id"] for r in function.requests] == ["again-1"]


async def test_cancelling_takes_the_system_credentials_and_answers_only_id_and_status(
    recorder: StartRecorder,
    start_gateway: StartGateway,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    function = await recorder()
    gateway = await ready_gateway(
        start_gateway,
        http,
        registry_of(echo=function.url),
        basic_auth=True,
        secret_mount_path=tmp_path,
        basic_auth_user="admin",
        basic_auth_password="pw",
    )
    secret_url = "http://127.0.0.1:9/cb?token=s3cret"
    _, headers, _ = await post(http, gateway, "/async-function/echo", X_Callback_Url=secret_url)
    call_id = headers["X-Call-Id"]

    async with http.delete(gateway.url(f"/async-function/{call_id}")) as response:
        assert response.status == 401
    async with http.delete(gateway.url(f"/async-function/{call_id}"), headers=ADMIN) as response:
        assert response.status == 202
        assert await response.json() == {"callId": call_id, "status": "cancelled"}


async def test_the_gateways_credentials_never_travel_with_a_call(
    recorder: StartRecorder,
    start_gateway: StartGateway,
    start_worker: StartWorker,
    http: aiohttp.ClientSession,
    nats_client: NatsClient,
    tmp_path: Path,
) -> None:
    async def refuse(request: web.Request, recorded: RecordedRequest) -> web.Response:
        return web.Response(status=400, body=b"no")

    function = await recorder(refuse)
    registry = registry_of(echo=function.url)
    gateway = await ready_gateway(
        start_gateway,
        http,
        registry,
        basic_auth=True,
        basic_auth_invocations=True,
        secret_mount_path=tmp_path,
        basic_auth_user="admin",
        basic_auth_password="pw",
    )
    secret = base64.b64encode(b"admin:pw")
    async with http.post(gateway.url("/function/echo"), data=b"s", headers=ADMIN) as response:
        assert response.status == 400
    async with http.post(gateway.url("/async-function/echo"), data=b"a", headers=ADMIN) as response:
        assert response.status == 202
        call_id = response.headers["X-Call-Id"]
    js = nats_client.jetstream()
    queued = await js.get_last_msg("faas-async", "faas.async.>")
    assert queued.data is not None and secret not in queued.data

    await start_worker(registry)
    await wait_until(lambda: len(function.requests) == 2, DEADLINE_S, "both calls")
    for request in function.requests:
        assert "Authorization" not in request.headers
    letter = await js.get_last_msg("faas-dead-letters", f"faas-dead-letters.{call_id}")
    assert letter.data is not None and secret not in letter.data


def test_generated_call_ids_are_32_hex_characters_of_a_random_version_4_uuid() -> None:
    """122 random bits each: the UUID's version and variant bits are the only fixed ones;
    written without dashes, which is OpenWhisk's form of an activation id."""
    ids = {new_call_id() for _ in range(5000)}
    assert len(ids) == 5000
    uuid4_hex = re.compile(r"[0-9a-f]{12}4[0-9a-f]{3}[89ab][0-9a-f]{15}")
    assert all(uuid4_hex.fullmatch(call_id) for call_id in ids)
