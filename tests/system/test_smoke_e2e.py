from tests.conftest import stream_message_count
from tests.harness import registry_of


async def test_async_call_reaches_function_and_callback(
    nats_client, recorder, start_gateway, start_worker, http
):
    function = await recorder()
    receiver = await recorder()
    registry = registry_of(echo=function.url)
    gateway = await start_gateway(registry)
    await start_worker(registry)

    async with http.post(
        gateway.url("/async-function/echo/sub?x=1"),
        data=b"payload",
        headers={"X-Callback-Url": receiver.url + "/cb", "Content-Type": "text/plain"},
    ) as response:
        assert response.status == 202
        call_id = (await response.json())["callId"]
        assert response.headers["X-Call-Id"] == call_id

    [callback] = await receiver.wait_for_requests(1)
    assert callback.headers["X-Call-Id"] == call_id
    assert callback.headers["X-Function-Status"] == "200"
    assert callback.body == b"ok"
    [invocation] = function.requests
    assert invocation.path == "/sub"
    assert invocation.query_string == "x=1"
    assert invocation.body == b"payload"
    assert await stream_message_count(nats_client) == 0
