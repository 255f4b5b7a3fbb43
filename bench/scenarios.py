"""The scenarios of the benchmark issue. Each returns a Result with its figures and target.

Speed figures are ratios against a baseline measured in the same run, interleaved round by
round and summarised as medians, because these machines are shared and noisy.
"""

import asyncio
import statistics
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp
import nats

from bench.activations import SEED_FUNCTIONS, seed_activations, time_listing
from bench.load import LoadResult, run_load
from bench.stack import BenchStack, CpuSource, Proc
from faas_gateway.nats.names import Names
from faas_gateway.runtime.settings import CommonSettings

MIB = 1024 * 1024


@dataclass
class Result:
    number: int
    title: str
    figure: str  # what was measured, in words, with numbers
    value: float | None  # the number the target is about
    target: str
    met: bool | None  # None: could not be measured
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class Context:
    stack: BenchStack
    tool: str
    seconds: float
    rounds: int
    quick: bool
    gateway_workers: int
    services: Proc
    gateway: Proc
    gateway_multi: Proc
    peers: list[str]
    log: Callable[[str], None]
    results: dict[int, Result] = field(default_factory=dict)
    # A peer's CPU time, by its target name (peer_name), when --peer-pid/--peer-cgroup say
    # where to read it.
    peer_cpu: dict[str, CpuSource] = field(default_factory=dict)

    def gateway_url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.stack.ports.gateway}{path}"

    def gateway_multi_url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.stack.ports.gateway_multi}{path}"


async def measure_interleaved(
    ctx: Context,
    targets: dict[str, str],
    connections: int,
    cpu_of: dict[str, CpuSource] | None = None,
    cpu_us: dict[str, list[float]] | None = None,
    **load: Any,
) -> dict[str, list[LoadResult]]:
    """Each target once per round, in turn, after one warm-up run each.

    With ``cpu_of``, the CPU time the named process spent per request goes to ``cpu_us``: a
    steadier figure than req/s on a shared machine, whose speed varies from minute to minute.
    """
    for url in targets.values():
        await run_load(ctx.tool, url, connections=connections, seconds=1, **load)
    runs: dict[str, list[LoadResult]] = {name: [] for name in targets}
    for round_number in range(ctx.rounds):
        for name, url in targets.items():
            proc = (cpu_of or {}).get(name)
            cpu_before = proc.cpu_seconds() if proc else 0.0
            result = await run_load(
                ctx.tool, url, connections=connections, seconds=ctx.seconds, **load
            )
            if proc is not None and cpu_us is not None and result.requests:
                spent_us = (proc.cpu_seconds() - cpu_before) * 1e6 / result.requests
                cpu_us.setdefault(name, []).append(spent_us)
            runs[name].append(result)
            ctx.log(
                f"  round {round_number + 1}/{ctx.rounds} {name}: "
                f"{result.requests_per_s:,.0f} req/s, p50 {result.p50_ms:.3f} ms, "
                f"errors {result.errors}"
            )
    return runs


def median_rate(results: list[LoadResult]) -> float:
    return statistics.median(result.requests_per_s for result in results)


def median_p50(results: list[LoadResult]) -> float:
    return statistics.median(result.p50_ms for result in results)


def sync_targets(ctx: Context) -> dict[str, str]:
    targets = {
        "direct": f"{ctx.stack.services_url}/",
        "gateway x1": ctx.gateway_url("/function/echo"),
        f"gateway x{ctx.gateway_workers}": ctx.gateway_multi_url("/function/echo"),
    }
    for peer in ctx.peers:
        targets[peer_name(peer)] = peer.rstrip("/") + "/function/echo"
    return targets


def peer_name(url: str) -> str:
    return f"peer {url}"


# With --peer, the sync targets of issue 16: ours (one process) at least this much faster
# than each peer at 50 connections, and adding no more latency than it at one.
PEER_THROUGHPUT_TARGET = 1.05


