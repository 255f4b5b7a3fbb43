"""The management API (/system/functions, /system/function/{name}, /system/info,
/system/namespaces), its registry in a NATS key-value bucket watched by every gateway and
worker, annotations that set timeouts and retries, and 429 over a function's max_inflight.
Real NATS, gateways, worker and HTTP servers.
"""

import asyncio
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from nats.aio.client import Client as NatsClient
from nats.js.errors import NoKeysError

from faas_gateway.nats import buckets
from tests.conftest import StartGateway, StartRecorder, StartWorker, ready_gateway
from tests.harness import NatsServer, RecordedRequest, get_json, registry_of, wait_until

DEADLINE_S = 15.0


def deployment(name: str, url: str, **fields: Any) -> dict[str, Any]:
    return {"service": name, "image": f"example/{name}:1", "url": url, **fields}


async def send(
    http: aiohttp.ClientSession, method: str, url: str, body: Any = None, **kwargs: Any
) -> tuple[int, Any, aiohttp.typedefs.LooseHeaders]:
    async with http.request(method, url, json=body, **kwargs) as response:
        text = await response.text()
        document = None
        if response.content_type == "application/json" and text:
            document = await response.json()
        return response.status, document, response.headers


async def deployed_keys(nats_client: NatsClient) -> list[str]:
    bucket = await nats_client.jetstream().key_value("faas-functions")
    try:
        return sorted(await bucket.keys())
    except NoKeysError:
        return []


async def test_deploy_list_get_invoke_update_and_delete_with_openfaas_fields(
    start_gateway: StartGateway,
    recorder: StartRecorder,
    http: aiohttp.ClientSession,
) -> None:
    function = await recorder()
    gateway = await ready_gateway(start_gateway, http, registry_of(fromfile=function.url))

    status, body, headers = await send(
        http,
        "POST",
        gateway.url("/system/functions"),
        deployment(
            "api-echo",
            function.url,
            envVars={"MODE": "test"},
            labels={"team": "a"},
            annotations={"topic": "orders"},
            limits={"memory": "128Mi"},
            network="func_functions",  # older OpenFaaS clients send these two
            registryAuth="c2VjcmV0",
        ),
    )
    assert status == 202, body
    assert "registryAuth" not in body and "network" not in body
    assert headers["Location"] == "/system/function/api-echo"
    assert body["name"] == "api-echo"
    assert body["url"] == function.url
    assert body["image"] == "example/api-echo:1"
    assert body["envVars"] == {"MODE": "test"}
    assert body["labels"] == {"team": "a"}
    assert body["limits"] == {"memory": "128Mi"}
    assert body["namespace"] == "openfaas-fn"
    assert body["source"] == "api"
    assert body["replicas"] == 1 and body["availableReplicas"] == 1
    created_at = body["createdAt"]

    status, listed = await get_json(http, gateway.url("/system/functions"))
    assert status == 200
    assert [(f["name"], f["source"]) for f in listed] == [("api-echo", "api"), ("fromfile", "file")]

    async with http.post(gateway.url("/function/api-echo/x?y=1"), data=b"hi") as response:
        assert response.status == 200
    assert function.requests[-1].path == "/x" and function.requests[-1].body == b"hi"
    async with http.post(gateway.url("/function/api-echo.openfaas-fn"), data=b"ns") as response:
        assert response.status == 200  # OpenFaaS's name.namespace form

    status, one = await get_json(http, gateway.url("/system/function/api-echo"))
    assert status == 200
    assert one["invocationCount"] == 2
    assert one["annotations"] == {"topic": "orders"}

    status, body, _ = await send(
        http,
        "PUT",
        gateway.url("/system/functions"),
        deployment("api-echo", function.url, annotations={"topic": "invoices"}),
    )
    assert status == 200, body
    assert body["annotations"] == {"topic": "invoices"}
    assert body["envVars"] == {}  # an update replaces the deployment, as in OpenFaaS
    assert body["createdAt"] == created_at

    status, body, _ = await send(
        http, "DELETE", gateway.url("/system/functions"), {"functionName": "api-echo"}
    )
    assert status == 200, body
    status, body = await get_json(http, gateway.url("/system/function/api-echo"))
    assert status == 404, body
    async with http.post(gateway.url("/function/api-echo"), data=b"gone") as response:
        assert response.status == 404
    status, listed = await get_json(http, gateway.url("/system/functions"))
    assert [f["name"] for f in listed] == ["fromfile"]


