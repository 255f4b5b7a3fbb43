"""Reliability: retries with backoff, dead letters and re-queueing, callbacks that survive a
receiver outage, signed callbacks, the callback host policy, cancellation. Real NATS, gateway,
worker and HTTP servers; waits have deadlines.
"""

import asyncio
import base64
import itertools
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict
from nats.aio.client import Client as NatsClient
from standardwebhooks import Webhook, WebhookVerificationError
from yarl import URL

from tests.conftest import (
    StartGateway,
    StartRecorder,
    StartWorker,
    ready_gateway,
    stream_message_count,
)
from tests.harness import (
    DEADLINE_S,
    ROOT,
    RecordedRequest,
    Recorder,
    final_record,
    free_port,
    get_json,
    post_async,
    registry_of,
    wait_until,
)

# Short waits so that retries happen within a test's patience.
FAST_RETRIES: dict[str, Any] = {
    "max_retry_attempts": 10,
    "initial_retry_wait_s": 0.1,
    "max_retry_wait_s": 2.0,
}


class Flaky:
    """Answers 503 (with Retry-After) ``failures`` times per call id, then 200."""

    def __init__(
        self,
        failures: int,
        retry_after: str | None = None,
        status: int = 503,
        per_call: bool = True,
    ) -> None:
        self.failures = failures
        self.retry_after = retry_after
        self.status = status
        self.per_call = per_call  # False: the first ``failures`` calls of any id fail
        self.seen: dict[str, int] = {}

    async def __call__(self, request: web.Request, recorded: RecordedRequest) -> web.Response:
        call_id = recorded.headers.get("X-Call-Id", "") if self.per_call else "all"
        self.seen[call_id] = self.seen.get(call_id, 0) + 1
        if self.seen[call_id] <= self.failures:
            headers = {"Retry-After": self.retry_after} if self.retry_after else {}
            return web.Response(status=self.status, text="not now", headers=headers)
        return web.Response(status=200, text=f"done after {self.seen[call_id]}")


async def test_a_function_answering_503_twice_then_200_is_called_three_times_and_called_back_once(
    recorder: StartRecorder,
    start_gateway: StartGateway,
    start_worker: StartWorker,
    http: aiohttp.ClientSession,
) -> None:
    flaky = Flaky(failures=2, retry_after="1")
    function = await recorder(flaky)
    callbacks = await recorder()
    registry = registry_of(flaky=function.url)
    gateway = await ready_gateway(start_gateway, http, registry)
    worker = await start_worker(registry, **FAST_RETRIES)

    call_id = await post_async(http, gateway, "/async-function/flaky", callbacks.url, data=b"x")
    record = await final_record(http, gateway, call_id)
    assert record["status"] == "succeeded" and record["attempts"] == 3
    assert record["statusCode"] == 200

    calls = function.requests
    assert [r.headers["X-Retry"] for r in calls] == ["1", "2", "3"]
    assert {r.headers["X-Retry-Max"] for r in calls} == {"10"}
    assert {r.headers["X-Call-Id"] for r in calls} == {call_id}
    # Retry-After: 1 beats the 0.1 s minimum wait.
    gaps = [b.received_monotonic - a.received_monotonic for a, b in itertools.pairwise(calls)]
    assert all(gap >= 0.95 for gap in gaps), gaps

    received = await callbacks.wait_for_requests(1, DEADLINE_S)
    await wait_until(lambda: worker.completed == 1, DEADLINE_S, "the call to be acked")
    assert len(received) == 1
    assert received[0].headers["X-Function-Status"] == "200"
    assert received[0].headers["X-Retry"] == "3"
    assert received[0].body == b"done after 3"


async def test_a_400_is_final_at_once_and_kept_as_a_dead_letter(
    recorder: StartRecorder,
    start_gateway: StartGateway,
    start_worker: StartWorker,
    http: aiohttp.ClientSession,
) -> None:
    function = await recorder(Flaky(failures=100, status=400))
    callbacks = await recorder()
    registry = registry_of(strict=function.url)
    gateway = await ready_gateway(start_gateway, http, registry)
    await start_worker(registry, **FAST_RETRIES)
    call_id = await post_async(http, gateway, "/async-function/strict", callbacks.url, data=b"x")
    record = await final_record(http, gateway, call_id)
    assert record["status"] == "failed" and record["statusCode"] == 400
    assert record["attempts"] == 1
    assert len(function.requests) == 1
    [callback] = await callbacks.wait_for_requests(1, DEADLINE_S)
    assert callback.headers["X-Function-Status"] == "400"
    assert callback.headers["X-Retry"] == "1" and callback.headers["X-Retry-Max"] == "10"
    status, letters = await get_json(http, gateway.url("/system/dead-letters"))
    assert status == 200
    assert [letter["callId"] for letter in letters] == [call_id]
    assert letters[0]["statusCode"] == 400 and letters[0]["attempts"] == 1