async def sync_throughput(ctx: Context) -> Result:
    cpu_of: dict[str, CpuSource] = {
        "direct": ctx.services,
        "gateway x1": ctx.gateway,
        f"gateway x{ctx.gateway_workers}": ctx.gateway_multi,
        **ctx.peer_cpu,
    }
    cpu_us: dict[str, list[float]] = {}
    runs = await measure_interleaved(
        ctx, sync_targets(ctx), connections=50, cpu_of=cpu_of, cpu_us=cpu_us, body_bytes=1024
    )
    direct = median_rate(runs["direct"])
    rates = {name: median_rate(results) for name, results in runs.items()}
    ratios = {name: rate / direct for name, rate in rates.items() if name != "direct"}
    ours = {name: ratio for name, ratio in ratios.items() if name.startswith("gateway")}
    best_name = max(ours, key=ours.__getitem__)
    cpu = {name: statistics.median(values) for name, values in cpu_us.items()}
    # Ours over each peer, for each of our gateways: the figure issue 16 sets a target on.
    over_peer = {
        peer: {name: rates[name] / rates[peer] for name in ours}
        for peer in map(peer_name, ctx.peers)
    }
    figure = (
        f"direct {direct:,.0f} req/s; "
        + "; ".join(f"{name} {rates[name]:,.0f} req/s ({ratios[name]:.2f})" for name in ratios)
        + "; CPU per request: "
        + ", ".join(f"{name} {value:.0f} µs" for name, value in cpu.items())
        + "".join(
            f"; ours/{peer}: " + ", ".join(f"{name} {x:.2f}" for name, x in by_ours.items())
            for peer, by_ours in over_peer.items()
        )
    )
    target = ">= 0.45 x direct"
    met = ours[best_name] >= 0.45
    if over_peer:
        target += f"; gateway x1 >= {PEER_THROUGHPUT_TARGET} x each peer"
        met = met and all(
            by_ours["gateway x1"] >= PEER_THROUGHPUT_TARGET for by_ours in over_peer.values()
        )
    return Result(
        1,
        "Sync proxy, 1 KiB POST echo, 50 connections",
        figure,
        ours[best_name],
        target,
        met,
        {
            "rates": rates,
            "ratios": ratios,
            "cpu_us_per_request": cpu,
            "ours_over_peer": over_peer,
            "runs": _dump(runs),
        },
    )


async def sync_latency(ctx: Context) -> Result:
    targets = sync_targets(ctx)
    runs = await measure_interleaved(ctx, targets, connections=1, body_bytes=1024)
    direct = median_p50(runs["direct"])
    added = {
        name: median_p50(results) - direct for name, results in runs.items() if name != "direct"
    }
    figure = f"direct p50 {direct:.3f} ms; " + "; ".join(
        f"{name} +{value:.3f} ms" for name, value in added.items()
    )
    value = added["gateway x1"]
    target = "<= 0.35 ms added (gateway x1)"
    met = value <= 0.35
    peers = [peer_name(peer) for peer in ctx.peers]
    if peers:
        target += "; <= each peer's"
        met = met and all(value <= added[peer] for peer in peers)
    return Result(
        2,
        "Sync proxy, 1 connection: added p50 latency",
        figure,
        value,
        target,
        met,
        {"added_ms": added, "direct_p50_ms": direct, "runs": _dump(runs)},
    )


