"""Feeds against real gateways, workers and a nats-server: the built-in alarms (each tick
once, READ, UPDATE, PAUSE, stopDate, once with deleteAfterFire, DELETE stopping it), a user's
feed action told of its trigger's lifecycle, the NATS subject feed and OpenFaaS's topic and
cron-function annotations (every message and every tick one invocation across two gateways),
sync invocations, and the parameters a demanding user gets wrong (docs/events.md)."""

import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from nats.aio.client import Client as NatsClient

from faas_gateway.core.events import rule_call_id, tick_fire_id
from faas_gateway.core.functions import Registry
from tests.conftest import RunningGateway, StartGateway, StartRecorder, StartWorker, ready_gateway
from tests.gateway.test_openwhisk import (
    API_KEY,
    AUTH,
    Reply,
    Whisk,
    assert_whisk_error,
    whisk_gateway,
)
from tests.harness import (
    DEADLINE_S,
    RecordedRequest,
    Recorder,
    get_json,
    registry_of,
    sample,
    scrape,
    wait_until,
)

EVERY_SECOND = "* * * * * *"  # six fields: seconds first
# 1,000 events through fire stream, fan-out, queue and worker: seconds alone, minutes on a
# machine busy with other suites; past the default 120 s per test, the deadline is its own.
THOUSAND_S = 300.0


async def echo(request: web.Request, recorded: RecordedRequest) -> web.Response:
    return web.Response(body=recorded.body, content_type=request.content_type)


async def feed_ok(request: web.Request, recorded: RecordedRequest) -> web.Response:
    return web.json_response({"configured": json.loads(recorded.body)["lifecycleEvent"]})


async def feed_refuses(request: web.Request, recorded: RecordedRequest) -> web.Response:
    return web.json_response({"error": "no such repository"}, status=400)


FUNCTIONS = {"hello": echo, "other": echo, "myfeed": feed_ok, "badfeed": feed_refuses}


async def start_whisk(
    recorder: StartRecorder,
    start_gateway: StartGateway,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    functions: dict[str, Recorder] | None = None,
) -> Whisk:
    if functions is None:
        functions = {name: await recorder(responder) for name, responder in FUNCTIONS.items()}
    gateway = await whisk_gateway(
        start_gateway,
        http,
        registry_of(**{name: server.url for name, server in functions.items()}),
        tmp_path / "no-secrets",
    )
    return Whisk(gateway, Registry(), http, functions)


