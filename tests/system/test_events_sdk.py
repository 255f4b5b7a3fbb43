"""Triggers, rules and feeds through the real ``openwhisk`` npm client (pinned, installed as
tests/system/test_openwhisk_sdk.py installs it), against a real gateway, worker and
nats-server: what OpenWhisk users' event code does, with only the API host changed
(docs/events.md)."""

import base64
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from faas_gateway.core.events import rule_call_id, tick_fire_id
from tests.conftest import RunningGateway, StartGateway, StartRecorder, StartWorker
from tests.gateway.test_openwhisk import whisk_gateway
from tests.harness import DEADLINE_S, Recorder, registry_of, wait_until
from tests.system.test_openwhisk_sdk import (  # sdk_modules: the fixture, shared
    PASSWORD,
    POLL,
    USER,
    Node,
    echo,
    sdk_modules,  # noqa: F401
)

HEADERS = {"Authorization": "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()}


@pytest.fixture
async def stack(
    sdk_modules: Path,  # noqa: F811  (the fixture imported above)
    recorder: StartRecorder,
    start_gateway: StartGateway,
    start_worker: StartWorker,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> tuple[Node, RunningGateway, Recorder, Recorder]:
    function, sentinel = await recorder(echo), await recorder(echo)
    entries = {"echo": function.url, "sentinel": sentinel.url}
    gateway = await whisk_gateway(
        start_gateway, http, registry_of(**entries), tmp_path / "no-secrets"
    )
    await start_worker(registry_of(**entries))
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    return Node(sdk_modules, scripts, gateway), gateway, function, sentinel


async def test_trigger_rule_fire_then_the_rules_activation_from_the_logs_and_disabled_204(
    stack: tuple[Node, RunningGateway, Recorder, Recorder], http: aiohttp.ClientSession
) -> None:
    client, gateway, function, _ = stack
    result = await client.run(
        POLL
        + """
  await ow.triggers.create({name: 'signup', trigger: {
    parameters: [{key: 'greeting', value: 'hello'}]}})
  const rule = await ow.rules.create({name: 'welcome', trigger: 'signup', action: 'echo'})
  const {activationId} = await ow.triggers.invoke({name: 'signup', params: {user: 'Ada'}})
  const {activation: fired} = await poll(activationId)
  const line = JSON.parse(fired.logs[0])
  const {activation: ran} = await poll(line.activationId)
  const result = await ow.activations.result({activationId: line.activationId})
  const disabled = await ow.rules.disable({name: 'welcome'})
  const quiet = await ow.triggers.invoke({name: 'signup', params: {user: 'Bob'}})
  const trigger = await ow.triggers.get({name: 'signup'})
  const enabled = await ow.rules.enable({name: 'welcome'})
  const rules = await ow.rules.list()
  await ow.rules.delete({name: 'welcome'})
  await ow.triggers.delete({name: 'signup'})
  return {rule, activationId, fired, line, ran, result, disabled, quiet, trigger, enabled,
          rules}
"""
    )
    assert result["rule"]["status"] == "active"
    assert result["rule"]["action"] == {"path": "guest", "name": "echo"}
    assert result["rule"]["trigger"] == {"path": "guest", "name": "signup"}
    fired = result["fired"]
    assert fired["activationId"] == result["activationId"]
    assert fired["name"] == "signup"
    assert fired["response"]["result"] == {"user": "Ada"}
    line = result["line"]
    assert {key: line[key] for key in ("rule", "action", "statusCode", "success")} == {
        "rule": "guest/welcome",
        "action": "guest/echo",
        "statusCode": 0,
        "success": True,
    }
    assert line["activationId"] == rule_call_id(result["activationId"], "welcome")
    assert result["ran"]["name"] == "echo"
    params = result["result"]["result"]
    assert (params["greeting"], params["user"]) == ("hello", "Ada")
    assert result["result"]["success"] is True
    assert result["disabled"]["status"] == "inactive"
    # A fire with no active rule is a 204: the client resolves to an empty body.
    assert result["quiet"] == {"type": "Buffer", "data": []}
    assert result["trigger"]["rules"]["guest/welcome"]["status"] == "inactive"
    assert result["enabled"]["status"] == "active"
    assert [rule["name"] for rule in result["rules"]] == ["welcome"]
    assert [json.loads(r.body)["user"] for r in function.requests] == ["Ada"]

    # The same 204, seen on the wire, with nothing stored.
    for path, body in (("triggers/t", {}), ("rules/r", {"trigger": "t", "action": "echo"})):
        async with http.put(
            gateway.url(f"/api/v1/namespaces/_/{path}"), json=body, headers=HEADERS
        ) as response:
            assert response.status == 200
    async with http.post(
        gateway.url("/api/v1/namespaces/_/rules/r"), json={"status": "inactive"}, headers=HEADERS
    ) as response:
        assert response.status == 200
    async with http.post(
        gateway.url("/api/v1/namespaces/_/triggers/t"), json={"a": 1}, headers=HEADERS
    ) as response:
        assert (response.status, await response.read()) == (204, b"")


async def test_a_feeds_create_cron_alarm_fires_a_rule_twice_and_feeds_delete_stops_it(
    stack: tuple[Node, RunningGateway, Recorder, Recorder], http: aiohttp.ClientSession
) -> None:
    client, gateway, function, sentinel = stack
    start_ms = int(time.time() * 1000)
    deleted: list[int] = []

    def on_event(event: dict[str, Any]) -> None:
        if "deleted" in event:
            deleted.append(event["deleted"])

    result = await client.run(
        """
  await ow.triggers.create({name: 'tick'})
  await ow.rules.create({name: 'on-tick', trigger: 'tick', action: 'echo'})
  const feed = '/whisk.system/alarms/alarm'
  const created = await ow.feeds.create({name: feed, trigger: 'tick',
    params: {cron: '* * * * * *', trigger_payload: {from: 'alarm'}}})
  const read = await ow.feeds.get({name: feed, trigger: 'tick'})
  while ((await ow.activations.list({name: 'echo', limit: 5})).length < 2) await sleep(100)
  const removed = await ow.feeds.delete({name: feed, trigger: 'tick'})
  emit({deleted: Date.now()})
  let gone = null
  try { await ow.feeds.get({name: feed, trigger: 'tick'}) } catch (e) { gone = failure(e) }
  return {created, read, removed, gone}
""",
        on_event,
    )
    assert result["created"]["response"]["result"] == {"status": "success"}
    read = result["read"]["response"]["result"]
    assert read["config"]["cron"] == "* * * * * *"
    assert read["config"]["payload"] == {"from": "alarm"}
    assert read["status"]["active"] is True
    assert result["removed"]["response"]["result"] == {"status": "success"}
    assert result["gone"]["statusCode"] == 502

    # No tick after the delete: shown once a sentinel alarm, made after it, has ticked three
    # times (the scheduler went on, and what it did not fire for "tick" it never will).
    [deleted_ms] = deleted
    for path, body in (
        ("triggers/sentinel", {}),
        ("rules/sentinel-rule", {"trigger": "sentinel", "action": "sentinel"}),
    ):
        async with http.put(
            gateway.url(f"/api/v1/namespaces/_/{path}"), json=body, headers=HEADERS
        ) as response:
            assert response.status == 200
    async with http.post(
        gateway.url("/api/v1/namespaces/whisk.system/actions/alarms/alarm?blocking=true"),
        json={"lifecycleEvent": "CREATE", "triggerName": "/_/sentinel", "cron": "* * * * * *"},
        headers=HEADERS,
    ) as response:
        assert response.status == 200

    def sentinel_is_past() -> bool:
        ticks = ticks_of(sentinel, "sentinel", "sentinel-rule", start_ms)
        return len([tick for tick in ticks if tick > deleted_ms]) >= 3

    await wait_until(sentinel_is_past, DEADLINE_S, "three sentinel ticks after the delete")
    fired = ticks_of(function, "tick", "on-tick", start_ms)
    assert len(fired) == len(function.requests) >= 2  # each call is one tick's
    assert max(fired) <= deleted_ms
    assert all(json.loads(r.body) == {"from": "alarm"} for r in function.requests)


def ticks_of(function: Recorder, trigger: str, rule: str, start_ms: int) -> list[int]:
    """The ticks whose invocation reached ``function``, from the call ids only they make."""
    ids = {
        rule_call_id(tick_fire_id("alarm", trigger, tick), rule): tick
        for tick in range(start_ms - start_ms % 1000, int(time.time() * 1000) + 1000, 1000)
    }
    return [ids[r.headers["X-Call-Id"]] for r in function.requests if r.headers["X-Call-Id"] in ids]
