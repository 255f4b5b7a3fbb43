"""What the fault tests share: a function that holds calls until released, posting async calls,
reading the gateway's health and the stream through outages, and running the worker as a real
process. Their fixtures (held, run_worker) are in conftest.py."""

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import nats
import nats.errors
import yaml
from aiohttp import web
from nats.aio.client import Client as NatsClient

from queue_worker.worker import Worker
from tests.conftest import RunningGateway, stream_message_count
from tests.harness import STREAM, RecordedRequest, Recorder, subprocess_env, wait_until

# Generous: other people's test runs share this 2-core machine.
WAIT_S = 30.0
CONSUMER = "faas-queue-worker"


class HeldFunction:
    """A fake function whose calls wait until the test releases them (or ``hold_s`` passes).

    ``hold_repeats=False`` answers a call id it has seen before at once: the second attempt of
    a call goes through while the first one stays held.
    """

    def __init__(self, hold_s: float, hold_repeats: bool) -> None:
        self.released = asyncio.Event()
        self.hold_s = hold_s
        self.hold_repeats = hold_repeats
        self.seen: list[str] = []
        self.aborted: list[str] = []  # the caller went away while the call was held
        self.answered: list[str] = []
        self.running = 0
        self.most_running = 0

    async def __call__(self, request: web.Request, recorded: RecordedRequest) -> web.Response:
        call_id = recorded.headers.get("X-Call-Id", "")
        repeat = call_id in self.seen
        self.seen.append(call_id)
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            if self.hold_repeats or not repeat:
                await self._hold(call_id)
        finally:
            self.running -= 1
        self.answered.append(call_id)
        return web.Response(body=b"done")

    async def _hold(self, call_id: str) -> None:
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.released.wait(), self.hold_s)
        except asyncio.CancelledError:
            self.aborted.append(call_id)
            raise


HeldStarter = Callable[..., Awaitable[tuple[Recorder, HeldFunction]]]
WorkerStarter = Callable[..., Awaitable[tuple[Worker, "asyncio.Task[None]"]]]


async def post_async(
    http: aiohttp.ClientSession,
    gateway: RunningGateway,
    function: str,
    callback_url: str,
    call_id: str | None = None,
) -> tuple[int, dict[str, Any]]:
    headers = {"X-Callback-Url": callback_url}
    if call_id is not None:
        headers["X-Call-Id"] = call_id
    async with http.post(
        gateway.url(f"/async-function/{function}"), data=b"work", headers=headers
    ) as response:
        assert response.content_type == "application/json"
        return response.status, await response.json()


async def accepted(
    http: aiohttp.ClientSession,
    gateway: RunningGateway,
    function: str,
    callback_url: str,
    call_id: str | None = None,
) -> str:
    status, body = await post_async(http, gateway, function, callback_url, call_id)
    assert status == 202, body
    return str(body["callId"])


async def http_status(http: aiohttp.ClientSession, url: str) -> int:
    """The status of GET ``url``; 0 when there was no answer."""
    try:
        async with http.get(url, timeout=aiohttp.ClientTimeout(total=5)) as response:
            return response.status
    except (aiohttp.ClientError, TimeoutError):
        return 0


async def status_is(status: Awaitable[int], expected: int) -> bool:
    return await status == expected


async def messages_in_stream(client: NatsClient) -> int | None:
    """None while the client cannot ask (NATS down or reconnecting)."""
    try:
        return await stream_message_count(client, STREAM)
    except (TimeoutError, nats.errors.Error):
        return None


async def wait_stream_empty(client: NatsClient) -> None:
    async def empty() -> bool:
        return await messages_in_stream(client) == 0

    await wait_until(empty, WAIT_S, "the stream to be empty")


def call_ids(requests: list[RecordedRequest]) -> list[str]:
    return [request.headers.get("X-Call-Id", "") for request in requests]


def write_functions_file(path: Path, **urls: str) -> Path:
    path.write_text(
        yaml.safe_dump({"functions": {name: {"url": url} for name, url in urls.items()}})
    )
    return path


def worker_process_env(nats_url: str, functions_file: Path, **settings: str) -> dict[str, str]:
    return subprocess_env(
        nats_url=nats_url,
        functions_file=str(functions_file),
        worker_port="0",
        nats_reconnect_wait="0.1",
        fetch_wait="0.5",
        log_level="info",
        **settings,
    )