def sync_comparison_table(results: dict[int, Result]) -> str | None:
    """Scenarios 1 and 2 as one table with a column per target (direct, ours, each peer),
    the side-by-side comparison of issue 16; None when neither ran."""
    throughput, latency = results.get(1), results.get(2)
    columns: list[str] = []
    for result, key in ((throughput, "rates"), (latency, "added_ms")):
        if result is not None and key in result.details:
            columns += [name for name in result.details[key] if name not in columns]
    if not columns:
        return None
    if "direct" not in columns:
        columns.insert(0, "direct")
    peers = [name for name in columns if name.startswith("peer ")]
    rows: list[list[str]] = []
    if throughput is not None and "rates" in throughput.details:
        rates = throughput.details["rates"]
        ratios = throughput.details["ratios"]
        rows.append(
            ["c=50 req/s (ratio to direct)"]
            + [
                f"{rates[name]:,.0f}" + (f" ({ratios[name]:.2f})" if name in ratios else "")
                if name in rates
                else "-"
                for name in columns
            ]
        )
        over_peer = throughput.details.get("ours_over_peer", {})
        for peer in peers:
            rows.append(
                [f"c=50 ours / {peer}"]
                + [
                    f"{over_peer[peer][name]:.2f}" if name in over_peer.get(peer, {}) else "-"
                    for name in columns
                ]
            )
        cpu = throughput.details["cpu_us_per_request"]
        rows.append(
            ["CPU per request at c=50"]
            + [f"{cpu[name]:.0f} µs" if name in cpu else "n/a" for name in columns]
        )
    if latency is not None and "added_ms" in latency.details:
        added = latency.details["added_ms"]
        rows.append(
            ["c=1 added p50"]
            + [f"+{added[name]:.3f} ms" if name in added else "-" for name in columns]
        )
    lines = ["| figure | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


async def _chunks(total_bytes: int, chunk_bytes: int = 256 * 1024) -> AsyncIterator[bytes]:
    chunk = b"\0" * chunk_bytes
    sent = 0
    while sent < total_bytes:
        piece = chunk[: min(chunk_bytes, total_bytes - sent)]
        sent += len(piece)
        yield piece


async def big_bodies(ctx: Context) -> Result:
    size = 100 * MIB
    gateway = ctx.gateway
    growth: dict[str, float] = {}
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        # Upload
        before = gateway.rss_bytes()
        gateway.reset_peak()
        async with session.post(
            ctx.gateway_url("/function/sink"),
            data=_chunks(size),
            timeout=aiohttp.ClientTimeout(total=300),
        ) as response:
            received = int(await response.text())
        if received != size:
            raise RuntimeError(f"upload: the function received {received} of {size} bytes")
        growth["upload"] = (gateway.peak_rss_bytes() - before) / MIB
        # Download
        before = gateway.rss_bytes()
        gateway.reset_peak()
        read = 0
        async with session.get(
            ctx.gateway_url(f"/function/big?bytes={size}"), timeout=aiohttp.ClientTimeout(total=300)
        ) as response:
            async for chunk in response.content.iter_any():
                read += len(chunk)
        if read != size:
            raise RuntimeError(f"download: read {read} of {size} bytes")
        growth["download"] = (gateway.peak_rss_bytes() - before) / MIB
    worst = max(growth.values())
    return Result(
        3,
        "Sync proxy, 100 MiB upload and download: gateway RSS growth",
        f"upload +{growth['upload']:.1f} MiB, download +{growth['download']:.1f} MiB "
        "(peak RSS over the start)",
        worst,
        "<= 20 MiB",
        worst <= 20,
        {"growth_mib": growth},
    )


async def purge(ctx: Context, *streams: str) -> None:
    client = await nats.connect(ctx.stack.nats_url)
    try:
        js = client.jetstream()
        for stream in streams:
            await js.purge_stream(stream)
    finally:
        await client.close()


async def async_accept(ctx: Context) -> Result:
    targets = {
        "minimal publisher": f"http://127.0.0.1:{ctx.stack.ports.baseline}/publish",
        "gateway x1": ctx.gateway_url("/async-function/echo"),
        f"gateway x{ctx.gateway_workers}": ctx.gateway_multi_url("/async-function/echo"),
    }
    try:
        runs = await measure_interleaved(ctx, targets, connections=50, body_bytes=1024)
    finally:
        await purge(ctx, "faas-async", "bench-baseline")
    baseline = median_rate(runs["minimal publisher"])
    rates = {name: median_rate(results) for name, results in runs.items()}
    ratios = {name: rate / baseline for name, rate in rates.items() if name != "minimal publisher"}
    # Issue 16 asks this of one process; the second is reported beside it.
    one_process = ratios["gateway x1"]
    figure = f"minimal publisher {baseline:,.0f} req/s; " + "; ".join(
        f"{name} {rates[name]:,.0f} req/s ({ratios[name]:.2f})" for name in ratios
    )
    return Result(
        4,
        "Async accept, 1 KiB POST, 50 connections",
        figure,
        one_process,
        ">= 0.8 x minimal publisher (gateway x1)",
        one_process >= 0.8,
        {"rates": rates, "ratios": ratios, "runs": _dump(runs)},
    )


async def enqueue(ctx: Context, path: str, count: int, concurrency: int = 50) -> float:
    """Post ``count`` async calls through the gateway; return the accept rate."""
    callback = f"{ctx.stack.services_url}/callback"
    queue: asyncio.Queue[int] = asyncio.Queue()
    for index in range(count):
        queue.put_nowait(index)
    started = time.perf_counter()
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def poster() -> None:
            while not queue.empty():
                queue.get_nowait()
                async with session.post(
                    ctx.gateway_url(path), data=b"x" * 1024, headers={"X-Callback-Url": callback}
                ) as response:
                    if response.status != 202:
                        raise RuntimeError(
                            f"enqueue got {response.status}: {await response.text()}"
                        )

        await asyncio.gather(*(poster() for _ in range(concurrency)))
    return count / (time.perf_counter() - started)


async def callback_stats(ctx: Context) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{ctx.stack.services_url}/stats") as r,
    ):
        stats: dict[str, Any] = await r.json()
        return stats


async def reset_callbacks(ctx: Context) -> None:
    async with aiohttp.ClientSession() as session, session.post(f"{ctx.stack.services_url}/reset"):
        pass


async def drain_with_one_worker(
    ctx: Context,
    path: str,
    count: int,
    max_inflight: int,
    deadline_s: float,
    **worker_settings: str,
) -> dict[str, Any]:
    """Queue ``count`` calls, then let one fresh worker run them; completion rate from callbacks.

    ``worker_settings`` go to the worker's environment (``record_activations="false"``).
    """
    await reset_callbacks(ctx)
    accept_rate = await enqueue(ctx, path, count)
    worker = await ctx.stack.start_worker("worker", max_inflight, **worker_settings)
    worker.reset_peak()
    cpu_before = worker.cpu_seconds()  # after start-up: imports and connecting not counted
    try:
        give_up = time.monotonic() + deadline_s
        while True:
            stats = await callback_stats(ctx)
            if stats["unique"] >= count or time.monotonic() > give_up:
                break
            await asyncio.sleep(0.2)
        peak_rss = worker.peak_rss_bytes()
        cpu_s = worker.cpu_seconds() - cpu_before
    finally:
        await worker.stop()
    span_s = (stats["last"] or 0) - (stats["first"] or 0)
    completed_per_s = (stats["unique"] - 1) / span_s if span_s > 0 else 0.0
    return {
        "calls": count,
        "completed": stats["unique"],
        "duplicate_callbacks": stats["duplicates"],
        "completed_per_s": completed_per_s,
        "enqueue_per_s": accept_rate,
        "worker_peak_rss_mib": peak_rss / MIB,
        "worker_cpu_us_per_call": cpu_s * 1e6 / stats["unique"] if stats["unique"] else None,
    }


