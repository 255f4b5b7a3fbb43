"""The gateway's metrics for synchronous calls: counted by function and code, with no series
for names that are not functions."""

import asyncio
import uuid

import aiohttp
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import RunningGateway
from tests.gateway.helpers import LONG_GATEWAY_LIMITS
from tests.harness import DEADLINE_S, RecordedRequest, free_port, registry_of


def metric_samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [
        (sample.name, dict(sample.labels), sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


def metric_value(text: str, name: str, **labels: str) -> float | None:
    for sample_name, sample_labels, value in metric_samples(text):
        if sample_name == name and sample_labels == labels:
            return value
    return None


async def metrics_text(http: aiohttp.ClientSession, gateway: RunningGateway) -> str:
    async with http.get(gateway.url("/metrics")) as response:
        assert response.status == 200
        return await response.text()


async def test_metrics_count_calls_by_function_and_code(serve, recorder, start_gateway, http):
    async def responder(request: web.Request, recorded: RecordedRequest) -> web.StreamResponse:
        status = int(request.query.get("status", "200"))
        return web.Response(status=status, body=b"r")

    release = asyncio.Event()

    async def slow(request: web.Request) -> web.StreamResponse:
        await asyncio.wait_for(release.wait(), DEADLINE_S * 2)
        return web.Response(text="late")

    function = await recorder(responder)
    registry = registry_of(
        echo=function.url,
        gone=f"http://127.0.0.1:{free_port()}",
        slow={"url": await serve(slow), "exec_timeout": "0.3s"},
    )
    gateway = await start_gateway(registry, **LONG_GATEWAY_LIMITS)
    try:
        for query, expected in [("", 200), ("", 200), ("?status=201", 201), ("?status=500", 500)]:
            async with http.get(gateway.url(f"/function/echo{query}")) as response:
                assert response.status == expected
                await response.read()
        async with http.get(gateway.url("/function/gone")) as response:
            assert response.status == 502
        async with http.get(gateway.url("/function/slow")) as response:
            assert response.status == 504
    finally:
        release.set()

    text = await metrics_text(http, gateway)
    total = "gateway_function_invocation_total"
    assert metric_value(text, total, function_name="echo", code="200") == 2
    assert metric_value(text, total, function_name="echo", code="201") == 1
    assert metric_value(text, total, function_name="echo", code="500") == 1
    assert metric_value(text, total, function_name="gone", code="502") == 1
    assert metric_value(text, total, function_name="slow", code="504") == 1

    seconds = "gateway_functions_seconds_count"
    assert metric_value(text, seconds, function_name="echo", code="200") == 2
    assert metric_value(text, seconds, function_name="echo", code="201") == 1
    assert metric_value(text, seconds, function_name="slow", code="504") == 1
    echo_sum = metric_value(text, "gateway_functions_seconds_sum", function_name="echo", code="200")
    assert echo_sum is not None
    assert echo_sum >= 0
    inf_bucket = metric_value(
        text, "gateway_functions_seconds_bucket", function_name="echo", code="200", le="+Inf"
    )
    assert inf_bucket == 2

    started = "gateway_function_invocation_started"
    assert metric_value(text, started, function_name="echo") == 4
    assert metric_value(text, started, function_name="gone") == 1
    assert metric_value(text, started, function_name="slow") == 1


async def test_metrics_have_no_series_for_unknown_names(recorder, start_gateway, http):
    function = await recorder()
    gateway = await start_gateway(registry_of(echo=function.url))
    random_names = [f"nosuch-{uuid.uuid4().hex[:12]}" for _ in range(3)]

    for name in random_names:
        async with http.get(gateway.url(f"/function/{name}")) as response:
            assert response.status == 404
    async with http.get(gateway.url("/function/-invalid-name")) as response:
        assert response.status == 400
    async with http.get(gateway.url("/function/echo")) as response:
        assert response.status == 200

    text = await metrics_text(http, gateway)
    for name in [*random_names, "-invalid-name"]:
        assert name not in text
    function_names = {
        labels["function_name"]
        for sample_name, labels, _ in metric_samples(text)
        if "function_name" in labels and sample_name.startswith("gateway_function")
    }
    assert function_names == {"echo", "(unknown)"}
    total = "gateway_function_invocation_total"
    assert metric_value(text, total, function_name="(unknown)", code="404") == 3
    assert metric_value(text, total, function_name="(unknown)", code="400") == 1
    assert metric_value(text, total, function_name="echo", code="200") == 1
    assert metric_value(text, "gateway_function_invocation_started", function_name="echo") == 1