@pytest.fixture
async def whisk(
    recorder: StartRecorder,
    start_gateway: StartGateway,
    start_worker: StartWorker,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> Whisk:
    made = await start_whisk(recorder, start_gateway, http, tmp_path)
    await start_worker(registry_of(**{name: s.url for name, s in made.functions.items()}))
    return made


async def made(whisk: Whisk, path: str, body: Any) -> Any:
    reply = await whisk.call("PUT", f"/namespaces/_/{path}", json=body)
    assert reply.status == 200, reply.body
    return reply.body


async def feed(whisk: Whisk, name: str, event: str, trigger: str, **params: Any) -> Reply:
    """A blocking invoke of a built-in feed, as the npm client's feeds.* send it."""
    body = {"lifecycleEvent": event, "triggerName": f"/_/{trigger}", "authKey": API_KEY}
    return await whisk.call(
        "POST",
        f"/namespaces/whisk.system/actions/{name}?blocking=true",
        json={**body, **params},
    )


async def feed_result(whisk: Whisk, name: str, event: str, trigger: str, **params: Any) -> Any:
    reply = await feed(whisk, name, event, trigger, **params)
    assert reply.status == 200, reply.body
    assert reply.body["response"]["success"] is True
    return reply.body["response"]["result"]


async def trigger_with_rule(whisk: Whisk, trigger: str, rule: str, action: str) -> None:
    await made(whisk, f"triggers/{trigger}", {})
    await made(whisk, f"rules/{rule}", {"trigger": trigger, "action": action})


def now_ms() -> int:
    return int(time.time() * 1000)


def ticks_fired(recorder: Recorder, trigger: str, rule: str, since_ms: int) -> list[int]:
    """The whole-second ticks of ``trigger``'s alarm whose invocation of ``rule`` reached the
    function, found from the call ids (which only the tick decides)."""
    seen = {request.headers.get("X-Call-Id") for request in recorder.requests}
    ticks = []
    for tick in range(since_ms - since_ms % 1000, now_ms() + 1000, 1000):
        if rule_call_id(tick_fire_id("alarm", trigger, tick), rule) in seen:
            ticks.append(tick)
    return ticks


def calls_per_tick(recorder: Recorder, ids: dict[str, int]) -> dict[int, int]:
    counts: dict[int, int] = {}
    for request in recorder.requests:
        tick = ids.get(request.headers.get("X-Call-Id", ""))
        if tick is not None:
            counts[tick] = counts.get(tick, 0) + 1
    return counts


async def later_ticks(whisk: Whisk, after_ms: int, count: int) -> None:
    """A sentinel alarm on its own trigger: once it has fired ``count`` ticks after
    ``after_ms``, the scheduler has gone on that long (what did not fire meanwhile won't)."""
    await trigger_with_rule(whisk, "sentinel", "sentinel-rule", "other")
    await feed_result(whisk, "alarms/alarm", "CREATE", "sentinel", cron=EVERY_SECOND)

    def enough() -> bool:
        fired = ticks_fired(whisk.functions["other"], "sentinel", "sentinel-rule", after_ms)
        return len([tick for tick in fired if tick > after_ms]) >= count

    await wait_until(enough, DEADLINE_S, f"{count} sentinel ticks")


# --- alarms -------------------------------------------------------------------------------------


async def test_an_alarm_fires_its_rule_each_tick_reads_back_and_stops_once_deleted(
    whisk: Whisk,
) -> None:
    await trigger_with_rule(whisk, "every", "r", "hello")
    start = now_ms()
    created = await feed_result(
        whisk, "alarms/alarm", "CREATE", "every", cron=EVERY_SECOND, trigger_payload="tick"
    )
    assert created == {"status": "success"}

    await whisk.functions["hello"].wait_for_requests(2, DEADLINE_S)
    for request in whisk.functions["hello"].requests:
        assert json.loads(request.body) == {"payload": "tick"}

    read = await feed_result(whisk, "alarms/alarm", "READ", "every")
    assert read["config"] == {
        "name": "every",
        "namespace": "guest",
        "payload": {"payload": "tick"},
        "cron": EVERY_SECOND,
    }
    assert read["status"]["active"] is True
    assert isinstance(read["status"]["dateChanged"], int)
    assert read["status"]["dateChangedISO"].endswith("Z")

    deleted = await feed_result(whisk, "alarms/alarm", "DELETE", "every")
    assert deleted == {"status": "success"}
    stopped_ms = now_ms()
    await later_ticks(whisk, stopped_ms, 3)
    fired = ticks_fired(whisk.functions["hello"], "every", "r", start)
    assert len(fired) >= 2
    assert max(fired) <= stopped_ms, (fired, stopped_ms)
    assert fired == list(range(fired[0], fired[-1] + 1000, 1000))  # every tick, each once
    gone = await feed(whisk, "alarms/alarm", "READ", "every")
    assert gone.status == 502
    assert gone.body["response"]["result"] == {
        "error": "trigger /guest/every has no alarms/alarm feed"
    }


async def test_pause_stops_an_alarm_and_unpause_starts_it_again(whisk: Whisk) -> None:
    await trigger_with_rule(whisk, "paused", "r", "hello")
    start = now_ms()
    await feed_result(whisk, "alarms/alarm", "CREATE", "paused", cron=EVERY_SECOND)
    await whisk.functions["hello"].wait_for_requests(1, DEADLINE_S)
    await feed_result(whisk, "alarms/alarm", "PAUSE", "paused")
    paused_ms = now_ms()
    read = await feed_result(whisk, "alarms/alarm", "READ", "paused")
    assert read["status"]["active"] is False
    assert read["status"]["reason"]["kind"] == "USER"
    await later_ticks(whisk, paused_ms, 2)
    before = ticks_fired(whisk.functions["hello"], "paused", "r", start)
    assert max(before) <= paused_ms

    await feed_result(whisk, "alarms/alarm", "UNPAUSE", "paused")
    resumed_ms = now_ms()

    def again() -> bool:
        return max(ticks_fired(whisk.functions["hello"], "paused", "r", start)) > resumed_ms

    await wait_until(again, DEADLINE_S, "a tick after UNPAUSE")


async def test_stop_date_ends_an_alarm_and_its_read_says_so(whisk: Whisk) -> None:
    await trigger_with_rule(whisk, "ending", "r", "hello")
    start = now_ms()
    stop = start + 2500
    await feed_result(whisk, "alarms/alarm", "CREATE", "ending", cron=EVERY_SECOND, stopDate=stop)
    await later_ticks(whisk, stop, 2)
    fired = ticks_fired(whisk.functions["hello"], "ending", "r", start)
    assert fired and max(fired) <= stop
    read = await feed_result(whisk, "alarms/alarm", "READ", "ending")
    assert read["config"]["stopDate"] == stop
    assert read["status"]["active"] is False
    assert read["status"]["reason"]["kind"] == "AUTO"


async def test_once_fires_once_then_deletes_the_trigger_and_its_rules(whisk: Whisk) -> None:
    await trigger_with_rule(whisk, "once", "r", "hello")
    date = now_ms() + 1500
    await feed_result(whisk, "alarms/once", "CREATE", "once", date=date, deleteAfterFire="rules")
    read = await feed_result(whisk, "alarms/once", "READ", "once")
    assert read["config"]["date"] == date
    assert read["config"]["deleteAfterFire"] == "rules"
    [request] = await whisk.functions["hello"].wait_for_requests(1, DEADLINE_S)
    assert request.headers["X-Call-Id"] == rule_call_id(tick_fire_id("alarm", "once", date), "r")

    async def deleted() -> bool:
        trigger = await whisk.call("GET", "/namespaces/_/triggers/once")
        rule = await whisk.call("GET", "/namespaces/_/rules/r")
        return trigger.status == rule.status == 404

    await wait_until(deleted, DEADLINE_S, "the trigger and rule to go")
    assert len(whisk.functions["hello"].requests) == 1


async def test_interval_update_and_its_read(whisk: Whisk) -> None:
    await made(whisk, "triggers/slow", {})
    await feed_result(
        whisk, "alarms/interval", "CREATE", "slow", minutes=5, trigger_payload={"a": 1}
    )
    read = await feed_result(whisk, "alarms/interval", "READ", "slow")
    assert read["config"] == {
        "name": "slow",
        "namespace": "guest",
        "payload": {"a": 1},
        "minutes": 5,
    }
    await feed_result(whisk, "alarms/interval", "UPDATE", "slow", minutes="10")
    read = await feed_result(whisk, "alarms/interval", "READ", "slow")
    assert (read["config"]["minutes"], read["config"]["payload"]) == (10, {"a": 1})
    # The same CREATE again is the same feed (wsk and a trigger PUT may both send it);
    # another one is refused.
    again = await feed_result(
        whisk, "alarms/interval", "CREATE", "slow", minutes=10, trigger_payload={"a": 1}
    )
    assert again == {"status": "success"}
    other = await feed(whisk, "alarms/interval", "CREATE", "slow", minutes=3)
    assert other.status == 502
    assert "has a feed already" in other.body["response"]["result"]["error"]


# --- what must be refused -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "event", "params", "message"),
    [
        ("alarms/alarm", "CREATE", {}, "alarms trigger feed is missing the cron parameter"),
        ("alarms/alarm", "CREATE", {"cron": "* * *"}, "cron pattern '* * *' is not valid"),
        ("alarms/alarm", "CREATE", {"cron": "61 * * * *"}, "cron pattern '61 * * * *' is not"),
        ("alarms/alarm", "CREATE", {"cron": "* * * * * * *"}, "cron pattern"),
        ("alarms/alarm", "CREATE", {"cron": 5}, "cron pattern 5 is not valid"),
        ("alarms/alarm", "CREATE", {"cron": "x" * 5000}, "cron pattern"),
        ("alarms/alarm", "CREATE", {"cron": "0 0 31 2 *"}, "cron pattern '0 0 31 2 *' never"),
        (
            "alarms/alarm",
            "CREATE",
            {"cron": "* * * * *", "timezone": "Mars/Olympus"},
            "timezone 'Mars/Olympus' is not a known time zone",
        ),
        (
            "alarms/alarm",
            "CREATE",
            {"cron": "* * * * *", "startDate": "2001-01-01T00:00:00Z"},
            "startDate parameter '2001-01-01T00:00:00Z' must be in the future",
        ),
        (
            "alarms/alarm",
            "CREATE",
            {"cron": "* * * * *", "stopDate": "tomorrow"},
            "stopDate parameter 'tomorrow' is not a valid Date",
        ),
        (
            "alarms/alarm",
            "CREATE",
            {
                "cron": "* * * * *",
                "startDate": "2999-01-02T00:00:00Z",
                "stopDate": "2999-01-01T00:00:00Z",
            },
            "stopDate parameter '2999-01-01T00:00:00Z' must be greater than the startDate",
        ),
        (
            "alarms/alarm",
            "CREATE",
            {"cron": "* * * * *", "trigger_payload": [1]},
            "trigger_payload must be a JSON object or a string",
        ),
        ("alarms/interval", "CREATE", {}, "interval trigger feed is missing the minutes"),
        ("alarms/interval", "CREATE", {"minutes": 0}, "the minutes parameter must be an integer"),
        ("alarms/interval", "CREATE", {"minutes": 1.5}, "the minutes parameter must be"),
        ("alarms/interval", "CREATE", {"minutes": "x"}, "the minutes parameter must be"),
        ("alarms/once", "CREATE", {}, "alarms once trigger feed is missing the date parameter"),
        ("alarms/once", "CREATE", {"date": 1000}, "date parameter '1000' must be in the future"),
        (
            "alarms/once",
            "CREATE",
            {"date": "2999-01-01", "deleteAfterFire": "maybe"},
            "deleteAfterFire parameter must be one of [false, true, rules].",
        ),
        ("nats/subject", "CREATE", {}, "nats subject feed is missing the subject parameter"),
        ("nats/subject", "CREATE", {"subject": "events.a b"}, "subject must be a NATS subject"),
        ("nats/subject", "CREATE", {"subject": "events.>.x"}, "subject must be a NATS subject"),
        ("nats/subject", "CREATE", {"subject": "faas.async.default.x"}, "subject 'faas.async"),
        ("nats/subject", "CREATE", {"subject": ">"}, "subject '>' is outside the subjects"),
        (
            "nats/subject",
            "CREATE",
            {"subject": "events.x", "queue": "bad group"},
            "queue must be a NATS queue group name",
        ),
        ("alarms/alarm", "EXPLODE", {"cron": "* * * * *"}, "unsupported lifecycleEvent"),
        ("alarms/alarm", "", {"cron": "* * * * *"}, "unsupported lifecycleEvent"),
        ("alarms/alarm", "UPDATE", {}, "trigger /guest/t has no alarms/alarm feed"),
    ],
)
async def test_feed_parameters_that_cannot_be_taken_are_an_application_error(
    whisk: Whisk, name: str, event: str, params: dict[str, Any], message: str
) -> None:
    await made(whisk, "triggers/t", {})
    reply = await feed(whisk, name, event, "t", **params)
    assert reply.status == 502, reply.body
    response = reply.body["response"]
    assert (response["status"], response["success"]) == ("application error", False)
    assert response["result"]["error"].startswith(message), response["result"]
    # With result=true, as APISIX asks: the error alone.
    body = {"lifecycleEvent": event, "triggerName": "/_/t", "authKey": API_KEY, **params}
    only = await whisk.call(
        "POST",
        f"/namespaces/whisk.system/actions/{name}?blocking=true&result=true",
        json=body,
    )
    assert (only.status, only.body) == (502, response["result"])
    read = await feed(whisk, name, "READ", "t")
    assert read.status == 502  # nothing was made


