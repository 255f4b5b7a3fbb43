"""A stopping worker hands back at once what it took and did not start.

A message this worker holds but never runs stays with it, for every other worker, until its
lease (``ack_wait``) runs out. So on a stop every such message is nak'd at once: those waiting
for a slot, those taken in the same moment as the stop, and those JetStream delivered to the
worker's pull subscription after its last fetch returned. Each test holds the only running call
on the stopping worker, so that the drain is still going on while the next worker shows the
hand-back: it runs the calls well inside the lease.
"""

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web
from nats.aio.client import Client as NatsClient

from faas_gateway.nats.activations import StoredActivation
from tests.conftest import RunningGateway
from tests.harness import RecordedRequest, Recorder, registry_of, wait_until

WAIT_S = 20.0  # shorter than the lease below: only a nak can hand the calls over in time
ACK_WAIT_S = 60.0


class Gate:
    """A function whose calls wait until the test opens the gate."""

    def __init__(self) -> None:
        self.opened = asyncio.Event()

    async def __call__(self, request: web.Request, recorded: RecordedRequest) -> web.Response:
        await self.opened.wait()
        return web.Response(body=b"done")


@pytest.fixture
async def gate() -> AsyncIterator[Gate]:
    made = Gate()
    yield made
    made.opened.set()  # before the servers close, which waits for their handlers


async def accepted(http: aiohttp.ClientSession, gateway: RunningGateway, function: str) -> str:
    async with http.post(gateway.url(f"/async-function/{function}"), data=b"work") as response:
        body = await response.json()
        assert response.status == 202, body
        return str(body["callId"])


def call_ids(requests: list[RecordedRequest]) -> list[str]:
    return [request.headers["X-Call-Id"] for request in requests]


async def hold_one_call(
    http: aiohttp.ClientSession,
    gateway: RunningGateway,
    held: Recorder,
) -> str:
    call_id = await accepted(http, gateway, "held")
    await held.wait_for_requests(1, WAIT_S)
    return call_id


async def test_calls_taken_as_the_worker_stops_go_to_the_next_worker_at_once(
    gate: Gate,
    recorder: Callable[..., Awaitable[Recorder]],
    start_gateway,
    start_worker,
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
):
    """A stop that comes while the worker reads the records of a batch it just fetched: the
    calls of that batch must neither start here (one slot is free) nor wait for a slot until
    the grace runs out; they go back at once."""
    held = await recorder(gate)
    echo = await recorder()
    registry = registry_of(held=held.url, echo=echo.url)
    gateway = await start_gateway(registry)
    first = await start_worker(
        registry, max_inflight=2, prefetch=4, ack_wait_s=ACK_WAIT_S, shutdown_grace_s=60.0
    )
    running = await hold_one_call(http, gateway, held)

    # The stop lands between the fetch and the start of its calls: in the records' read.
    assert first._activations is not None
    read_records = first._activations.get_many

    async def read_then_stop(call_ids: list[str]) -> dict[str, StoredActivation]:
        records = await read_records(call_ids)
        first.request_stop()
        return records

    monkeypatch.setattr(first._activations, "get_many", read_then_stop)
    queued = [await accepted(http, gateway, "echo") for _ in range(5)]
    await wait_until(first._stopping.is_set, WAIT_S, "the stop during a batch")

    second = await start_worker(registry, ack_wait_s=ACK_WAIT_S)
    await echo.wait_for_requests(5, WAIT_S)
    await wait_until(lambda: second.completed == 5, WAIT_S, "the next worker to finish them")
    assert sorted(call_ids(echo.requests)) == sorted(queued)
    assert first.completed == 0, "a call started on the worker after it was told to stop"
    assert call_ids(held.requests) == [running]
    gate.opened.set()
    await wait_until(lambda: first.completed == 1, WAIT_S, "the held call to finish")
    assert len(echo.requests) == 5


async def test_messages_delivered_after_the_last_fetch_go_back_at_once(
    gate: Gate,
    recorder: Callable[..., Awaitable[Recorder]],
    start_gateway,
    start_worker,
    nats_client: NatsClient,
    http: aiohttp.ClientSession,
):
    """A pull request outlives the fetch that sent it (until its expiry; one buffered while
    NATS was away is sent on reconnect, later still): what JetStream delivers to it waits in
    the worker's subscription for a next fetch, which a stop never makes. Here such a request
    is made the way the worker's Puller makes it, to the worker's own inbox, while the
    worker's only slot is busy and it does not fetch."""
    held = await recorder(gate)
    echo = await recorder()
    registry = registry_of(held=held.url, echo=echo.url)
    gateway = await start_gateway(registry)
    first = await start_worker(
        registry, max_inflight=1, prefetch=0, ack_wait_s=ACK_WAIT_S, shutdown_grace_s=60.0
    )
    await hold_one_call(http, gateway, held)

    puller = first._puller
    assert puller is not None
    # Longer than the batch below, so the request is still open when the worker stops.
    await nats_client.publish(
        "$JS.API.CONSUMER.MSG.NEXT.faas-async.faas-queue-worker",
        json.dumps({"batch": 10, "expires": int(60e9)}).encode(),
        reply=f"{puller._inbox}.stale",
    )
    queued = [await accepted(http, gateway, "echo") for _ in range(3)]
    await wait_until(lambda: len(puller._ready) == 3, WAIT_S, "3 messages left unfetched")

    first.request_stop()
    second = await start_worker(registry, ack_wait_s=ACK_WAIT_S)
    await echo.wait_for_requests(3, WAIT_S)
    await wait_until(lambda: second.completed == 3, WAIT_S, "the next worker to finish them")
    assert sorted(call_ids(echo.requests)) == sorted(queued)
    gate.opened.set()
    await wait_until(lambda: first.completed == 1, WAIT_S, "the held call to finish")
    assert first.interrupted == 0  # the held call finished; only unstarted ones went back
    assert len(echo.requests) == 3