async def test_exhausted_retries_end_in_a_dead_letter_that_can_be_queued_again(
    recorder: StartRecorder,
    start_gateway: StartGateway,
    start_worker: StartWorker,
    http: aiohttp.ClientSession,
) -> None:
    failing = Flaky(failures=2, status=500, per_call=False)  # fails twice, then works
    function = await recorder(failing)
    callbacks = await recorder()
    other = await recorder()
    registry = registry_of(
        failing={"url": function.url, "annotations": {"com.openfaas.retry.attempts": "2"}},
        other=other.url,
    )
    gateway = await ready_gateway(start_gateway, http, registry)
    await start_worker(registry, **FAST_RETRIES)
    call_id = await post_async(
        http, gateway, "/async-function/failing/p?q=1", callbacks.url, data=b"the request"
    )
    ok_id = await post_async(http, gateway, "/async-function/other", data=b"fine")

    record = await final_record(http, gateway, call_id)
    assert record["status"] == "failed" and record["statusCode"] == 500
    assert record["attempts"] == 2
    assert [r.headers["X-Retry-Max"] for r in function.requests] == ["2", "2"]
    [callback] = await callbacks.wait_for_requests(1, DEADLINE_S)
    assert callback.headers["X-Retry"] == "2" and callback.headers["X-Function-Status"] == "500"

    status, letters = await get_json(http, gateway.url("/system/dead-letters?function=failing"))
    assert status == 200 and [letter["callId"] for letter in letters] == [call_id]
    assert letters[0]["request"]["path"] == "/p" and letters[0]["request"]["bodySize"] == 11
    status, none = await get_json(http, gateway.url("/system/dead-letters?function=other"))
    assert status == 200 and none == []

    async with http.post(gateway.url(f"/system/activations/{call_id}/retry")) as response:
        assert response.status == 202, await response.text()
        body = await response.json()
        new_id = body["callId"]
        assert body["retryOf"] == call_id and new_id != call_id
        assert response.headers["Location"] == f"/system/activations/{new_id}"
    again = await final_record(http, gateway, new_id)
    assert again["status"] == "succeeded" and again["retryOf"] == call_id
    assert function.requests[-1].body == b"the request"
    assert function.requests[-1].path == "/p" and function.requests[-1].query_string == "q=1"

    await final_record(http, gateway, ok_id)
    for target, expected in [(ok_id, 409), (new_id, 409), ("no-such-call", 404)]:
        async with http.post(gateway.url(f"/system/activations/{target}/retry")) as response:
            assert response.status == expected, target


async def test_callbacks_reach_a_receiver_that_was_down_for_20_seconds(
    recorder: StartRecorder,
    start_gateway: StartGateway,
    start_worker: StartWorker,
    http: aiohttp.ClientSession,
) -> None:
    function = await recorder()
    registry = registry_of(echo=function.url)
    gateway = await ready_gateway(start_gateway, http, registry)
    await start_worker(
        registry, callback_initial_wait_s=0.5, callback_max_wait_s=3.0, callback_max_attempts=40
    )
    port = free_port()
    callback_url = f"http://127.0.0.1:{port}/back"
    call_ids = [
        await post_async(http, gateway, "/async-function/echo", callback_url, data=b"x")
        for _ in range(10)
    ]
    await function.wait_for_requests(10, DEADLINE_S)
    down_until = time.monotonic() + 20
    await asyncio.sleep(20)  # the outage itself: nothing to wait for but time

    receiver = Recorder()
    server = TestServer(receiver.app(), host="127.0.0.1", port=port)
    await server.start_server()
    receiver.server = server
    try:
        received = await receiver.wait_for_requests(10, DEADLINE_S)
        assert all(r.received_monotonic >= down_until for r in received)
        assert sorted(r.headers["X-Call-Id"] for r in received) == sorted(call_ids)
        assert len(function.requests) == 10  # each function invoked once
        for call_id in call_ids:
            record = await final_record(http, gateway, call_id)

            async def delivered(call_id: str = call_id) -> bool:
                _, record = await get_json(http, gateway.url(f"/system/activations/{call_id}"))
                return bool(record["callback"]["state"] == "delivered")

            await wait_until(delivered, DEADLINE_S, "callback state delivered")
            assert record["attempts"] == 1
    finally:
        await server.close()


