"""Both processes' /metrics, scraped over HTTP from a real stack after known calls; and the
dashboard and the operations guide naming only metrics that exist."""

import asyncio
import json
import re
import time

import aiohttp
from nats.aio.client import Client as NatsClient

from faas_gateway.core.functions import Registry
from gateway.metrics import GatewayMetrics
from queue_worker.metrics import WorkerMetrics
from queue_worker.pending import by_function
from tests.conftest import RunningGateway, StartGateway, StartRecorder, StartWorker, ready_gateway
from tests.harness import (
    DEADLINE_S,
    ROOT,
    NatsServer,
    answer_in_turn,
    post_accepted,
    registry_of,
    respond,
    sample,
    samples_named,
    scrape,
    wait_completed,
    wait_for,
    wait_until,
    worker_url,
)

PENDING = "queue_worker_pending_messages"
INFLIGHT = "queue_worker_function_invocation_inflight"
PROCESSED = "queue_worker_messages_processed_total"
QUEUED = "queue_worker_queued_seconds"


async def sync_call(http: aiohttp.ClientSession, gateway: RunningGateway, function: str) -> int:
    async with http.post(gateway.url(f"/function/{function}"), data=b"hi") as response:
        await response.read()
        return response.status


# the worker and the gateway after known calls


async def test_blocked_calls_show_as_pending_and_inflight_then_drain_to_zero(
    recorder: StartRecorder,
    start_gateway: StartGateway,
    start_worker: StartWorker,
    http: aiohttp.ClientSession,
) -> None:
    gate = asyncio.Event()
    blocked = await recorder(wait_for(gate))
    quick = await recorder()
    registry = registry_of(
        blocked=blocked.url,
        quick=quick.url,
        bulk={"url": quick.url, "annotations": {"com.openfaas.queue": "bulk"}},
    )
    gateway = await ready_gateway(start_gateway, http, registry)
    worker = await start_worker(registry, max_inflight=1)
    worker_metrics = worker_url(worker, "/metrics")

    assert await sync_call(http, gateway, "quick") == 200
    for _ in range(3):
        await post_accepted(http, gateway, "/async-function/blocked")
    posted_at = time.time()
    await post_accepted(http, gateway, "/async-function/bulk")  # no worker serves its queue
    await blocked.wait_for_requests(1, DEADLINE_S)

    # JetStream acked all three before the 202s, and none can finish while the gate is shut.
    metrics = await scrape(http, worker_metrics)
    assert samples_named(metrics, PENDING) == [
        {"function_name": "blocked", "queue_name": "default"}
    ]
    assert sample(metrics, PENDING, function_name="blocked", queue_name="default") == 3
    assert sample(metrics, INFLIGHT, function_name="blocked") == 1
    # One call started; the next is fetched ahead but waits for the only slot: not started.
    assert sample(metrics, f"{QUEUED}_count", function_name="blocked") == 1
    assert samples_named(metrics, PROCESSED) == []

    gateway_metrics = await scrape(http, gateway.url("/metrics"))
    accepted = {"outcome": "accepted", "code": "202"}
    assert (
        sample(gateway_metrics, "gateway_async_requests_total", function_name="blocked", **accepted)
        == 3
    )
    assert (
        sample(gateway_metrics, "gateway_async_requests_total", function_name="bulk", **accepted)
        == 1
    )
    quick_200 = {"function_name": "quick", "code": "200"}
    assert sample(gateway_metrics, "gateway_function_invocation_total", **quick_200) == 1
    assert sample(gateway_metrics, "gateway_functions_seconds_count", **quick_200) == 1
    assert (
        sample(gateway_metrics, "gateway_function_invocation_started", function_name="quick") == 1
    )

    released_at = time.time()
    gate.set()
    await wait_completed(worker, 3)

    async def drained() -> str | None:
        metrics = await scrape(http, worker_metrics)
        pending = sample(metrics, PENDING, function_name="blocked", queue_name="default")
        return metrics if pending == 0 else None

    # The acks are sent without waiting for the server, so the count may lag a moment.
    metrics = await wait_until(drained, DEADLINE_S, "pending to read 0")
    assert sample(metrics, INFLIGHT, function_name="blocked") == 0
    assert sample(metrics, PROCESSED, function_name="blocked", outcome="succeeded") == 3
    assert sample(metrics, f"{QUEUED}_count", function_name="blocked") == 3
    # Calls two and three were stored before posted_at and could start only after released_at:
    # the time is measured to the start of the call, not to the fetch.
    queued_sum = sample(metrics, f"{QUEUED}_sum", function_name="blocked")
    assert queued_sum is not None and queued_sum >= 2 * (released_at - posted_at)