async def async_slow_function(ctx: Context) -> Result:
    max_inflight = 100
    target_rate = 0.9 * max_inflight / 0.1
    count = int(max(target_rate * ctx.seconds, 2 * max_inflight))
    run = await drain_with_one_worker(ctx, "/async-function/sleep?ms=100", count, max_inflight, 120)
    ratio = run["completed_per_s"] / (max_inflight / 0.1)
    complete = run["completed"] == count and run["duplicate_callbacks"] == 0
    return Result(
        5,
        f"Async end to end, 100 ms function, one worker (max_inflight {max_inflight})",
        f"{run['completed_per_s']:,.0f} completions/s of {count} calls "
        f"({ratio:.2f} x max_inflight/0.1 s); {run['completed']} completed, "
        f"{run['duplicate_callbacks']} duplicate callbacks",
        ratio,
        ">= 0.9 x max_inflight / 0.1 s",
        ratio >= 0.9 and complete,
        run,
    )


def instant_calls(ctx: Context) -> int:
    """How many calls scenario 6 queues: half a measurement's worth of scenario 1's rate."""
    sync_rate = ctx.results[1].details["rates"]["gateway x1"] if 1 in ctx.results else None
    return int(max(0.5 * (sync_rate or 2000) * ctx.seconds, 1000))


async def async_instant_function(ctx: Context) -> Result:
    sync_rate = ctx.results[1].details["rates"]["gateway x1"] if 1 in ctx.results else None
    count = instant_calls(ctx)
    run = await drain_with_one_worker(ctx, "/async-function/instant", count, 100, 120)
    complete = run["completed"] == count and run["duplicate_callbacks"] == 0
    if sync_rate is None:
        return Result(
            6,
            "Async end to end, instant function, one worker",
            f"{run['completed_per_s']:,.0f} completions/s (scenario 1 not run: no ratio)",
            None,
            ">= 0.5 x scenario 1 gateway req/s",
            None,
            run,
        )
    ratio = run["completed_per_s"] / sync_rate
    return Result(
        6,
        "Async end to end, instant function, one worker",
        f"{run['completed_per_s']:,.0f} completions/s ({ratio:.2f} x the sync gateway x1 "
        f"{sync_rate:,.0f} req/s); {run['completed']}/{count} completed, "
        f"{run['duplicate_callbacks']} duplicate callbacks",
        ratio,
        ">= 0.5 x scenario 1 gateway req/s",
        ratio >= 0.5 and complete,
        run,
    )


async def capacity(ctx: Context) -> Result:
    calls = 5000
    sleep_s = 5 if ctx.quick else 30
    run = await drain_with_one_worker(
        ctx, f"/async-function/sleep?ms={sleep_s * 1000}", calls, calls, sleep_s + 180
    )
    all_once = run["completed"] == calls and run["duplicate_callbacks"] == 0
    peak = run["worker_peak_rss_mib"]
    return Result(
        7,
        f"Capacity: {calls} concurrent calls to a {sleep_s} s function, one worker",
        f"{run['completed']}/{calls} completed, {run['duplicate_callbacks']} duplicate callbacks, "
        f"worker peak RSS {peak:.0f} MiB" + (" (quick: 5 s instead of 30 s)" if ctx.quick else ""),
        peak,
        "all complete, none twice, peak RSS <= 400 MiB",
        all_once and peak <= 400,
        run,
    )


async def recording_cost(ctx: Context) -> dict[str, Any]:
    """Scenario 6's drain with the worker writing activation records and without, in turns.

    The gateway writes each call's ``queued`` record and index entry either way, while the
    calls are queued, which is not timed; what differs is the worker's ``running``, final and
    callback-state writes.
    """
    count = instant_calls(ctx)
    runs: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
    for round_number in range(ctx.rounds):
        # Alternate which goes first, so a drifting machine speed favours neither.
        order = ("off", "on") if round_number % 2 == 0 else ("on", "off")
        for name in order:
            run = await drain_with_one_worker(
                ctx,
                "/async-function/instant",
                count,
                100,
                120,
                record_activations="true" if name == "on" else "false",
            )
            runs[name].append(run)
            ctx.log(
                f"  round {round_number + 1}/{ctx.rounds} records {name}: "
                f"{run['completed_per_s']:,.0f} completions/s, {run['completed']}/{count} "
                f"completed, {run['duplicate_callbacks']} duplicate callbacks, worker "
                f"{run['worker_cpu_us_per_call'] or 0:.0f} µs CPU per call"
            )
    rates = {
        name: statistics.median(run["completed_per_s"] for run in results)
        for name, results in runs.items()
    }
    complete = all(
        run["completed"] == count and run["duplicate_callbacks"] == 0
        for results in runs.values()
        for run in results
    )
    cpu_us = {
        name: statistics.median(run["worker_cpu_us_per_call"] or 0.0 for run in results)
        for name, results in runs.items()
    }
    cost = 1 - rates["on"] / rates["off"] if rates["off"] else None
    return {
        "calls": count,
        "rates": rates,
        "cost": cost,
        "worker_cpu_us_per_call": cpu_us,
        "complete": complete,
        "runs": runs,
    }