# Standard Webhooks secrets: whsec_ and the base64 of the key.
NEW_SECRET = "whsec_" + base64.b64encode(bytes(range(32))).decode()
OLD_SECRET = "whsec_" + base64.b64encode(bytes(range(64, 96))).decode()
UNKNOWN_SECRET = "whsec_" + base64.b64encode(bytes(32)).decode()
BOUND_HEADERS = ("X-Call-Id", "X-Function-Name", "X-Function-Status")


async def _echo_body(request: web.Request, recorded: RecordedRequest) -> web.Response:
    return web.Response(body=recorded.body, content_type="application/json")


async def test_callbacks_are_signed_as_standard_webhooks_bound_to_call_function_and_status(
    recorder: StartRecorder,
    start_gateway: StartGateway,
    start_worker: StartWorker,
    http: aiohttp.ClientSession,
) -> None:
    function = await recorder(_echo_body)
    callbacks = await recorder(Flaky(1))  # every callback is refused once, then taken
    registry = registry_of(echo=function.url)
    gateway = await ready_gateway(start_gateway, http, registry)
    # A secret being rotated: the new one and the old, both sign.
    await start_worker(registry, callback_signing_secret=f"{NEW_SECRET}, {OLD_SECRET}")
    call_id = await post_async(
        http, gateway, "/async-function/echo", callbacks.url, data=b'{"result": "done"}'
    )
    await callbacks.wait_for_requests(2, DEADLINE_S)
    refused, delivered = callbacks.by_call_id()[call_id]
    verify = documented_verify()
    for attempt in (refused, delivered):
        # Each attempt is signed anew under the same id, which binds call, function and status.
        assert attempt.headers.getall("webhook-id") == [f"{call_id}:echo:200"]
        assert len(attempt.headers.getall("webhook-signature")) == 1
        assert [sig[:3] for sig in attempt.headers["webhook-signature"].split(" ")] == ["v1,"] * 2
        for secret in (NEW_SECRET, OLD_SECRET):
            assert verify(secret, attempt.headers, attempt.body)
            # A receiver written with the standardwebhooks package, unchanged.
            assert Webhook(secret).verify(attempt.body, attempt.headers) == {"result": "done"}
    body, headers = delivered.body, delivered.headers

    def forged(**changes: str) -> CIMultiDict[str]:
        copy = CIMultiDict(headers)
        for name, value in changes.items():
            copy[name.replace("_", "-")] = value
        return copy

    # Replayed as another call, function or status: with only the plain headers changed the
    # signature still fits, but they no longer say what the signed webhook-id says ...
    for name, value in [
        ("X-Call-Id", "someone-elses-call"),
        ("X-Function-Name", "payments"),
        ("X-Function-Status", "201"),
    ]:
        assert not verify(NEW_SECRET, forged(**{name.replace("-", "_"): value}), body), name
        # ... and with webhook-id changed to match, the signature no longer fits.
        fields = dict(zip(BOUND_HEADERS, headers["webhook-id"].split(":"), strict=True))
        fields[name] = value
        replay = forged(**{name.replace("-", "_"): value}, webhook_id=":".join(fields.values()))
        assert not verify(NEW_SECRET, replay, body), name
        with pytest.raises(WebhookVerificationError):
            Webhook(NEW_SECRET).verify(body, replay)
    assert not verify(NEW_SECRET, headers, body + b" ")
    assert not verify(UNKNOWN_SECRET, headers, body)
    # A callback signed with the right key, an hour ago: a replay.
    an_hour_ago = int(headers["webhook-timestamp"]) - 3600
    stale = forged(
        webhook_timestamp=str(an_hour_ago),
        webhook_signature=Webhook(NEW_SECRET).sign(
            headers["webhook-id"], datetime.fromtimestamp(an_hour_ago, UTC), body.decode()
        ),
    )
    assert not verify(NEW_SECRET, stale, body)

    # A client may choose the body (echo) so that the signed text splits another way, with a
    # fresh timestamp of its own inside; the signature then fits a shorter body, which the
    # package alone accepts, and the documented check of the three fields does not.
    own_timestamp = str(int(time.time()))
    shifted_call = await post_async(
        http,
        gateway,
        "/async-function/echo",
        callbacks.url,
        data=own_timestamp.encode() + b'.{"paid": true}',
    )
    await callbacks.wait_for_requests(4, DEADLINE_S)
    signed = callbacks.by_call_id()[shifted_call][-1]
    shifted_id = f"{signed.headers['webhook-id']}.{signed.headers['webhook-timestamp']}"
    shifted = CIMultiDict(signed.headers)
    shifted["webhook-id"] = shifted_id
    shifted["webhook-timestamp"] = own_timestamp
    shifted["X-Function-Status"] = shifted_id.split(":")[2]
    assert Webhook(NEW_SECRET).verify(b'{"paid": true}', shifted) == {"paid": True}
    assert not verify(NEW_SECRET, shifted, b'{"paid": true}')