async def test_trigger_names_a_feed_cannot_use_and_feeds_that_do_not_exist(whisk: Whisk) -> None:
    await made(whisk, "triggers/t", {})
    for trigger_name, message in [
        (None, "no trigger name parameter was provided"),
        ("/other/t", "trigger /other/t does not exist"),
        ("/_/ghost", "trigger /guest/ghost does not exist"),
        ("/_/pkg/t", "trigger /_/pkg/t does not exist"),
        ("/_/bad name", "invalid trigger name"),
    ]:
        reply = await whisk.call(
            "POST",
            "/namespaces/whisk.system/actions/alarms/alarm?blocking=true",
            json={"lifecycleEvent": "CREATE", "triggerName": trigger_name, "cron": "* * * * *"},
        )
        assert reply.status == 502, reply.body
        assert reply.body["response"]["result"]["error"].startswith(message)
    unknown = await whisk.call(
        "POST", "/namespaces/whisk.system/actions/alarms/nope?blocking=true", json={}
    )
    assert_whisk_error(unknown, 404)
    not_an_object = await whisk.call(
        "POST", "/namespaces/whisk.system/actions/alarms/alarm?blocking=true", json=[1]
    )
    assert_whisk_error(not_an_object, 400, "The request content was malformed")
    action = await whisk.call("GET", "/namespaces/whisk.system/actions/alarms/alarm")
    assert action.status == 200
    assert {"key": "feed", "value": True} in action.body["annotations"]


