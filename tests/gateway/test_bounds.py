"""Bounded memory: calls that turned async keep their function's max_inflight place and are
bounded per gateway process; the worker's sets of call ids are bounded. Real nats-server,
gateway and functions."""

import asyncio
import hashlib
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer

from queue_worker.admission import RecentIds
from tests.conftest import RunningGateway, ready_gateway
from tests.harness import (
    ROOT,
    NatsServer,
    RecordedRequest,
    Recorder,
    free_port,
    registry_of,
    stop_process,
    subprocess_env,
    wait_until,
)

DEADLINE_S = 30.0
StartGateway = Callable[..., Awaitable[RunningGateway]]
StartRecorder = Callable[..., Awaitable[Recorder]]


def held_until(
    release: asyncio.Event,
) -> Callable[[web.Request, RecordedRequest], Awaitable[web.Response]]:
    async def respond(request: web.Request, recorded: RecordedRequest) -> web.Response:
        await release.wait()
        return web.Response(body=b"done")

    return respond


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
    function = await recorder(held_until(release))
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
    function = await recorder(held_until(release))
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


def test_recent_ids_are_bounded_in_number_and_age() -> None:
    now = [0.0]
    ids = RecentIds(keep_s=10.0, max_ids=3, clock=lambda: now[0])
    for call_id in ("a", "b", "c", "d"):
        ids.add(call_id)
    assert "a" not in ids and all(call_id in ids for call_id in "bcd")
    assert len(ids) == 3
    now[0] = 5.0
    ids.add("b")  # seen again: kept from now on
    now[0] = 12.0
    assert "c" not in ids and "d" not in ids and "b" in ids
    assert len(ids) == 1


# responses too large to hold


BIG_BYTES = 200 * 1024 * 1024
PIECE = bytes(range(256)) * 4096  # 1 MiB


def peak_rss_mib(pid: int) -> float:
    """The process's peak resident memory so far (VmHWM), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmHWM for {pid}")


class Receiver:
    """A callback receiver that hashes what arrives instead of keeping it."""

    def __init__(self) -> None:
        self.received: dict[str, tuple[int, str, str | None]] = {}

    async def handle(self, request: web.Request) -> web.Response:
        digest = hashlib.sha256()
        size = 0
        async for piece in request.content.iter_any():
            digest.update(piece)
            size += len(piece)
        self.received[request.headers["X-Call-Id"]] = (
            size,
            digest.hexdigest(),
            request.headers.get("Content-Length"),
        )
        return web.Response(text="ok")


async def big_response(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse()
    if request.query.get("length"):
        response.content_length = BIG_BYTES
    await response.prepare(request)
    for _ in range(BIG_BYTES // len(PIECE)):
        await response.write(PIECE)
    await response.write_eof()
    return response


async def test_a_200_mib_response_is_never_held_in_memory(
    nats_server: NatsServer, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """An async call's response and a turned-async sync call's response, 200 MiB each, go to
    the results store and on to their callbacks; neither process's memory grows with them."""
    function_app = web.Application()
    function_app.router.add_route("*", "/", big_response)
    receiver = Receiver()
    receiver_app = web.Application()
    receiver_app.router.add_post("/", receiver.handle)
    servers = [
        TestServer(function_app, host="127.0.0.1"),
        TestServer(receiver_app, host="127.0.0.1"),
    ]
    for server in servers:
        await server.start_server()
    function_url = str(servers[0].make_url("")).rstrip("/")
    callback_url = str(servers[1].make_url("/"))
    functions_file = tmp_path / "functions.yml"
    functions_file.write_text(f"functions:\n  big:\n    url: {function_url}\n")
    gateway_port = free_port()
    common = subprocess_env(
        nats_url=nats_server.url, functions_file=str(functions_file), log_level="warning"
    )
    processes = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-m", module, cwd=ROOT, env={**common, **env}
        )
        for module, env in (
            ("gateway", {"gateway_port": str(gateway_port)}),
            ("queue_worker", {"worker_port": "0", "fetch_wait": "0.5"}),
        )
    ]
    base = f"http://127.0.0.1:{gateway_port}"
    try:

        async def healthy() -> bool:
            try:
                async with http.get(f"{base}/healthz") as response:
                    return response.status == 200
            except aiohttp.ClientError:
                return False

        await wait_until(healthy, DEADLINE_S, "the gateway")
        baseline = [peak_rss_mib(process.pid) for process in processes]
        async with http.post(
            f"{base}/async-function/big", headers={"X-Callback-Url": callback_url}
        ) as response:
            assert response.status == 202
            async_call = response.headers["X-Call-Id"]
        async with http.get(
            f"{base}/function/big?length=1",
            headers={"X-Callback-Url": callback_url, "Prefer": "respond-async, wait=0"},
        ) as response:
            assert response.status == 202
            turned_async = response.headers["X-Call-Id"]
        await wait_until(
            lambda: {async_call, turned_async} <= set(receiver.received), 120.0, "both callbacks"
        )
        expected = hashlib.sha256(PIECE * (BIG_BYTES // len(PIECE))).hexdigest()
        assert receiver.received[async_call] == (BIG_BYTES, expected, str(BIG_BYTES))
        assert receiver.received[turned_async] == (BIG_BYTES, expected, str(BIG_BYTES))
        async with http.get(f"{base}/system/activations/{async_call}/result") as response:
            kept = await response.read()
            assert response.headers["X-Result-Truncated"] == "true"
            assert kept == (PIECE * 2)[: len(kept)] and len(kept) == 1024 * 1024
        peaks = [peak_rss_mib(process.pid) for process in processes]
    finally:
        for process in processes:
            await stop_process(process)
        for server in servers:
            await server.close()
    for name, before, after in zip(("gateway", "worker"), baseline, peaks, strict=True):
        print(f"{name}: peak RSS {before:.0f} MiB before, {after:.0f} MiB after 2 x 200 MiB")
        # Flat: a few buffers of chunks, not the body (200 MiB, or twice that with copies).
        assert after - before < 64, f"{name} grew by {after - before:.0f} MiB"