async def test_bad_requests_get_clear_errors_and_change_nothing(
    start_gateway: StartGateway,
    recorder: StartRecorder,
    http: aiohttp.ClientSession,
    nats_client: NatsClient,
) -> None:
    function = await recorder()
    gateway = await ready_gateway(start_gateway, http, registry_of(fromfile=function.url))
    url = gateway.url("/system/functions")
    status, _, _ = await send(http, "POST", url, deployment("kept", function.url))
    assert status == 202

    cases: list[tuple[str, Any, int, str]] = [
        ("POST", {"service": "nourl"}, 400, "url"),
        ("POST", deployment("a.b", function.url), 400, "service"),
        ("POST", deployment("bad-url", "ftp://x"), 400, "url"),
        ("POST", {**deployment("typo", function.url), "annotation": {}}, 400, "annotation"),
        ("POST", deployment("ns", function.url, namespace="other"), 400, "namespace"),
        ("POST", deployment("lim", function.url, annotations={"max_inflight": "0"}), 400, "max"),
        ("POST", deployment("slow", function.url, envVars={"exec_timeout": "soon"}), 400, "dur"),
        (
            "POST",
            deployment("r", function.url, annotations={"com.openfaas.retry.codes": "x"}),
            400,
            "retry",
        ),
        (
            "POST",
            deployment("huge", function.url, annotations={"com.openfaas.retry.min_wait": "1e300"}),
            400,
            "at most 24h",
        ),
        (
            "POST",
            deployment("many", function.url, annotations={"com.openfaas.retry.attempts": "1001"}),
            400,
            "1 to 1000",
        ),
        ("POST", deployment("kept", function.url), 409, "already exists"),
        ("POST", deployment("fromfile", function.url), 409, "functions file"),
        ("PUT", deployment("missing", function.url), 404, "not found"),
        ("PUT", deployment("fromfile", function.url), 409, "functions file"),
        ("DELETE", {"functionName": "missing"}, 404, "not found"),
        ("DELETE", {"functionName": "fromfile"}, 409, "functions file"),
        ("DELETE", {"name": "kept"}, 400, "functionName"),
        ("DELETE", {"functionName": "kept", "namespace": "other"}, 400, "namespace"),
    ]
    for method, body, expected_status, expected_words in cases:
        status, error, _ = await send(http, method, url, body)
        assert status == expected_status, (method, body, error)
        assert expected_words.lower() in error["error"].lower(), (method, body, error)

    async with http.post(url, data=b"{not json") as response:
        assert response.status == 400
        assert "not valid JSON" in (await response.json())["error"]
    async with http.post(url, data=b"x" * (65 * 1024)) as response:
        assert response.status == 413
    async with http.patch(url, json={}) as response:
        assert response.status == 405
        assert response.headers["Allow"] == "GET, POST, PUT, DELETE"
    status, error = await get_json(http, gateway.url("/system/functions?namespace=other"))
    assert status == 400 and "namespace" in error["error"]
    status, error = await get_json(http, gateway.url("/system/function/no-such"))
    assert status == 404

    assert await deployed_keys(nats_client) == ["kept"]