async def test_retries_dead_letters_and_callbacks_by_outcome(
    recorder: StartRecorder,
    start_gateway: StartGateway,
    start_worker: StartWorker,
    http: aiohttp.ClientSession,
) -> None:
    failing = await recorder(respond(503, b"busy"))
    fine = await recorder()
    receiver = await recorder()
    refusing_receiver = await recorder(answer_in_turn(500))
    registry = registry_of(failing=failing.url, fine=fine.url)
    gateway = await ready_gateway(start_gateway, http, registry)
    worker = await start_worker(registry, max_retry_attempts=3, callback_max_attempts=2)

    await post_accepted(
        http, gateway, "/async-function/failing", headers={"X-Callback-Url": receiver.url}
    )
    await post_accepted(
        http, gateway, "/async-function/fine", headers={"X-Callback-Url": refusing_receiver.url}
    )
    await wait_completed(worker, 2)

    metrics = await scrape(http, worker_url(worker, "/metrics"))
    assert len(failing.requests) == 3
    assert sample(metrics, "queue_worker_retries_total", function_name="failing") == 2
    assert sample(metrics, "queue_worker_dead_letters_total", function_name="failing") == 1
    assert sample(metrics, PROCESSED, function_name="failing", outcome="failed") == 1
    assert sample(metrics, PROCESSED, function_name="failing", outcome="succeeded") is None
    durations = "queue_worker_function_duration_seconds_count"
    assert sample(metrics, durations, function_name="failing", code="503") == 3
    # Queued time once per call, not per attempt.
    assert sample(metrics, f"{QUEUED}_count", function_name="failing") == 1
    callbacks = "queue_worker_callbacks_total"
    assert sample(metrics, callbacks, function_name="failing", outcome="delivered") == 1
    assert sample(metrics, callbacks, function_name="failing", outcome="failed") is None
    assert len(refusing_receiver.requests) == 2
    assert sample(metrics, callbacks, function_name="fine", outcome="failed") == 1
    assert sample(metrics, callbacks, function_name="fine", outcome="delivered") is None
    assert sample(metrics, PROCESSED, function_name="fine", outcome="succeeded") == 1
    assert sample(metrics, "queue_worker_retries_total", function_name="fine") is None
    assert sample(metrics, "queue_worker_dead_letters_total", function_name="fine") is None


async def test_a_cancelled_running_call_leaves_inflight_and_counts_as_cancelled(
    recorder: StartRecorder,
    start_gateway: StartGateway,
    start_worker: StartWorker,
    http: aiohttp.ClientSession,
) -> None:
    gate = asyncio.Event()
    blocked = await recorder(wait_for(gate))
    registry = registry_of(blocked=blocked.url)
    gateway = await ready_gateway(start_gateway, http, registry)
    worker = await start_worker(registry)
    worker_metrics = worker_url(worker, "/metrics")

    call_id = await post_accepted(http, gateway, "/async-function/blocked")
    await blocked.wait_for_requests(1, DEADLINE_S)
    assert sample(await scrape(http, worker_metrics), INFLIGHT, function_name="blocked") == 1
    async with http.delete(gateway.url(f"/async-function/{call_id}")) as response:
        assert response.status == 202

    async def counted() -> str | None:
        metrics = await scrape(http, worker_metrics)
        cancelled = sample(metrics, PROCESSED, function_name="blocked", outcome="cancelled")
        return metrics if cancelled == 1 else None

    metrics = await wait_until(counted, DEADLINE_S, "the cancelled call to be counted")
    assert sample(metrics, INFLIGHT, function_name="blocked") == 0
    assert samples_named(metrics, PROCESSED) == [
        {"function_name": "blocked", "outcome": "cancelled"}
    ]
    gate.set()


