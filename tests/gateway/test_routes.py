"""Routing details the schemathesis run (tests/system/test_openapi.py) found wrong, one test
each."""

import aiohttp
import pytest
from nats.aio.client import Client as NatsClient
from yarl import URL

from faas_gateway.core.call import QueuedCall
from tests.conftest import RunningGateway, ready_gateway, stream_message_count
from tests.harness import registry_of, wait_until


def raw_url(gateway: RunningGateway, path: str) -> URL:
    return URL(gateway.url("/")).join(URL(path, encoded=True))


async def test_a_sub_path_with_an_encoded_newline_reaches_the_function(
    recorder, start_gateway, http
):
    # aiohttp decodes %0A before matching, and `.*` stopped at the newline: no route matched,
    # and the catch-all did not either, so the client got aiohttp's plain-text 404.
    function = await recorder()
    gateway = await start_gateway(registry_of(echo=function.url))

    async with http.get(raw_url(gateway, "/function/echo/a%0Ab/c")) as response:
        assert response.status == 200
        assert "X-Call-Id" in response.headers

    assert [r.path for r in function.requests] == ["/a%0Ab/c"]


async def test_an_async_sub_path_with_an_encoded_newline_is_queued(
    recorder, start_gateway, http, nats_client: NatsClient
):
    function = await recorder()
    gateway = await ready_gateway(start_gateway, http, registry_of(echo=function.url))

    async with http.post(raw_url(gateway, "/async-function/echo/a%0Ab")) as response:
        assert response.status == 202

    await wait_until(
        lambda: stream_message_count(nats_client), 10.0, "the call to be in the stream"
    )
    msg = await nats_client.jetstream().get_msg("faas-async", 1)
    assert QueuedCall.decode(msg.data or b"").path == "/a%0Ab"


async def test_an_unknown_path_with_an_encoded_newline_gets_the_json_404(start_gateway, http):
    gateway = await start_gateway(registry_of())

    async with http.get(raw_url(gateway, "/no%0Aroute")) as response:
        assert response.status == 404
        assert response.content_type == "application/json"
        assert (await response.json())["error"] == "no route /no\nroute"


@pytest.mark.parametrize(
    ("path", "allow"),
    [("/async-function/echo", "DELETE, POST"), ("/async-function/echo/sub", "POST")],
)
async def test_405_on_async_function_lists_delete_where_it_cancels(
    path, allow, recorder, start_gateway, http
):
    # DELETE /async-function/{callId} cancels a call, so Allow on that path names DELETE too.
    function = await recorder()
    gateway = await start_gateway(registry_of(echo=function.url))

    async with http.get(gateway.url(path)) as response:
        assert response.status == 405
        assert response.headers["Allow"] == allow


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
async def test_retry_route_answers_other_methods_405_not_no_route(
    method, start_gateway, http: aiohttp.ClientSession
):
    # The route was POST-only, so any other method fell through to the catch-all's 404.
    gateway = await start_gateway(registry_of())

    async with http.request(method, gateway.url("/system/activations/some-id/retry")) as response:
        assert response.status == 405
        assert response.headers["Allow"] == "POST"
        assert await response.json() == {
            "error": "/system/activations/some-id/retry accepts POST only",
            "callId": None,
        }