# --- feeds named by a trigger's annotation ------------------------------------------------------


async def test_a_user_feed_action_is_told_of_its_triggers_create_update_and_delete(
    whisk: Whisk,
) -> None:
    feed_fn = whisk.functions["myfeed"]
    trigger = await made(
        whisk,
        "triggers/hooked",
        {
            "annotations": [{"key": "feed", "value": "/_/myfeed"}],
            "parameters": [{"key": "repo", "value": "octo/cat"}],
        },
    )
    assert trigger["parameters"] == []  # the feed's, not the trigger's (as wsk --feed)
    [create] = feed_fn.requests
    assert json.loads(create.body) == {
        "repo": "octo/cat",
        "lifecycleEvent": "CREATE",
        "triggerName": "/guest/hooked",
        "authKey": API_KEY,
    }
    await made(
        whisk,
        "triggers/hooked?overwrite=true",
        {"parameters": [{"key": "repo", "value": "octo/dog"}]},
    )
    update = json.loads(feed_fn.requests[1].body)
    assert (update["lifecycleEvent"], update["repo"]) == ("UPDATE", "octo/dog")
    # Without parameters there is nothing to tell it (wsk --feed sends them to the feed
    # action itself).
    await made(whisk, "triggers/hooked?overwrite=true", {"publish": True})
    assert len(feed_fn.requests) == 2
    deleted = await whisk.call("DELETE", "/namespaces/_/triggers/hooked")
    assert deleted.status == 200
    assert json.loads(feed_fn.requests[2].body)["lifecycleEvent"] == "DELETE"