async def test_deferred_calls_are_neither_inflight_nor_retries_and_their_queued_time_counts_once(
    nats_client: NatsClient,
    recorder: StartRecorder,
    start_gateway: StartGateway,
    start_worker: StartWorker,
    http: aiohttp.ClientSession,
) -> None:
    gate = asyncio.Event()
    limited = await recorder(wait_for(gate))
    registry = registry_of(limited={"url": limited.url, "annotations": {"max_inflight": "1"}})
    gateway = await ready_gateway(start_gateway, http, registry)
    worker = await start_worker(registry, max_inflight=3, defer_wait_s=0.05)
    worker_metrics = worker_url(worker, "/metrics")

    for _ in range(2):
        await post_accepted(http, gateway, "/async-function/limited")
    await limited.wait_for_requests(1, DEADLINE_S)

    async def deferred() -> bool:
        info = await nats_client.jetstream().consumer_info("faas-async", "faas-queue-worker")
        return (info.num_redelivered or 0) >= 1

    await wait_until(deferred, DEADLINE_S, "the second call to be deferred")
    metrics = await scrape(http, worker_metrics)
    assert sample(metrics, INFLIGHT, function_name="limited") == 1
    assert sample(metrics, PENDING, function_name="limited", queue_name="default") == 2
    assert sample(metrics, f"{QUEUED}_count", function_name="limited") == 1

    gate.set()
    await wait_completed(worker, 2)
    metrics = await scrape(http, worker_metrics)
    assert sample(metrics, PROCESSED, function_name="limited", outcome="succeeded") == 2
    assert sample(metrics, "queue_worker_retries_total", function_name="limited") is None
    # A deferral is not an attempt: the deferred call's first attempt came after it.
    assert sample(metrics, f"{QUEUED}_count", function_name="limited") == 2
    assert sample(metrics, INFLIGHT, function_name="limited") == 0


async def test_nats_restart_counts_a_reconnect_and_pending_is_absent_while_down(
    nats_server: NatsServer,
    recorder: StartRecorder,
    start_gateway: StartGateway,
    start_worker: StartWorker,
    http: aiohttp.ClientSession,
) -> None:
    gate = asyncio.Event()
    function = await recorder(wait_for(gate))
    registry = registry_of(echo=function.url)
    gateway = await ready_gateway(start_gateway, http, registry)
    worker = await start_worker(registry)
    worker_metrics = worker_url(worker, "/metrics")
    reconnects = "queue_worker_nats_reconnects_total"

    await post_accepted(http, gateway, "/async-function/echo")
    await function.wait_for_requests(1, DEADLINE_S)
    metrics = await scrape(http, worker_metrics)
    assert sample(metrics, PENDING, function_name="echo", queue_name="default") == 1
    assert sample(metrics, reconnects) == 0
    assert sample(await scrape(http, gateway.url("/metrics")), "gateway_nats_reconnects_total") == 0
    gate.set()
    await wait_completed(worker, 1)

    async def drained() -> bool:
        metrics = await scrape(http, worker_metrics)
        return sample(metrics, PENDING, function_name="echo", queue_name="default") == 0

    await wait_until(drained, DEADLINE_S, "pending to read 0")

    nats_server.kill()

    async def worker_unhealthy() -> bool:
        async with http.get(worker_url(worker, "/healthz")) as response:
            return response.status == 503

    await wait_until(worker_unhealthy, DEADLINE_S, "the worker to notice NATS is gone")
    metrics = await scrape(http, worker_metrics)
    assert samples_named(metrics, PENDING) == []  # unknown, not an old number

    await nats_server.start()

    async def reconnected() -> str | None:
        metrics = await scrape(http, worker_metrics)
        return metrics if sample(metrics, reconnects) == 1 else None

    await wait_until(reconnected, DEADLINE_S, "the reconnect to be counted")

    async def gateway_reconnected() -> bool:
        metrics = await scrape(http, gateway.url("/metrics"))
        return sample(metrics, "gateway_nats_reconnects_total") == 1

    await wait_until(gateway_reconnected, DEADLINE_S, "the gateway's reconnect to be counted")

    async def pending_again() -> bool:
        metrics = await scrape(http, worker_metrics)
        return sample(metrics, PENDING, function_name="echo", queue_name="default") == 0

    await wait_until(pending_again, DEADLINE_S, "pending to be read again")


# series names: the dashboard and docs/operations.md against what the processes register