async def activation_listing(ctx: Context) -> dict[str, Any]:
    """Seed the records straight into NATS, then time ``GET /system/activations?limit=30``."""
    count = 100_000
    settings = CommonSettings()
    seeded = await seed_activations(
        ctx.stack.nats_url, settings, count, f"{ctx.stack.services_url}/callback"
    )
    ctx.log(
        f"  seeded {seeded.count:,} records in {seeded.seconds:.1f} s "
        f"(built in {seeded.build_seconds:.1f} s; bucket {seeded.kv_messages:,}, "
        f"index {seeded.index_messages:,}, {seeded.attempts} attempt(s))"
    )
    if not seeded.complete:
        raise RuntimeError(
            f"seeding stored {seeded.kv_messages:,} records and {seeded.index_messages:,} "
            f"index entries of {count:,} after {seeded.attempts} attempts"
        )
    requests = 100 if ctx.quick else 200
    filtered_requests = 20 if ctx.quick else 50
    timings = {}
    async with aiohttp.ClientSession() as session:
        newest, body = await time_listing(
            session, ctx.gateway_url("/system/activations?limit=30"), requests
        )
        if len(body) != 30 or body[0].get("callId") != seeded.newest_call_id:
            raise RuntimeError(
                f"the listing returned {len(body)} records, newest "
                f"{body[0].get('callId') if body else None}; expected 30, newest "
                f"{seeded.newest_call_id}"
            )
        timings["newest"] = newest
        for name, query in (
            ("function", f"function={SEED_FUNCTIONS[2]}"),
            ("status", "status=failed"),
        ):
            timing, body = await time_listing(
                session,
                ctx.gateway_url(f"/system/activations?limit=30&{query}"),
                filtered_requests,
            )
            if len(body) != 30:
                raise RuntimeError(f"?{query} returned {len(body)} records, not 30")
            timings[name] = timing
    for timing in timings.values():
        ctx.log(
            f"  GET /system/activations?{timing.query}: p50 {timing.p50_ms:.1f} ms, "
            f"p90 {timing.p90_ms:.1f} ms, max {timing.max_ms:.1f} ms ({timing.requests} requests)"
        )
    return {
        "seeded": asdict(seeded),
        "timings": {name: timing.as_dict() for name, timing in timings.items()},
    }


async def activations(ctx: Context) -> Result:
    recording = await recording_cost(ctx)
    listing = await activation_listing(ctx)
    seeded = listing["seeded"]
    newest = listing["timings"]["newest"]
    by_function = listing["timings"]["function"]
    by_status = listing["timings"]["status"]
    rates = recording["rates"]
    cpu_us = recording["worker_cpu_us_per_call"]
    cost = recording["cost"]
    p50 = newest["p50_ms"]
    figure = (
        f"list 30 newest of {seeded['count']:,}: p50 {p50:.1f} ms, p90 {newest['p90_ms']:.1f} ms "
        f"({by_function['query'].split('&')[1]} p50 {by_function['p50_ms']:.1f} ms, "
        f"{by_status['query'].split('&')[1]} p50 {by_status['p50_ms']:.1f} ms); "
        f"recording cost {cost:.1%} of scenario 6's drain "
        f"(worker records off {rates['off']:,.0f}, on {rates['on']:,.0f} completions/s; "
        f"worker CPU per call off {cpu_us['off']:.0f} µs, on {cpu_us['on']:.0f} µs; "
        f"{recording['calls']} calls, median of {ctx.rounds} round(s); the gateway's queued "
        f"records are written in the untimed enqueue phase either way); "
        f"{seeded['count']:,} records seeded in {seeded['seconds']:.1f} s"
    )
    met = p50 <= 50 and cost is not None and cost <= 0.10 and recording["complete"]
    if not recording["complete"]:
        figure += "; NOT all calls completed exactly once"
    return Result(
        8,
        f"Activations: list 30 of {seeded['count']:,} records; recording cost",
        figure,
        p50,
        "p50 <= 50 ms; cost <= 10% of scenario 6",
        met,
        {
            "listing_p50_ms": p50,
            "recording_cost": cost,
            "completions_per_s": rates,
            "recording": recording,
            "listing": listing,
        },
    )


# OpenWhisk's API (/api/v1): the same 1 KiB, as the JSON object an invoke's params must be.
PARAMS = '{"payload": "' + "x" * (1024 - 15) + '"}'
JSON_HEADERS = {"Content-Type": "application/json"}
WHISK_ECHO = "/api/v1/namespaces/_/actions/echo"