async def test_a_feed_action_that_refuses_leaves_no_trigger(whisk: Whisk) -> None:
    refused = await whisk.call(
        "PUT",
        "/namespaces/_/triggers/hooked",
        json={
            "annotations": [{"key": "feed", "value": "badfeed"}],
            "parameters": [{"key": "repo", "value": "none"}],
        },
    )
    assert_whisk_error(refused, 502, "feed action badfeed failed on CREATE")
    assert "no such repository" in refused.body["error"]
    assert_whisk_error(await whisk.call("GET", "/namespaces/_/triggers/hooked"), 404)

    builtin = await whisk.call(
        "PUT",
        "/namespaces/_/triggers/timed",
        json={
            "annotations": [{"key": "feed", "value": "/whisk.system/alarms/alarm"}],
            "parameters": [{"key": "cron", "value": "not cron"}],
        },
    )
    assert_whisk_error(builtin, 400, "feed /whisk.system/alarms/alarm: cron pattern")
    assert_whisk_error(await whisk.call("GET", "/namespaces/_/triggers/timed"), 404)


async def test_a_trigger_put_with_the_alarm_feed_sets_it_up_and_its_delete_stops_it(
    whisk: Whisk,
) -> None:
    await made(
        whisk,
        "triggers/timed",
        {
            "annotations": [{"key": "feed", "value": "/whisk.system/alarms/alarm"}],
            "parameters": [{"key": "cron", "value": "*/5 * * * *"}],
        },
    )
    read = await feed_result(whisk, "alarms/alarm", "READ", "timed")
    assert read["config"]["cron"] == "*/5 * * * *"
    assert (await whisk.call("DELETE", "/namespaces/_/triggers/timed")).status == 200
    gone = await feed(whisk, "alarms/alarm", "READ", "timed")
    assert gone.status == 502