async def test_a_function_deployed_through_one_gateway_is_served_by_all_and_deleted_everywhere(
    start_gateway: StartGateway,
    start_worker: StartWorker,
    recorder: StartRecorder,
    http: aiohttp.ClientSession,
) -> None:
    function = await recorder()
    one = await ready_gateway(start_gateway, http, registry_of())
    other = await ready_gateway(start_gateway, http, registry_of())
    await start_worker(registry_of())

    status, body, _ = await send(
        http, "POST", one.url("/system/functions"), deployment("shared", function.url)
    )
    assert status == 202, body

    async def served_by_other() -> bool:
        async with http.post(other.url("/function/shared"), data=b"sync") as response:
            return response.status == 200

    await wait_until(served_by_other, DEADLINE_S, "the other gateway to serve the new function")
    async with http.post(other.url("/async-function/shared"), data=b"async") as response:
        assert response.status == 202
        call_id = response.headers["X-Call-Id"]
    await wait_until(
        lambda: call_id in function.by_call_id(), DEADLINE_S, "the worker to run the async call"
    )

    status, body, _ = await send(
        http, "DELETE", other.url("/system/functions"), {"functionName": "shared"}
    )
    assert status == 200, body

    async def gone_from_first() -> bool:
        async with http.post(one.url("/function/shared"), data=b"x") as response:
            return response.status == 404

    await wait_until(gone_from_first, DEADLINE_S, "the first gateway to forget the function")
    async with http.post(one.url("/async-function/shared"), data=b"x") as response:
        assert response.status == 404


async def test_the_registry_watch_starts_again_after_nats_restarts(
    start_gateway: StartGateway,
    recorder: StartRecorder,
    http: aiohttp.ClientSession,
    nats_server: NatsServer,
) -> None:
    function = await recorder()
    one = await ready_gateway(start_gateway, http, registry_of())
    other = await ready_gateway(start_gateway, http, registry_of())
    status, _, _ = await send(
        http, "POST", one.url("/system/functions"), deployment("before", function.url)
    )
    assert status == 202

    nats_server.kill()
    await nats_server.restart()

    async def deployed_after_restart() -> bool:
        status, _, _ = await send(
            http, "POST", one.url("/system/functions"), deployment("after", function.url)
        )
        return status == 202

    await wait_until(deployed_after_restart, DEADLINE_S, "a deploy to work after the restart")

    async def other_knows_both() -> bool:
        status, listed = await get_json(http, other.url("/system/functions"))
        return status == 200 and {f["name"] for f in listed} == {"before", "after"}

    await wait_until(other_knows_both, DEADLINE_S, "the other gateway to see both functions")


async def test_annotations_set_a_deployed_functions_timeout_and_retries(
    start_gateway: StartGateway,
    start_worker: StartWorker,
    recorder: StartRecorder,
    http: aiohttp.ClientSession,
) -> None:
    release = asyncio.Event()

    async def stuck(request: web.Request, recorded: RecordedRequest) -> web.StreamResponse:
        await release.wait()
        return web.Response(body=b"late")

    answers = iter([503, 503])

    async def flaky(request: web.Request, recorded: RecordedRequest) -> web.StreamResponse:
        return web.Response(status=next(answers, 200), body=b"flaky")

    slow, unreliable = await recorder(stuck), await recorder(flaky)
    gateway = await ready_gateway(start_gateway, http, registry_of())
    await start_worker(registry_of(), initial_retry_wait_s=0.05, max_retry_wait_s=0.1)
    for body in (
        deployment("slow", slow.url, annotations={"exec_timeout": "1s"}),
        deployment(
            "flaky",
            unreliable.url,
            annotations={"com.openfaas.retry.attempts": "3", "com.openfaas.retry.codes": "503"},
        ),
    ):
        status, error, _ = await send(http, "POST", gateway.url("/system/functions"), body)
        assert status == 202, error

    try:
        async with http.post(gateway.url("/function/slow"), data=b"x") as response:
            assert response.status == 504  # the annotation's 1 s, not the 60 s default
    finally:
        release.set()

    async with http.post(gateway.url("/async-function/flaky"), data=b"x") as response:
        assert response.status == 202
        call_id = response.headers["X-Call-Id"]

    async def succeeded() -> bool:
        status, record = await get_json(http, gateway.url(f"/system/activations/{call_id}"))
        return status == 200 and record["status"] == "succeeded"

    await wait_until(succeeded, DEADLINE_S, "the call to succeed on its third attempt")
    assert len(unreliable.by_call_id()[call_id]) == 3  # the worker's own setting allows 1