async def openwhisk_blocking_latency(ctx: Context) -> Result:
    """A blocking ``result=true`` invoke of the echo function (the route APISIX's openwhisk
    plugin takes) against the same call through /function/echo, one connection."""
    targets = {
        "/function/echo": ctx.gateway_url("/function/echo"),
        "blocking invoke": ctx.gateway_url(f"{WHISK_ECHO}?blocking=true&result=true"),
    }
    runs = await measure_interleaved(ctx, targets, connections=1, body=PARAMS, headers=JSON_HEADERS)
    sync = median_p50(runs["/function/echo"])
    whisk = median_p50(runs["blocking invoke"])
    added = whisk - sync
    return Result(
        9,
        "OpenWhisk blocking invoke with result=true, 1 connection: added p50 over /function/echo",
        f"/function/echo p50 {sync:.3f} ms; blocking invoke p50 {whisk:.3f} ms (+{added:.3f} ms)",
        added,
        "<= 0.3 ms added over /function/echo",
        added <= 0.3,
        {"added_ms": added, "function_p50_ms": sync, "invoke_p50_ms": whisk, "runs": _dump(runs)},
    )


async def openwhisk_accept(ctx: Context) -> Result:
    """Non-blocking invokes against /async-function/echo, 50 connections, same body: both
    record the call and wait for JetStream's ack before answering 202.

    Each run starts from empty streams (the queue, the records and their index purged), and
    the order alternates round by round: a run after another one into the same streams is
    slower, whichever route it measures, which would favour the one measured first.
    """
    targets = {
        "/async-function/echo": ctx.gateway_url("/async-function/echo"),
        "non-blocking invoke": ctx.gateway_url(WHISK_ECHO),
    }
    names = Names.of(CommonSettings())
    streams = ("faas-async", names.activation_stream, names.index_stream)
    for url in targets.values():  # warm-up
        await run_load(ctx.tool, url, connections=50, seconds=1, body=PARAMS, headers=JSON_HEADERS)
    await purge(ctx, *streams)
    runs: dict[str, list[LoadResult]] = {name: [] for name in targets}
    cpu_us: dict[str, list[float]] = {name: [] for name in targets}
    try:
        for round_number in range(ctx.rounds):
            order = list(targets) if round_number % 2 == 0 else list(reversed(targets))
            for name in order:
                cpu_before = ctx.gateway.cpu_seconds()
                result = await run_load(
                    ctx.tool,
                    targets[name],
                    connections=50,
                    seconds=ctx.seconds,
                    body=PARAMS,
                    headers=JSON_HEADERS,
                )
                if result.requests:
                    spent_s = ctx.gateway.cpu_seconds() - cpu_before
                    cpu_us[name].append(spent_s * 1e6 / result.requests)
                runs[name].append(result)
                await purge(ctx, *streams)
                ctx.log(
                    f"  round {round_number + 1}/{ctx.rounds} {name}: "
                    f"{result.requests_per_s:,.0f} req/s, errors {result.errors}"
                )
    finally:
        await purge(ctx, *streams)
    rates = {name: median_rate(results) for name, results in runs.items()}
    ratio = rates["non-blocking invoke"] / rates["/async-function/echo"]
    cpu = {name: statistics.median(values) for name, values in cpu_us.items() if values}
    errors = sum(result.errors for results in runs.values() for result in results)
    return Result(
        10,
        "OpenWhisk non-blocking invoke accept rate, 50 connections",
        f"/async-function/echo {rates['/async-function/echo']:,.0f} req/s; non-blocking "
        f"invoke {rates['non-blocking invoke']:,.0f} req/s ({ratio:.2f}); gateway CPU per "
        + ", ".join(f"{name} {value:.0f} µs" for name, value in cpu.items())
        + f"; {errors} errors",
        ratio,
        ">= 0.9 x /async-function",
        ratio >= 0.9 and errors == 0,
        {"rates": rates, "ratio": ratio, "cpu_us_per_request": cpu, "runs": _dump(runs)},
    )


# Triggers (/api/v1/namespaces/_/triggers): one with one rule, one with ten, all to echo.
TRIGGER_RULES = {"bench-one": 1, "bench-ten": 10}


def fire_url(ctx: Context, trigger: str) -> str:
    return ctx.gateway_url(f"/api/v1/namespaces/_/triggers/{trigger}")


async def make_triggers(ctx: Context) -> None:
    async with aiohttp.ClientSession() as session:
        for trigger, rules in TRIGGER_RULES.items():
            base = ctx.gateway_url("/api/v1/namespaces/_")
            async with session.put(f"{base}/triggers/{trigger}?overwrite=true", json={}) as reply:
                reply.raise_for_status()
            for number in range(rules):
                rule = {"trigger": trigger, "action": "echo"}
                url = f"{base}/rules/{trigger}-{number}?overwrite=true"
                async with session.put(url, json=rule) as reply:
                    reply.raise_for_status()