# --- NATS subjects: the feed, and OpenFaaS's topic annotation, across two gateways --------------


async def subject_fires(http: aiohttp.ClientSession, gateway: RunningGateway, source: str) -> float:
    metrics = await scrape(http, gateway.url("/metrics"))
    return sample(metrics, "gateway_event_fires_total", source=source, outcome="accepted") or 0.0


async def both_listening(
    http: aiohttp.ClientSession,
    gateways: list[RunningGateway],
    nats_client: NatsClient,
    subject: str,
    source: str,
) -> int:
    """Probe messages until each gateway has taken one (each is in the queue group); how many
    probes went."""
    sent = 0

    async def each_took_one() -> bool:
        nonlocal sent
        await nats_client.publish(subject, json.dumps({"probe": sent}).encode())
        sent += 1
        return all([await subject_fires(http, gateway, source) > 0 for gateway in gateways])

    await wait_until(each_took_one, DEADLINE_S, "both gateways in the queue group", 0.05)
    return sent


@pytest.mark.timeout(THOUSAND_S + 60)
async def test_a_subject_feed_fires_once_per_message_across_two_gateways(
    whisk: Whisk,
    start_gateway: StartGateway,
    recorder: StartRecorder,
    http: aiohttp.ClientSession,
    nats_client: NatsClient,
    tmp_path: Path,
) -> None:
    other = await start_whisk(recorder, start_gateway, http, tmp_path, whisk.functions)
    await trigger_with_rule(whisk, "orders", "r", "hello")
    await feed_result(whisk, "nats/subject", "CREATE", "orders", subject="events.orders")
    probes = await both_listening(
        http, [whisk.gateway, other.gateway], nats_client, "events.orders", "subject"
    )
    for n in range(1000):
        await nats_client.publish("events.orders", json.dumps({"n": n}).encode())
    await nats_client.publish("events.orders", b"plain text")
    await nats_client.flush()

    hello = whisk.functions["hello"]
    await hello.wait_for_requests(probes + 1001, THOUSAND_S)
    numbers = [json.loads(r.body).get("n") for r in hello.requests]
    assert sorted(n for n in numbers if n is not None) == list(range(1000))
    assert {"payload": "plain text"} in [json.loads(r.body) for r in hello.requests]
    assert all(len(calls) == 1 for calls in hello.by_call_id().values())
    read = await feed_result(whisk, "nats/subject", "READ", "orders")
    assert read["config"] == {"name": "orders", "namespace": "guest", "subject": "events.orders"}