def documented_verify() -> Callable[..., bool]:
    """The receiver's verifier as docs/api.md shows it ("Signed callbacks"), run as printed."""
    text = (ROOT / "docs" / "api.md").read_text()
    start = text.rindex("```python\n", 0, text.index("\ndef verify(")) + len("```python\n")
    namespace: dict[str, Any] = {}
    exec(text[start : text.index("```", start)], namespace)
    return namespace["verify"]  # type: ignore[no-any-return]


async def test_callbacks_carry_none_of_the_functions_credentials_and_each_of_our_headers_once(
    recorder: StartRecorder,
    start_gateway: StartGateway,
    start_worker: StartWorker,
    http: aiohttp.ClientSession,
) -> None:
    theirs = CIMultiDict(
        [
            ("X-Call-Id", "forged-call"),
            ("X-Function-Name", "payments"),
            ("X-Function-Status", "200"),
            ("X-Duration-Seconds", "0.1"),
            ("X-Retry", "7"),
            ("X-Retry-Max", "7"),
            ("Authorization", "Bearer function-token"),
            ("Cookie", "session=function"),
            ("Set-Cookie", "session=function"),
            ("Set-Cookie2", "old=function"),
            ("Proxy-Foo", "function"),
            ("X-Callback-Url", "http://elsewhere.example/"),
            ("X-Callback-Anything", "function"),
            ("webhook-id", "forged-call:payments:200"),
            ("webhook-timestamp", "1"),
            ("webhook-signature", "v1,Zm9yZ2Vk"),
            ("X-Custom", "kept"),
        ]
    )

    async def answer(request: web.Request, recorded: RecordedRequest) -> web.Response:
        return web.Response(status=500, body=b"boom", content_type="text/plain", headers=theirs)

    function = await recorder(answer)
    callbacks = await recorder()
    registry = registry_of(failing=function.url)
    gateway = await ready_gateway(start_gateway, http, registry)
    await start_worker(
        registry, **{**FAST_RETRIES, "max_retry_attempts": 2}, callback_signing_secret=NEW_SECRET
    )
    call_id = await post_async(http, gateway, "/async-function/failing", callbacks.url)
    [callback] = await callbacks.wait_for_requests(1, DEADLINE_S)
    ours = {
        "X-Call-Id": call_id,
        "X-Function-Name": "failing",
        "X-Function-Status": "500",
        "X-Retry": "2",
        "X-Retry-Max": "2",
        "webhook-id": f"{call_id}:failing:500",
        "Content-Type": "text/plain",
        "X-Custom": "kept",
    }
    for name, value in ours.items():
        assert callback.headers.getall(name) == [value], name
    for name in ("X-Duration-Seconds", "webhook-timestamp", "webhook-signature", "Content-Length"):
        assert len(callback.headers.getall(name)) == 1, name
    assert callback.headers["X-Duration-Seconds"] != "0.1"
    for name in (
        "Authorization",
        "Cookie",
        "Set-Cookie",
        "Set-Cookie2",
        "Proxy-Foo",
        "X-Callback-Url",
        "X-Callback-Anything",
    ):
        assert name not in callback.headers, name
    assert documented_verify()(NEW_SECRET, callback.headers, callback.body)