async def fanned_out(ctx: Context, timeout_s: float = 600.0) -> float:
    """Until the fire stream is empty (every fire fanned out and acknowledged); how long."""
    names = Names.of(CommonSettings())
    client = await nats.connect(ctx.stack.nats_url)
    started = time.monotonic()
    try:
        js = client.jetstream()
        while time.monotonic() - started < timeout_s:
            if (await js.stream_info(names.fire_stream)).state.messages == 0:
                return time.monotonic() - started
            await asyncio.sleep(0.05)
    finally:
        await client.close()
    raise RuntimeError("the fan-out did not drain the fire stream")


async def event_streams(ctx: Context) -> tuple[str, ...]:
    names = Names.of(CommonSettings())
    return ("faas-async", names.activation_stream, names.index_stream, names.fire_stream)


async def alternate(
    ctx: Context, targets: dict[str, str]
) -> tuple[dict[str, list[LoadResult]], dict[str, list[float]], dict[str, list[float]]]:
    """Each target once per round, the order alternating by round, each run from empty
    streams; after a run, the fan-out is waited for (and the gateway CPU it took is counted:
    ``cpu_all``), so no run pays for the one before."""
    streams = await event_streams(ctx)
    for url in targets.values():  # warm-up
        await run_load(ctx.tool, url, connections=50, seconds=1, body=PARAMS, headers=JSON_HEADERS)
        await fanned_out(ctx)
    await purge(ctx, *streams)
    runs: dict[str, list[LoadResult]] = {name: [] for name in targets}
    cpu_accept: dict[str, list[float]] = {name: [] for name in targets}
    cpu_all: dict[str, list[float]] = {name: [] for name in targets}
    try:
        for round_number in range(ctx.rounds):
            order = list(targets) if round_number % 2 == 0 else list(reversed(targets))
            for name in order:
                cpu_before = ctx.gateway.cpu_seconds()
                result = await run_load(
                    ctx.tool,
                    targets[name],
                    connections=50,
                    seconds=ctx.seconds,
                    body=PARAMS,
                    headers=JSON_HEADERS,
                )
                cpu_run = ctx.gateway.cpu_seconds()
                drained_s = await fanned_out(ctx)
                if result.requests:
                    cpu_accept[name].append((cpu_run - cpu_before) * 1e6 / result.requests)
                    spent_s = ctx.gateway.cpu_seconds() - cpu_before
                    cpu_all[name].append(spent_s * 1e6 / result.requests)
                runs[name].append(result)
                await purge(ctx, *streams)
                ctx.log(
                    f"  round {round_number + 1}/{ctx.rounds} {name}: "
                    f"{result.requests_per_s:,.0f} req/s, errors {result.errors}, "
                    f"fan-out done {drained_s:.1f} s after the run"
                )
    finally:
        await purge(ctx, *streams)
    return runs, cpu_accept, cpu_all