@pytest.mark.timeout(THOUSAND_S + 60)
async def test_a_topic_annotation_invokes_its_function_once_per_message(
    whisk: Whisk,
    start_gateway: StartGateway,
    recorder: StartRecorder,
    http: aiohttp.ClientSession,
    nats_client: NatsClient,
    tmp_path: Path,
) -> None:
    other = await start_whisk(recorder, start_gateway, http, tmp_path, whisk.functions)
    function = await recorder(echo)
    async with http.post(
        whisk.gateway.url("/system/functions"),
        json={
            "service": "subscriber",
            "url": function.url,
            "annotations": {"topic": "events.payments,events.refunds"},
        },
        headers=AUTH,
    ) as response:
        assert response.status == 202, await response.text()
    probes = await both_listening(
        http, [whisk.gateway, other.gateway], nats_client, "events.payments", "topic"
    )
    for n in range(1000):
        await nats_client.publish("events.payments", b"payment %d" % n)
    await nats_client.publish("events.refunds", b"refund", headers={"Content-Type": "x/y"})
    await nats_client.flush()

    await function.wait_for_requests(probes + 1001, THOUSAND_S)
    payments = [r.body for r in function.requests if r.body.startswith(b"payment")]
    assert sorted(payments) == sorted(b"payment %d" % n for n in range(1000))
    assert all(len(calls) == 1 for calls in function.by_call_id().values())
    [refund] = [r for r in function.requests if r.body == b"refund"]
    assert (refund.headers["X-Topic"], refund.headers["Content-Type"]) == ("events.refunds", "x/y")
    [first] = [r for r in function.requests if r.body == b"payment 0"]
    assert (first.headers["X-Topic"], first.headers["Content-Type"]) == (
        "events.payments",
        "text/plain",
    )


async def test_a_cron_function_is_invoked_once_per_tick_by_two_gateways(
    start_gateway: StartGateway,
    start_worker: StartWorker,
    recorder: StartRecorder,
    http: aiohttp.ClientSession,
) -> None:
    function = await recorder(echo)
    cron = {"topic": "cron-function", "schedule": EVERY_SECOND}
    entries: dict[str, Any] = {"ticker": {"url": function.url, "annotations": cron}}
    # In the functions file (as a stack.yml's annotations become one) of both gateways.
    await start_worker(registry_of(**entries))
    start = now_ms()
    for _ in range(2):
        await ready_gateway(start_gateway, http, registry_of(**entries))

    await function.wait_for_requests(4, DEADLINE_S)
    ids = {
        tick_fire_id("cron", "ticker", tick): tick
        for tick in range(start - start % 1000, now_ms() + 2000, 1000)
    }
    counts = calls_per_tick(function, ids)
    assert len(counts) == len(function.requests)  # every call is one of the ticks
    ticks = sorted(counts)
    assert ticks == list(range(ticks[0], ticks[-1] + 1000, 1000))  # none missed
    assert set(counts.values()) == {1}  # none twice
    assert function.requests[0].headers["X-Topic"] == "cron-function"


async def test_a_bad_schedule_is_refused_at_deploy(
    whisk: Whisk, http: aiohttp.ClientSession
) -> None:
    async with http.post(
        whisk.gateway.url("/system/functions"),
        json={
            "service": "badcron",
            "url": "http://127.0.0.1:9",
            "annotations": {"topic": "cron-function", "schedule": "every minute"},
        },
        headers=AUTH,
    ) as response:
        assert response.status == 400
        assert "schedule (topic cron-function): cron pattern" in (await response.json())["error"]


async def test_a_sync_topic_function_is_called_by_the_gateway_itself(
    recorder: StartRecorder,
    start_gateway: StartGateway,
    http: aiohttp.ClientSession,
    nats_client: NatsClient,
) -> None:
    """com.openfaas.sync: no queue and no worker (none runs here); its record says how it
    ended."""
    function = await recorder(echo)
    annotations = {"topic": "events.sync", "com.openfaas.sync": "true"}
    gateway = await ready_gateway(
        start_gateway,
        http,
        registry_of(direct={"url": function.url, "annotations": annotations}),
    )

    async def called() -> bool:
        await nats_client.publish("events.sync", b"now")
        return bool(function.requests)

    await wait_until(called, DEADLINE_S, "the sync call", 0.2)
    call_id = function.requests[0].headers["X-Call-Id"]

    async def recorded() -> Any:
        status, record = await get_json(http, gateway.url(f"/system/activations/{call_id}"))
        return record if status == 200 and record["status"] == "succeeded" else None

    record = await wait_until(recorded, DEADLINE_S, "its record")
    assert record["function"] == "direct"
    assert function.requests[0].body == b"now"
    stream = await nats_client.jetstream().stream_info("faas-async")
    assert stream.state.last_seq == 0  # never queued
