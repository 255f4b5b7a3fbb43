"""Scenario 8's helpers: activation records seeded straight into NATS, and the listing timed.

Seeding writes what the gateway and the worker would have written for each call: the record
in the key-value bucket (``$KV.<bucket>.<call id>``: one line of JSON, a newline, the inline
body) and one index entry (``<index stream>.<function>``, payload the call id), in the order
the calls were "accepted". Publishes are plain NATS publishes, pipelined; the last of each
chunk is a JetStream publish whose ack says the stream has taken everything before it, so
the server's ingest queue never holds more than a chunk. The stream counts are checked at the
end; a shortfall means a dropped publish, and the seeding is redone with smaller chunks.
"""

import asyncio
import random
import statistics
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import nats
from nats.aio.client import Client as NatsClient
from nats.js.errors import NotFoundError

from faas_gateway.core.call import QueuedCall
from faas_gateway.core.outcome import Outcome
from faas_gateway.nats.activations import Activation
from faas_gateway.nats.names import Names
from faas_gateway.runtime.settings import CommonSettings

SEED_FUNCTIONS = ("echo", "instant", "sleep", "thumbnail")
FAILED_SHARE = 0.05
UNFINISHED = 100  # the newest records: half still queued, half running
RESULT_BODY = b'{"ok":true,"width":640,"height":480}'
FAILED_BODY = b'{"error":"upstream said no"}'


@dataclass(frozen=True, slots=True)
class Seed:
    call_id: str
    function: str
    value: bytes  # the key-value entry
    status: str


@dataclass
class Seeded:
    count: int
    seconds: float  # building and publishing, up to verified counts
    build_seconds: float
    kv_messages: int
    index_messages: int
    attempts: int
    newest_call_id: str
    statuses: dict[str, int] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return self.kv_messages == self.count and self.index_messages == self.count


def build_records(count: int, callback_url: str, seed: int = 8) -> list[Seed]:
    """``count`` records, oldest first, 1 ms apart and ending now; 5% of the finished failed."""
    rng = random.Random(seed)
    now_ns = time.time_ns()
    first_ns = now_ns - count * 1_000_000
    records = []
    for number in range(count):
        accepted_ns = first_ns + number * 1_000_000
        call = QueuedCall(
            call_id=str(uuid.UUID(int=rng.getrandbits(128), version=4)),
            function=rng.choice(SEED_FUNCTIONS),
            method="POST",
            path="/",
            query="",
            headers=[("Content-Type", "application/json")],
            body=b"",
            callback_url=callback_url,
            accepted_at_ns=accepted_ns,
        )
        activation = Activation.queued(call)
        activation.request["bodySize"] = 1024
        body = b""
        left = count - number  # 1 for the newest
        if left <= UNFINISHED // 2:
            pass  # still queued
        elif left <= UNFINISHED:
            activation.start(1, started_at_ns=accepted_ns + 2_000_000)
        else:
            activation.start(1, started_at_ns=accepted_ns + 2_000_000)
            failed = rng.random() < FAILED_SHARE
            body = FAILED_BODY if failed else RESULT_BODY
            outcome = Outcome(
                status_code=500 if failed else 200,
                headers=[("Content-Type", "application/json")],
                body=body,
                duration_s=0.003,
            )
            activation.finish(outcome, {"truncated": False})
            activation.finished_at_ns = accepted_ns + 5_000_000
            activation.note_callback(True, 1, 200)
        value = activation.encode(body)
        records.append(Seed(call.call_id, call.function, value, activation.status))
    return records


async def wait_for_streams(js: Any, streams: list[str], timeout_s: float = 30) -> None:
    """The gateway creates the bucket and the index at start; wait until both are there."""
    deadline = time.monotonic() + timeout_s
    for stream in streams:
        while True:
            try:
                await js.stream_info(stream)
                break
            except NotFoundError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"stream {stream} was not created by the gateway") from None
                await asyncio.sleep(0.2)


async def _publish_all(
    nc: NatsClient, settings: CommonSettings, records: list[Seed], chunk: int
) -> None:
    js = nc.jetstream()
    kv_prefix = f"$KV.{settings.activation_bucket}."
    index_stream = settings.activation_index_stream
    names = Names.of(settings)
    for start in range(0, len(records), chunk):
        part = records[start : start + chunk]
        for record in part[:-1]:
            await nc.publish(kv_prefix + record.call_id, record.value)
            await nc.publish(names.index_subject(record.function), record.call_id.encode())
        last = part[-1]
        await asyncio.gather(
            js.publish(kv_prefix + last.call_id, last.value, timeout=30),
            js.publish(
                names.index_subject(last.function),
                last.call_id.encode(),
                timeout=30,
                stream=index_stream,
            ),
        )


async def seed_activations(
    nats_url: str, settings: CommonSettings, count: int, callback_url: str
) -> Seeded:
    """Empty the bucket and the index, then store ``count`` records and their index entries."""
    started = time.perf_counter()
    records = build_records(count, callback_url)
    build_seconds = time.perf_counter() - started
    kv_stream = f"KV_{settings.activation_bucket}"
    index_stream = settings.activation_index_stream
    nc = await nats.connect(nats_url, pending_size=8 * 1024 * 1024)
    try:
        js = nc.jetstream()
        await wait_for_streams(js, [kv_stream, index_stream])
        chunk = 2000
        attempts = 0
        kv_messages = index_messages = 0
        while attempts < 3:
            attempts += 1
            for stream in (kv_stream, index_stream):
                await js.purge_stream(stream)
            await _publish_all(nc, settings, records, chunk)
            kv_messages = (await js.stream_info(kv_stream)).state.messages
            index_messages = (await js.stream_info(index_stream)).state.messages
            if kv_messages == count and index_messages == count:
                break
            chunk = max(chunk // 4, 50)  # dropped publishes: redo with less in flight
    finally:
        await nc.close()
    statuses: dict[str, int] = {}
    for record in records:
        statuses[record.status] = statuses.get(record.status, 0) + 1
    return Seeded(
        count=count,
        seconds=time.perf_counter() - started,
        build_seconds=build_seconds,
        kv_messages=kv_messages,
        index_messages=index_messages,
        attempts=attempts,
        newest_call_id=records[-1].call_id,
        statuses=statuses,
    )


@dataclass
class Timing:
    query: str
    requests: int
    p50_ms: float
    p90_ms: float
    max_ms: float
    returned: int  # records in the last answer

    def as_dict(self) -> dict[str, object]:
        return {
            "query": self.query,
            "requests": self.requests,
            "p50_ms": self.p50_ms,
            "p90_ms": self.p90_ms,
            "max_ms": self.max_ms,
            "returned": self.returned,
        }


async def time_listing(
    session: aiohttp.ClientSession, url: str, requests: int, warm_up: int = 5
) -> tuple[Timing, list[dict[str, Any]]]:
    """Sequential GETs of ``url``; latencies from send to the whole body read and parsed."""
    latencies_ms = []
    body: list[dict[str, Any]] = []
    for number in range(warm_up + requests):
        started = time.perf_counter()
        async with session.get(url) as response:
            if response.status != 200:
                raise RuntimeError(f"GET {url}: {response.status} {await response.text()}")
            body = await response.json()
        if number >= warm_up:
            latencies_ms.append((time.perf_counter() - started) * 1000)
    deciles = statistics.quantiles(latencies_ms, n=10, method="inclusive")
    timing = Timing(
        query=url.partition("?")[2],
        requests=requests,
        p50_ms=statistics.median(latencies_ms),
        p90_ms=deciles[8],
        max_ms=max(latencies_ms),
        returned=len(body),
    )
    return timing, body