def _median(values: dict[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(found) for name, found in values.items() if found}


async def trigger_fire_accept(ctx: Context) -> Result:
    """A trigger with one active rule fired, against /async-function/echo, 50 connections,
    the same 1 KiB JSON body: both answer 202 after one durable write (the fire stream; the
    record and the queue), and the fire's rule is queued afterwards by the fan-out, in the
    same gateway process."""
    await make_triggers(ctx)
    targets = {
        "/async-function/echo": ctx.gateway_url("/async-function/echo"),
        "fire (1 rule)": fire_url(ctx, "bench-one"),
    }
    runs, cpu_accept, cpu_all = await alternate(ctx, targets)
    rates = {name: median_rate(results) for name, results in runs.items()}
    ratio = rates["fire (1 rule)"] / rates["/async-function/echo"]
    accept, total = _median(cpu_accept), _median(cpu_all)
    errors = sum(result.errors for results in runs.values() for result in results)
    return Result(
        11,
        "Trigger fire with one active rule: accept rate, 50 connections",
        f"/async-function/echo {rates['/async-function/echo']:,.0f} req/s; fire "
        f"{rates['fire (1 rule)']:,.0f} req/s ({ratio:.2f}); gateway CPU per request during "
        "the run "
        + ", ".join(f"{name} {value:.0f} µs" for name, value in accept.items())
        + ", with the fan-out "
        + ", ".join(f"{name} {value:.0f} µs" for name, value in total.items())
        + f"; {errors} errors",
        ratio,
        ">= 0.8 x /async-function",
        ratio >= 0.8 and errors == 0,
        {
            "rates": rates,
            "ratio": ratio,
            "cpu_us_per_request_run": accept,
            "cpu_us_per_request_with_fanout": total,
            "runs": _dump(runs),
        },
    )


async def trigger_fan_out(ctx: Context) -> Result:
    """A trigger with ten active rules against one with one: the fire's cost as its client
    sees it (the accept rate: one durable write either way), and as the gateway pays it
    (CPU per fire, the fan-out to every rule's queued call included)."""
    await make_triggers(ctx)
    targets = {
        "1 rule": fire_url(ctx, "bench-one"),
        "10 rules": fire_url(ctx, "bench-ten"),
    }
    runs, cpu_accept, cpu_all = await alternate(ctx, targets)
    rates = {name: median_rate(results) for name, results in runs.items()}
    cost = rates["1 rule"] / rates["10 rules"]
    total = _median(cpu_all)
    cpu_ratio = total["10 rules"] / total["1 rule"] if len(total) == 2 else float("nan")
    errors = sum(result.errors for results in runs.values() for result in results)
    return Result(
        12,
        "Trigger fan-out: 10 active rules against 1, 50 connections",
        f"fire accept 1 rule {rates['1 rule']:,.0f} req/s, 10 rules {rates['10 rules']:,.0f} "
        f"req/s (cost {cost:.2f} x); gateway CPU per fire with its fan-out: "
        + ", ".join(f"{name} {value:.0f} µs" for name, value in total.items())
        + f" ({cpu_ratio:.2f} x, {cpu_ratio / 10:.2f} x per rule); {errors} errors",
        cost,
        "<= 2 x one rule (accept rate)",
        cost <= 2.0 and errors == 0,
        {
            "rates": rates,
            "cost": cost,
            "cpu_us_per_fire_with_fanout": total,
            "cpu_us_per_fire_run": _median(cpu_accept),
            "cpu_ratio": cpu_ratio,
            "runs": _dump(runs),
        },
    )


async def queued_drain_rss(ctx: Context) -> Result:
    """Issue 16: 100,000 queued calls (20,000 with --quick) to the instant function, drained by
    one fresh worker (``max_inflight`` 100) while its resident set is sampled every half second.

    The curve shows whether the worker's memory follows the calls in hand (flat) or the calls
    behind them (growing with the backlog); RSS is read from /proc, as in scenario 7.
    """
    count = 20_000 if ctx.quick else 100_000
    sample_every_s = 0.5
    await reset_callbacks(ctx)
    accept_rate = await enqueue(ctx, "/async-function/instant", count)
    worker = await ctx.stack.start_worker("worker", 100)
    worker.reset_peak()
    cpu_before = worker.cpu_seconds()
    started = time.monotonic()
    curve: list[tuple[float, float, int]] = []  # (seconds into the drain, RSS MiB, completed)
    try:
        give_up = started + 900
        while True:
            stats = await callback_stats(ctx)
            curve.append(
                (round(time.monotonic() - started, 1), worker.rss_bytes() / MIB, stats["unique"])
            )
            if stats["unique"] >= count or time.monotonic() > give_up:
                break
            await asyncio.sleep(sample_every_s)
        peak_mib = worker.peak_rss_bytes() / MIB
        cpu_s = worker.cpu_seconds() - cpu_before
    finally:
        await worker.stop()
    span_s = (stats["last"] or 0) - (stats["first"] or 0)
    completed_per_s = (stats["unique"] - 1) / span_s if span_s > 0 else 0.0
    complete = stats["unique"] == count and stats["duplicates"] == 0
    # Ten points of the curve in the table (the first, the last and evenly between); every
    # sample is in the JSON.
    step = max(1, (len(curve) - 1) // 9)
    shown = curve[::step] if curve[-1] in curve[::step] else [*curve[::step], curve[-1]]
    points = ", ".join(f"{t:.0f} s {mib:.0f}" for t, mib, _ in shown)
    return Result(
        13,
        f"{count:,} queued calls to an instant function drained by one worker: RSS curve",
        f"{stats['unique']:,}/{count:,} completed, {stats['duplicates']} duplicate callbacks, "
        f"{completed_per_s:,.0f} completions/s; worker RSS MiB over the drain: {points} "
        f"(peak {peak_mib:.0f} MiB); {cpu_s * 1e6 / max(stats['unique'], 1):.0f} µs CPU per call",
        peak_mib,
        "all complete, none twice; RSS curve reported",
        complete,
        {
            "calls": count,
            "completed": stats["unique"],
            "duplicate_callbacks": stats["duplicates"],
            "enqueue_per_s": accept_rate,
            "completed_per_s": completed_per_s,
            "worker_peak_rss_mib": peak_mib,
            "worker_cpu_us_per_call": cpu_s * 1e6 / stats["unique"] if stats["unique"] else None,
            "rss_curve": [
                {"s": t, "rss_mib": round(mib, 1), "completed": done} for t, mib, done in curve
            ],
        },
    )


SCENARIOS = {
    1: sync_throughput,
    2: sync_latency,
    3: big_bodies,
    4: async_accept,
    5: async_slow_function,
    6: async_instant_function,
    7: capacity,
    8: activations,
    9: openwhisk_blocking_latency,
    10: openwhisk_accept,
    11: trigger_fire_accept,
    12: trigger_fan_out,
    13: queued_drain_rss,
}


def _dump(runs: dict[str, list[LoadResult]]) -> dict[str, list[dict[str, object]]]:
    return {name: [result.as_dict() for result in results] for name, results in runs.items()}