async def test_callback_urls_to_forbidden_hosts_are_refused_at_enqueue_and_at_send(
    nats_client: NatsClient,
    recorder: StartRecorder,
    start_gateway: StartGateway,
    start_worker: StartWorker,
    http: aiohttp.ClientSession,
) -> None:
    function = await recorder()
    callbacks = await recorder()
    registry = registry_of(echo=function.url)
    gateway = await ready_gateway(start_gateway, http, registry)
    listed = await ready_gateway(
        start_gateway, http, registry, callback_allowed_hosts="hooks.example.com"
    )
    for target, url in [
        (gateway, "http://169.254.169.254/latest/meta-data"),
        (gateway, "http://[fe80::1]/x"),
        (gateway, "http://0.0.0.0:9/x"),
        (gateway, "http://0:9/x"),  # a name for 0.0.0.0
        # IPv6 forms of 169.254.169.254: IPv4-mapped, IPv4-compatible, NAT64, 6to4.
        (gateway, "http://[::ffff:169.254.169.254]/x"),
        (gateway, "http://[::169.254.169.254]/x"),
        (gateway, "http://[64:ff9b::a9fe:a9fe]/x"),
        (gateway, "http://[2002:a9fe:a9fe::1]/x"),
        (listed, callbacks.url + "/x"),
    ]:
        async with http.post(
            target.url("/async-function/echo"), headers={"X-Callback-Url": url}
        ) as response:
            assert response.status == 400, url
            assert "X-Callback-Url" in (await response.json())["error"]
    assert await stream_message_count(nats_client) == 0

    # The worker checks the address it reaches, whatever the gateway let through.
    await start_worker(registry, callback_allowed_hosts="10.0.0.0/8")
    call_id = await post_async(http, gateway, "/async-function/echo", callbacks.url, data=b"x")

    async def callback_failed() -> bool:
        _, record = await get_json(http, gateway.url(f"/system/activations/{call_id}"))
        return bool(record["callback"] and record["callback"]["state"] == "failed")

    await wait_until(callback_failed, DEADLINE_S, "the callback to be refused")
    assert callbacks.requests == []


async def test_a_function_on_its_own_queue_is_served_only_by_that_queues_workers(
    recorder: StartRecorder,
    start_gateway: StartGateway,
    start_worker: StartWorker,
    http: aiohttp.ClientSession,
) -> None:
    slow = await recorder()
    other = await recorder()
    registry = registry_of(
        slow={"url": slow.url, "annotations": {"com.openfaas.queue": "bulk"}},
        other=other.url,
    )
    gateway = await ready_gateway(start_gateway, http, registry)
    default_worker = await start_worker(registry)
    bulk_calls = [await post_async(http, gateway, "/async-function/slow") for _ in range(5)]
    other_calls = [await post_async(http, gateway, "/async-function/other") for _ in range(5)]
    for call_id in other_calls:
        await final_record(http, gateway, call_id)
    # The default queue's worker never takes the bulk queue's calls.
    assert slow.requests == []
    status, record = await get_json(http, gateway.url(f"/system/activations/{bulk_calls[0]}"))
    assert status == 200 and record["status"] == "queued"

    bulk_worker = await start_worker(registry, worker_queue="bulk")
    for call_id in bulk_calls:
        await final_record(http, gateway, call_id)
    assert sorted(r.headers["X-Call-Id"] for r in slow.requests) == sorted(bulk_calls)
    assert (default_worker.completed, bulk_worker.completed) == (5, 5)


async def test_a_function_at_its_max_inflight_holds_no_slot_others_could_use(
    recorder: StartRecorder,
    start_gateway: StartGateway,
    start_worker: StartWorker,
    http: aiohttp.ClientSession,
) -> None:
    running = 0
    most_running = 0
    release = asyncio.Event()

    async def limited_function(request: web.Request, recorded: RecordedRequest) -> web.Response:
        nonlocal running, most_running
        running += 1
        most_running = max(most_running, running)
        await release.wait()
        running -= 1
        return web.Response(text="slow done")

    limited = await recorder(limited_function)
    quick = await recorder()
    registry = registry_of(
        limited={"url": limited.url, "annotations": {"max_inflight": "1"}},
        quick=quick.url,
    )
    gateway = await ready_gateway(start_gateway, http, registry)
    await start_worker(registry, max_inflight=3, defer_wait_s=0.2)
    flood = [await post_async(http, gateway, "/async-function/limited") for _ in range(10)]
    await limited.wait_for_requests(1, DEADLINE_S)
    quick_calls = [await post_async(http, gateway, "/async-function/quick") for _ in range(10)]
    # The flood waits behind its limit of one, and the other function's calls all get through.
    for call_id in quick_calls:
        await final_record(http, gateway, call_id)
    assert len(limited.requests) == 1
    release.set()
    for call_id in flood:
        record = await final_record(http, gateway, call_id)
        assert (
            record["status"] == "succeeded" and record["attempts"] == 1
        )  # deferrals are not attempts
    assert most_running == 1