def exported_metrics() -> dict[str, set[str]]:
    """{metric name as documented: the series names it exposes}, for both processes."""
    metrics: dict[str, set[str]] = {}
    gateway = GatewayMetrics()
    gateway.count_services(Registry())
    for registry in (gateway.registry, WorkerMetrics().registry):
        for family in registry.collect():
            if family.type == "counter":
                metrics[f"{family.name}_total"] = {f"{family.name}_total"}
            elif family.type == "histogram":
                suffixes = ("_bucket", "_sum", "_count")
                metrics[family.name] = {family.name + suffix for suffix in suffixes}
            else:
                metrics[family.name] = {family.name}
    return metrics


PROMQL_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without"}


def metric_names_in(expr: str) -> set[str]:
    """The metric names a PromQL expression selects."""
    expr = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)  # strings (label values)
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
    grouping = r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)"
    expr = re.sub(grouping, "", expr)
    names = set()
    for match in re.finditer(r"(?<![\w.$])[A-Za-z_:][\w:]*", expr):
        if expr[match.end() :].lstrip().startswith("("):
            continue  # a function
        if match.group() not in PROMQL_KEYWORDS:
            names.add(match.group())
    return names


def test_promql_parsing_finds_the_metric_names() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (function_name, le) (rate(a_seconds_bucket{x=~"$f", '
        'y="b{c}"}[$__rate_interval]))) / ignoring(code) max without (q) (b_total offset 5m)'
    )
    assert metric_names_in(expr) == {"a_seconds_bucket", "b_total"}
    assert metric_names_in("up") == {"up"}


def dashboard_exprs() -> list[str]:
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "dashboard.json").read_text())
    exprs = []
    for panel in dashboard["panels"]:
        for inner in [panel, *panel.get("panels", [])]:
            exprs += [target["expr"] for target in inner.get("targets", [])]
    return exprs


def test_the_dashboard_queries_only_exported_metrics_and_shows_each_worker_and_async_one() -> None:
    exported = exported_metrics()
    series = set().union(*exported.values())
    referenced: set[str] = set()
    for expr in dashboard_exprs():
        names = metric_names_in(expr)
        assert names, f"no metric in {expr}"
        assert names <= series, f"{expr} queries {names - series}, which nothing exports"
        referenced |= names
    shown = {name for name, names in exported.items() if names & referenced}
    required = {
        "gateway_function_invocation_total",
        "gateway_functions_seconds",
        "gateway_async_requests_total",
        "queue_worker_pending_messages",
        "queue_worker_function_invocation_inflight",
        "queue_worker_messages_processed_total",
        "queue_worker_retries_total",
        "queue_worker_dead_letters_total",
        "queue_worker_callbacks_total",
        "queue_worker_queued_seconds",
        "queue_worker_nats_reconnects_total",
    }
    assert required <= shown, f"no panel for {required - shown}"


def test_the_operations_guide_metric_table_lists_exactly_the_exported_metrics() -> None:
    guide = (ROOT / "docs" / "operations.md").read_text()
    section = guide.split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    documented = re.findall(r"^\| `([a-z_:]+)` \| (?:gateway|worker) \|", section, re.MULTILINE)
    assert len(documented) == len(set(documented)), "a metric is listed twice"
    assert set(documented) == set(exported_metrics())


def test_pending_counts_are_keyed_by_function() -> None:
    subjects = {"faas.async.default.echo": 3, "faas.async.default.a-b": 1}
    assert by_function(subjects, "faas.async.default.") == {"echo": 3, "a-b": 1}
    assert by_function(None, "faas.async.default.") == {}


def test_drained_functions_read_zero_and_unknown_counts_leave_no_series() -> None:
    metrics = WorkerMetrics()

    def value(function: str) -> float | None:
        labels = {"function_name": function, "queue_name": "q"}
        return metrics.registry.get_sample_value(PENDING, labels)

    metrics.set_pending("q", {"a": 2, "b": 1})
    metrics.set_pending("q", {"b": 4})
    assert (value("a"), value("b")) == (0, 4)
    metrics.set_pending("q", None)
    assert (value("a"), value("b")) == (None, None)
    metrics.set_pending("q", {"a": 1})
    assert (value("a"), value("b")) == (1, 0)
