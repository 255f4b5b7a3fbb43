"""Responses too large to hold: 200 MiB answers to an async call and to a sync call that turned
async go through the results store to their callbacks while the gateway's and the worker's
memory stays flat. Both run as their own processes, as an operator runs them."""

import asyncio
import hashlib
import sys
from pathlib import Path

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.harness import ROOT, NatsServer, free_port, stop_process, subprocess_env, wait_until

DEADLINE_S = 30.0

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