async def test_a_sync_call_over_max_inflight_gets_429_with_retry_after(
    start_gateway: StartGateway,
    recorder: StartRecorder,
    http: aiohttp.ClientSession,
) -> None:
    release = asyncio.Event()

    async def held(request: web.Request, recorded: RecordedRequest) -> web.StreamResponse:
        await release.wait()
        return web.Response(body=b"done")

    function = await recorder(held)
    registry = registry_of(limited={"url": function.url, "annotations": {"max_inflight": "1"}})
    gateway = await ready_gateway(start_gateway, http, registry)

    first = asyncio.create_task(http.post(gateway.url("/function/limited"), data=b"1"))
    await function.wait_for_requests(1)
    async with http.post(gateway.url("/function/limited"), data=b"2") as response:
        assert response.status == 429
        assert response.headers["Retry-After"] == "1"
        assert "max_inflight" in (await response.json())["error"]
    release.set()
    async with await first as response:
        assert response.status == 200
    async with http.post(gateway.url("/function/limited"), data=b"3") as response:
        assert response.status == 200
    assert [r.body for r in function.requests] == [b"1", b"3"]


async def test_info_namespaces_and_service_count(
    start_gateway: StartGateway,
    recorder: StartRecorder,
    http: aiohttp.ClientSession,
) -> None:
    function = await recorder()
    gateway = await ready_gateway(start_gateway, http, registry_of(fromfile=function.url))
    status, info = await get_json(http, gateway.url("/system/info"))
    assert status == 200
    assert info["provider"]["provider"] == "faas-gateway"
    assert info["provider"]["orchestration"] == "nats"
    assert info["version"]["release"] and info["version"]["sha"]
    assert info["arch"]
    status, namespaces = await get_json(http, gateway.url("/system/namespaces"))
    assert (status, namespaces) == (200, ["openfaas-fn"])

    await send(http, "POST", gateway.url("/system/functions"), deployment("extra", function.url))

    async def metrics() -> str:
        async with http.get(gateway.url("/metrics")) as response:
            return await response.text()

    text = await metrics()
    assert 'gateway_service_count{function_name="fromfile"} 1.0' in text
    assert 'gateway_service_count{function_name="extra"} 1.0' in text
    await send(http, "DELETE", gateway.url("/system/functions"), {"functionName": "extra"})
    assert 'gateway_service_count{function_name="extra"}' not in await metrics()


async def test_a_watch_whose_consumer_vanished_catches_up_at_its_next_resync(
    start_gateway: StartGateway,
    recorder: StartRecorder,
    http: aiohttp.ClientSession,
    nats_client: NatsClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(buckets, "RESYNC_EVERY_S", 0.5)
    function = await recorder()
    one = await ready_gateway(start_gateway, http, registry_of())
    other = await ready_gateway(start_gateway, http, registry_of())
    js = nats_client.jetstream()
    # Lost without a disconnect, as when a cluster moves the consumer away: nothing more
    # arrives through these watches, and nats-py does not notice.
    for consumer in await js.consumers_info("KV_faas-functions"):
        await js.delete_consumer("KV_faas-functions", consumer.name)
    status, _, _ = await send(
        http, "POST", one.url("/system/functions"), deployment("late", function.url)
    )
    assert status == 202

    async def other_serves_it() -> bool:
        async with http.post(other.url("/function/late"), data=b"x") as response:
            return response.status == 200

    await wait_until(other_serves_it, DEADLINE_S, "the other gateway's resync")