async def test_callbacks_follow_307_and_308_with_the_body_and_fail_on_other_redirects(
    recorder: StartRecorder,
    start_gateway: StartGateway,
    start_worker: StartWorker,
    http: aiohttp.ClientSession,
) -> None:
    final = await recorder()

    async def redirect(request: web.Request, recorded: RecordedRequest) -> web.Response:
        code = int(request.query["code"])
        return web.Response(status=code, headers={"Location": final.url + f"/moved-{code}"})

    redirecting = await recorder(redirect)
    function = await recorder(lambda request, recorded: _text_response("result"))
    registry = registry_of(echo=function.url)
    gateway = await ready_gateway(start_gateway, http, registry)
    await start_worker(registry)
    ids = {
        code: await post_async(
            http, gateway, "/async-function/echo", f"{redirecting.url}/cb?code={code}"
        )
        for code in (307, 308, 302)
    }
    received = await final.wait_for_requests(2, DEADLINE_S)
    assert sorted(r.path for r in received) == ["/moved-307", "/moved-308"]
    assert all(r.method == "POST" and r.body == b"result" for r in received)

    async def state_of(call_id: str) -> str | None:
        _, record = await get_json(http, gateway.url(f"/system/activations/{call_id}"))
        state = record["callback"]["state"]
        return str(state) if state != "pending" else None

    assert await wait_until(lambda: state_of(ids[307]), DEADLINE_S, "307") == "delivered"
    assert await wait_until(lambda: state_of(ids[302]), DEADLINE_S, "302") == "failed"
    assert len([r for r in redirecting.requests if "302" in r.query_string]) == 1  # final


async def test_a_callback_redirected_to_a_forbidden_address_is_refused_at_that_hop(
    recorder: StartRecorder,
    start_gateway: StartGateway,
    start_worker: StartWorker,
    http: aiohttp.ClientSession,
) -> None:
    landed = await recorder()
    port = landed.url.rsplit(":", 1)[1]

    async def redirect(request: web.Request, recorded: RecordedRequest) -> web.Response:
        return web.Response(status=307, headers={"Location": request.query["to"]})

    redirecting = await recorder(redirect)
    function = await recorder(lambda request, recorded: _text_response("result"))
    registry = registry_of(echo=function.url)
    gateway = await ready_gateway(start_gateway, http, registry)
    await start_worker(registry)
    targets = [
        # "0" is a name the resolver turns into 0.0.0.0, which connects to this host; the
        # socket then reports 127.0.0.1 as its peer, so only the address dialed tells.
        f"http://0:{port}/landed",
        f"http://0.0.0.0:{port}/landed",
        f"http://[::]:{port}/landed",
        "http://169.254.169.254/latest/meta-data",
        "http://[::ffff:169.254.169.254]/latest/meta-data",
        "http://[::169.254.169.254]/latest/meta-data",
        "http://[64:ff9b::a9fe:a9fe]/latest/meta-data",
        "http://[2002:a9fe:a9fe::]/latest/meta-data",
    ]
    for target in targets:
        callback_url = str(URL(redirecting.url + "/cb").with_query(to=target))
        call_id = await post_async(http, gateway, "/async-function/echo", callback_url)

        async def settled(call_id: str = call_id) -> str | None:
            _, record = await get_json(http, gateway.url(f"/system/activations/{call_id}"))
            state = record["callback"]["state"]
            return str(state) if state != "pending" else None

        assert await wait_until(settled, DEADLINE_S, target) == "failed", target
        assert landed.requests == [], target
    assert len(redirecting.requests) == len(targets)  # each first hop was reached, once


async def _text_response(text: str) -> web.Response:
    return web.Response(text=text)
