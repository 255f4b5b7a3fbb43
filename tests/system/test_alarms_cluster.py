"""Alarms across gateways that are real processes: two gateways against one NATS publish every
tick of a 1 s alarm, and its action runs once per tick, also while one of them is killed
(SIGKILL) and started again; a tick that passes while every gateway is down is skipped, not
fired late (docs/events.md). Which ticks reached the action is read from its call ids, which
only the tick decides: no timing threshold, no sleep."""

import asyncio
import signal
import statistics
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from faas_gateway.core.events import rule_call_id, tick_fire_id
from faas_gateway.core.timefmt import parse_rfc3339_ns
from tests.conftest import StartRecorder, StartWorker
from tests.harness import (
    DEADLINE_S,
    Recorder,
    free_port,
    get_json,
    registry_of,
    sample,
    scrape,
    subprocess_env,
    wait_until,
)

EVERY_SECOND = "* * * * * *"


class GatewayProcess:
    """``python -m gateway`` on a port of its own, started and killed by the test."""

    def __init__(self, nats_url: str, functions_file: Path, log: Path) -> None:
        self.port = free_port()
        self._env = subprocess_env(
            nats_url=nats_url,
            functions_file=str(functions_file),
            gateway_port=str(self.port),
            nats_reconnect_wait="0.1",
        )
        self._log = log
        self.process: asyncio.subprocess.Process | None = None

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def start(self, http: aiohttp.ClientSession) -> None:
        with self._log.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "gateway", env=self._env, stdout=log, stderr=log
            )

        async def healthy() -> bool:
            try:
                async with http.get(self.url("/healthz")) as response:
                    return response.status == 200
            except aiohttp.ClientError:
                return False

        await wait_until(healthy, DEADLINE_S, f"the gateway on {self.port}")

    async def kill(self) -> None:
        assert self.process is not None
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGKILL)
        await self.process.wait()


@pytest.fixture
async def gateways(
    tmp_path: Path, nats_server: Any, recorder: StartRecorder
) -> AsyncIterator[tuple[list[GatewayProcess], Recorder, Recorder]]:
    hello, other = await recorder(), await recorder()
    functions_file = tmp_path / "functions.yml"
    functions_file.write_text(
        f"functions:\n  hello:\n    url: {hello.url}\n  other:\n    url: {other.url}\n"
    )
    made = [
        GatewayProcess(nats_server.url, functions_file, tmp_path / f"gateway-{n}.log")
        for n in range(2)
    ]
    yield made, hello, other
    for gateway in made:
        if gateway.process is not None:
            await gateway.kill()


async def api(
    http: aiohttp.ClientSession, gateway: GatewayProcess, method: str, path: str, body: Any = None
) -> Any:
    async with http.request(method, gateway.url(f"/api/v1/namespaces/_/{path}"), json=body) as r:
        assert r.status in (200, 202), await r.text()
        return await r.json()


async def alarm(
    http: aiohttp.ClientSession, gateway: GatewayProcess, trigger: str, action: str
) -> None:
    await api(http, gateway, "PUT", f"triggers/{trigger}", {})
    await api(http, gateway, "PUT", f"rules/{trigger}-rule", {"trigger": trigger, "action": action})
    async with http.post(
        gateway.url("/api/v1/namespaces/whisk.system/actions/alarms/alarm?blocking=true"),
        json={"lifecycleEvent": "CREATE", "triggerName": f"/_/{trigger}", "cron": EVERY_SECOND},
    ) as response:
        assert response.status == 200, await response.text()


def now_ms() -> int:
    return int(time.time() * 1000)


def calls_per_tick(function: Recorder, trigger: str, since_ms: int) -> dict[int, int]:
    ids = {
        rule_call_id(tick_fire_id("alarm", trigger, tick), f"{trigger}-rule"): tick
        for tick in range(since_ms - since_ms % 1000, now_ms() + 2000, 1000)
    }
    counts: dict[int, int] = {}
    for request in function.requests:
        tick = ids.get(request.headers.get("X-Call-Id", ""))
        assert tick is not None, f"a call of no tick: {request.headers.get('X-Call-Id')}"
        counts[tick] = counts.get(tick, 0) + 1
    return counts


