"""Bounded memory in the gateway: calls that turned async keep their function's max_inflight
place and are bounded per gateway process. Real nats-server, gateway and functions."""

import asyncio

import aiohttp

from tests.conftest import RunningGateway, StartGateway, StartRecorder, ready_gateway
from tests.harness import registry_of, wait_for, wait_until

DEADLINE_S = 30.0


async def statuses_of(
    http: aiohttp.ClientSession, gateway: RunningGateway, path: str, count: int
) -> list[int]:
    async def one() -> int:
        async with http.post(
            gateway.url(path), data=b"x", headers={"Prefer": "respond-async, wait=0"}
        ) as response:
            return response.status

    return sorted(await asyncio.gather(*(one() for _ in range(count))))


async def test_calls_that_turned_async_keep_their_place_in_max_inflight(
    recorder: StartRecorder, start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    release = asyncio.Event()
    function = await recorder(wait_for(release))
    registry = registry_of(single={"url": function.url, "annotations": {"max_inflight": "1"}})
    gateway = await ready_gateway(start_gateway, http, registry)
    try:
        first = await statuses_of(http, gateway, "/function/single", 1)
        assert first == [202]
        # The first call runs on after its 202: the function is at its limit of one.
        assert await statuses_of(http, gateway, "/function/single", 9) == [429] * 9
        assert len(function.requests) == 1
    finally:
        release.set()

    async def free_again() -> bool:
        release.set()
        return await statuses_of(http, gateway, "/function/single", 1) == [202]

    await wait_until(free_again, DEADLINE_S, "the function's place to be free again")


async def test_calls_that_turned_async_are_bounded_per_gateway_process(
    recorder: StartRecorder, start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    release = asyncio.Event()
    function = await recorder(wait_for(release))
    gateway = await ready_gateway(
        start_gateway, http, registry_of(slow=function.url), max_turned_async=3
    )
    try:
        assert await statuses_of(http, gateway, "/function/slow", 3) == [202] * 3
        async with http.post(
            gateway.url("/function/slow"), data=b"x", headers={"Prefer": "respond-async, wait=0"}
        ) as response:
            assert response.status == 429
            assert response.headers["Retry-After"].isdigit()
            assert "max_turned_async" in (await response.json())["error"]
        assert len(function.requests) == 3  # the refused call was never sent
    finally:
        release.set()