async def ticks_after(
    function: Recorder, trigger: str, since_ms: int, after_ms: int, count: int
) -> None:
    def enough() -> bool:
        ticks = calls_per_tick(function, trigger, since_ms)
        return len([tick for tick in ticks if tick > after_ms]) >= count

    await wait_until(enough, DEADLINE_S, f"{count} ticks after {after_ms}")


async def lateness_ms(
    http: aiohttp.ClientSession, gateway: GatewayProcess, trigger: str
) -> list[int]:
    """How late each of the trigger's fires was published: its activation record's start
    against the tick it was published for."""
    status, records = await get_json(
        http, gateway.url(f"/system/activations?function={trigger}&limit=200")
    )
    assert status == 200, records
    return [
        parse_rfc3339_ns(record["startedAt"]) // 1_000_000 - record["request"]["scheduledAtMs"]
        for record in records
    ]


async def test_two_gateways_fire_each_tick_once_also_while_one_is_killed_and_restarted(
    gateways: tuple[list[GatewayProcess], Recorder, Recorder],
    start_worker: StartWorker,
    http: aiohttp.ClientSession,
) -> None:
    (one, two), hello, _ = gateways
    await one.start(http)
    await two.start(http)
    await start_worker(registry_of(hello=hello.url))
    start = now_ms()
    await alarm(http, one, "beat", "hello")

    await ticks_after(hello, "beat", start, start, 4)
    await two.kill()
    await ticks_after(hello, "beat", start, now_ms(), 3)
    await two.start(http)
    await ticks_after(hello, "beat", start, now_ms(), 3)
    await one.kill()
    await ticks_after(hello, "beat", start, now_ms(), 3)
    await one.start(http)
    await ticks_after(hello, "beat", start, now_ms(), 2)

    counts = calls_per_tick(hello, "beat", start)
    ticks = sorted(counts)
    assert len(ticks) >= 10
    assert ticks == list(range(ticks[0], ticks[-1] + 1000, 1000)), "a tick was missed"
    assert set(counts.values()) == {1}, "a tick ran twice"
    # Both published the ticks they shared, and JetStream kept one of each: the other
    # publish was a duplicate.
    metrics = [await scrape(http, gateway.url("/metrics")) for gateway in (one, two)]
    duplicates = [
        sample(text, "gateway_event_fires_total", source="alarm", outcome="duplicate") or 0.0
        for text in metrics
    ]
    assert sum(duplicates) > 0
    late = await lateness_ms(http, one, "beat")
    print(
        f"\nalarm publish lateness over {len(late)} ticks: median {statistics.median(late)} ms, "
        f"max {max(late)} ms"
    )


async def test_a_tick_that_passes_while_every_gateway_is_down_is_skipped(
    gateways: tuple[list[GatewayProcess], Recorder, Recorder],
    start_worker: StartWorker,
    http: aiohttp.ClientSession,
) -> None:
    (one, two), hello, other = gateways
    await one.start(http)
    await start_worker(registry_of(hello=hello.url, other=other.url))
    start = now_ms()
    await alarm(http, one, "beat", "hello")
    await ticks_after(hello, "beat", start, start, 2)

    await one.kill()
    down_ms = now_ms()
    # Two whole ticks pass with no gateway up (the clock is the event waited for).
    await wait_until(lambda: now_ms() > down_ms + 2500, DEADLINE_S, "two ticks to pass", 0.1)
    starting_ms = now_ms()
    await two.start(http)
    up_ms = now_ms()
    await ticks_after(hello, "beat", start, up_ms, 3)

    ticks = sorted(calls_per_tick(hello, "beat", start))
    missed = list(range(down_ms - down_ms % 1000 + 1000, starting_ms, 1000))
    assert len(missed) >= 2
    assert not set(missed) & set(ticks), "a tick missed while every gateway was down ran"
    assert [tick for tick in ticks if tick > up_ms] == list(
        range(min(t for t in ticks if t > up_ms), ticks[-1] + 1000, 1000)
    )
