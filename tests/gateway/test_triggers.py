"""OpenWhisk's triggers and rules under /api/v1 against a real gateway, worker and
nats-server: their shapes, versions and conflicts, firing (202 with one durable write and the
rules' actions queued from it, 204 with no active rule, 404 for no trigger), the trigger's
activation with a log line per rule, the fan-out's exactly-once under redelivery, and what a
demanding client sends that must be refused (docs/events.md)."""

import io
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from nats.aio.client import Client as NatsClient

from faas_gateway.core.events import Fire, rule_call_id
from faas_gateway.core.functions import Registry
from tests.conftest import StartGateway, StartRecorder, StartWorker
from tests.gateway.helpers import handler_of
from tests.gateway.test_openwhisk import (
    ACTIVATION_ID,
    ACTIVATION_ID_HEADER,
    Reply,
    Whisk,
    assert_whisk_error,
    whisk_gateway,
)
from tests.harness import DEADLINE_S, RecordedRequest, Recorder, registry_of, wait_until


async def echo(request: web.Request, recorded: RecordedRequest) -> web.Response:
    return web.Response(body=recorded.body, content_type=request.content_type)


async def boom(request: web.Request, recorded: RecordedRequest) -> web.Response:
    return web.json_response({"error": "boom"}, status=500)


@pytest.fixture
async def whisk(
    recorder: StartRecorder,
    start_gateway: StartGateway,
    start_worker: StartWorker,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> Whisk:
    functions = {name: await recorder(echo) for name in ("hello", "other", "pkg__packaged")}
    entries = {name: server.url for name, server in functions.items()}
    gateway = await whisk_gateway(
        start_gateway, http, registry_of(**entries), tmp_path / "no-secrets"
    )
    await start_worker(registry_of(**entries))
    return Whisk(gateway, Registry(), http, functions)


async def put(whisk: Whisk, path: str, body: Any, query: str = "") -> Reply:
    return await whisk.call("PUT", f"/namespaces/_/{path}{query}", json=body)


async def made(whisk: Whisk, path: str, body: Any) -> Any:
    reply = await put(whisk, path, body)
    assert reply.status == 200, reply.body
    return reply.body


async def fire(whisk: Whisk, trigger: str, payload: Any = None, **kwargs: Any) -> Reply:
    if payload is not None:
        kwargs["json"] = payload
    return await whisk.call("POST", f"/namespaces/_/triggers/{trigger}", **kwargs)


async def bodies(recorder: Recorder, count: int) -> list[Any]:
    await recorder.wait_for_requests(count, DEADLINE_S)
    return [json.loads(request.body) for request in recorder.requests]


# --- triggers -----------------------------------------------------------------------------------


async def test_a_trigger_is_created_read_listed_updated_and_deleted_in_openwhisks_shape(
    whisk: Whisk,
) -> None:
    body = {
        "parameters": [{"key": "greeting", "value": "hi"}],
        "annotations": [{"key": "description", "value": "an example"}],
    }
    created = await made(whisk, "triggers/t1", body)
    assert created["namespace"] == "guest"
    assert created["name"] == "t1"
    assert created["version"] == "0.0.1"
    assert created["publish"] is False
    assert created["parameters"] == body["parameters"]
    assert created["annotations"] == body["annotations"]
    assert created["limits"] == {}
    assert isinstance(created["updated"], int)
    assert "rules" not in created

    again = await put(whisk, "triggers/t1", body)
    assert_whisk_error(again, 409, "resource already exists")

    updated = await made(whisk, "triggers/t1?overwrite=true", {"parameters": []})
    assert updated["version"] == "0.0.2"
    assert updated["parameters"] == []
    assert updated["annotations"] == body["annotations"]  # kept: the update left them out

    got = await whisk.call("GET", "/namespaces/guest/triggers/t1")
    assert (got.status, got.body) == (200, updated)
    await made(whisk, "triggers/t2", {})
    listed = await whisk.call("GET", "/namespaces/_/triggers?limit=1&skip=1")
    assert [trigger["name"] for trigger in listed.body] == ["t2"]
    counted = await whisk.call("GET", "/namespaces/_/triggers?count=true")
    assert counted.body == {"triggers": 2}

    deleted = await whisk.call("DELETE", "/namespaces/_/triggers/t1")
    assert (deleted.status, deleted.body) == (200, updated)
    gone = await whisk.call("GET", "/namespaces/_/triggers/t1")
    assert_whisk_error(gone, 404, "The requested resource does not exist.")


async def test_rules_need_their_trigger_and_action_start_active_and_are_switched(
    whisk: Whisk,
) -> None:
    no_trigger = await put(whisk, "rules/r1", {"trigger": "/_/t1", "action": "/_/hello"})
    assert_whisk_error(no_trigger, 400, "trigger /guest/t1 does not exist")
    await made(whisk, "triggers/t1", {})
    no_action = await put(whisk, "rules/r1", {"trigger": "/_/t1", "action": "/_/nope"})
    assert_whisk_error(no_action, 400, "action /guest/nope does not exist")

    rule = await made(whisk, "rules/r1", {"trigger": "/_/t1", "action": "/guest/pkg/packaged"})
    assert rule["status"] == "active"
    assert rule["trigger"] == {"path": "guest", "name": "t1"}
    assert rule["action"] == {"path": "guest/pkg", "name": "packaged"}
    assert rule["version"] == "0.0.1"
    trigger = await whisk.call("GET", "/namespaces/_/triggers/t1")
    assert trigger.body["rules"] == {
        "guest/r1": {"action": {"path": "guest/pkg", "name": "packaged"}, "status": "active"}
    }

    disabled = await whisk.call("POST", "/namespaces/_/rules/r1", json={"status": "inactive"})
    assert (disabled.status, disabled.body["status"]) == (200, "inactive")
    again = await whisk.call("POST", "/namespaces/_/rules/r1", json={"status": "inactive"})
    assert again.status == 200
    bad = await whisk.call("POST", "/namespaces/_/rules/r1", json={"status": "paused"})
    assert_whisk_error(bad, 400, "status must be 'active' or 'inactive'")

    updated = await made(whisk, "rules/r1?overwrite=true", {"trigger": "t1", "action": "hello"})
    assert (updated["version"], updated["status"]) == ("0.0.2", "inactive")  # kept
    listed = await whisk.call("GET", "/namespaces/_/rules")
    assert [entry["name"] for entry in listed.body] == ["r1"]

    await whisk.call("DELETE", "/namespaces/_/triggers/t1")
    orphan = await whisk.call("POST", "/namespaces/_/rules/r1", json={"status": "active"})
    assert_whisk_error(orphan, 404)
    deleted = await whisk.call("DELETE", "/namespaces/_/rules/r1")
    assert (deleted.status, deleted.body["status"]) == (200, "inactive")
    assert_whisk_error(await whisk.call("GET", "/namespaces/_/rules/r1"), 404)


# --- firing -------------------------------------------------------------------------------------


async def test_a_fire_queues_each_active_rules_action_with_the_merged_parameters(
    whisk: Whisk,
) -> None:
    await made(
        whisk,
        "triggers/t1",
        {"parameters": [{"key": "greeting", "value": "hi"}, {"key": "name", "value": "?"}]},
    )
    await made(whisk, "rules/r1", {"trigger": "/_/t1", "action": "/_/hello"})
    await made(whisk, "rules/r2", {"trigger": "/_/t1", "action": "/_/other"})
    await made(whisk, "rules/off", {"trigger": "/_/t1", "action": "/_/pkg/packaged"})
    await whisk.call("POST", "/namespaces/_/rules/off", json={"status": "inactive"})

    fired = await fire(whisk, "t1", {"name": "Ada"}, headers={"X-Trace": "abc"})
    assert fired.status == 202, fired.body
    fire_id = fired.body["activationId"]
    assert ACTIVATION_ID.fullmatch(fire_id)
    assert fired.headers[ACTIVATION_ID_HEADER] == fire_id

    [hello] = await bodies(whisk.functions["hello"], 1)
    [other] = await bodies(whisk.functions["other"], 1)
    for params in (hello, other):
        assert params["greeting"] == "hi"
        assert params["name"] == "Ada"  # the payload wins over the trigger's parameter
        assert params["__ow_headers"]["x-trace"] == "abc"
        assert "authorization" not in params["__ow_headers"]
    request = whisk.functions["hello"].requests[0]
    assert request.headers["X-Call-Id"] == rule_call_id(fire_id, "r1")
    assert request.headers["Content-Type"] == "application/json"
    assert "Authorization" not in request.headers

    activation = await whisk.ended(fire_id)
    assert activation.body["name"] == "t1"
    assert activation.body["response"] == {
        "status": "success",
        "success": True,
        "result": {"name": "Ada"},
    }
    assert "end" not in activation.body and "duration" not in activation.body
    lines = [json.loads(line) for line in activation.body["logs"]]
    assert sorted(lines, key=lambda line: line["rule"]) == [
        {
            "statusCode": 0,
            "success": True,
            "rule": "guest/r1",
            "action": "guest/hello",
            "activationId": rule_call_id(fire_id, "r1"),
        },
        {
            "statusCode": 0,
            "success": True,
            "rule": "guest/r2",
            "action": "guest/other",
            "activationId": rule_call_id(fire_id, "r2"),
        },
    ]
    # Each line leads to the action's own activation and its result.
    result = await whisk.ended(lines[0]["activationId"])
    assert result.body["response"]["result"]["name"] == "Ada"
    assert whisk.functions["pkg__packaged"].requests == []


async def test_no_active_rule_is_204_and_nothing_is_stored_unknown_trigger_404(
    whisk: Whisk, nats_client: NatsClient
) -> None:
    await made(whisk, "triggers/quiet", {})
    no_rules = await fire(whisk, "quiet", {"a": 1})
    assert (no_rules.status, no_rules.raw) == (204, b"")
    await made(whisk, "rules/r", {"trigger": "quiet", "action": "hello"})
    await whisk.call("POST", "/namespaces/_/rules/r", json={"status": "inactive"})
    inactive = await fire(whisk, "quiet", {"a": 1})
    assert inactive.status == 204
    info = await nats_client.jetstream().stream_info("faas-fires")
    assert info.state.messages == 0 and info.state.last_seq == 0
    assert_whisk_error(await fire(whisk, "nope", {}), 404)
    assert whisk.functions["hello"].requests == []


async def test_an_action_deleted_since_the_rule_was_made_is_an_error_line(
    whisk: Whisk, tmp_path: Path
) -> None:
    await whisk.call(
        "PUT",
        "/namespaces/_/actions/doomed",
        json={"annotations": [{"key": "url", "value": whisk.functions["hello"].url}]},
    )
    await made(whisk, "triggers/t", {})
    await made(whisk, "rules/r", {"trigger": "t", "action": "doomed"})
    await made(whisk, "rules/fine", {"trigger": "t", "action": "other"})
    assert (await whisk.call("DELETE", "/namespaces/_/actions/doomed")).status == 200
    fired = await fire(whisk, "t", {})
    activation = await whisk.ended(fired.body["activationId"])
    lines = {json.loads(line)["rule"]: json.loads(line) for line in activation.body["logs"]}
    assert lines["guest/r"] == {
        "statusCode": 1,
        "success": False,
        "rule": "guest/r",
        "action": "guest/doomed",
        "error": "action guest/doomed does not exist",
    }
    assert lines["guest/fine"]["success"] is True


async def test_a_fire_fanned_out_twice_starts_each_action_once(
    whisk: Whisk, nats_client: NatsClient
) -> None:
    """A fire handed over again (its gateway died before the ack; or an alarm tick published
    again after the duplicate window) is the same fire: the same call ids, no second run."""
    await made(whisk, "triggers/t", {})
    await made(whisk, "rules/r", {"trigger": "t", "action": "hello"})
    fired = await fire(whisk, "t", {"n": 1})
    fire_id = fired.body["activationId"]
    await whisk.functions["hello"].wait_for_requests(1, DEADLINE_S)
    first = await whisk.ended(fire_id)

    # The same fire again, under another message id (past JetStream's dedup), as a
    # redelivery would bring it; a marker fire after it shows the fan-out has handled it.
    again = Fire(
        fire_id=fire_id,
        source="api",
        fired_at_ns=time.time_ns(),
        trigger="t",
        rules=(("r", "hello"),),
        arguments=orjson.dumps({"n": 1}),
        payload=orjson.dumps({"n": 1}),
    )
    await nats_client.jetstream().publish("faas-fires.trigger.t", again.encode())
    marker = await fire(whisk, "t", {"n": 2})
    await whisk.functions["hello"].wait_for_requests(2, DEADLINE_S)
    await whisk.ended(marker.body["activationId"])

    async def drained() -> bool:
        info = await nats_client.jetstream().consumer_info("faas-fires", "faas-fires-fanout")
        return info.num_ack_pending == 0 and info.num_pending == 0

    await wait_until(drained, DEADLINE_S, "the fan-out to ack both fires")
    calls = whisk.functions["hello"].by_call_id()
    assert sorted(len(requests) for requests in calls.values()) == [1, 1]
    assert rule_call_id(fire_id, "r") in calls
    assert (await whisk.ended(fire_id)).body == first.body


async def test_a_fire_in_the_fire_stream_alone_is_fanned_out(
    whisk: Whisk, nats_client: NatsClient
) -> None:
    """What the 202 stands on: the fire stream alone. A fire put there (as a gateway does
    before it answers, and then dies) is fanned out by whichever gateway takes it."""
    await made(whisk, "triggers/t", {})
    await made(whisk, "rules/r", {"trigger": "t", "action": "hello"})
    orphan = Fire(
        fire_id="0" * 31 + "1",
        source="api",
        fired_at_ns=time.time_ns(),
        trigger="t",
        rules=(("r", "hello"),),
        arguments=b'{"orphan":true}',
        payload=b'{"orphan":true}',
    )
    await nats_client.jetstream().publish(
        "faas-fires.trigger.t", orphan.encode(), headers={"Nats-Msg-Id": orphan.fire_id}
    )
    [params] = await bodies(whisk.functions["hello"], 1)
    assert params == {"orphan": True}
    assert whisk.functions["hello"].requests[0].headers["X-Call-Id"] == rule_call_id(
        orphan.fire_id, "r"
    )


async def test_a_trigger_made_on_one_gateway_fires_through_another(
    whisk: Whisk,
    start_gateway: StartGateway,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    entries = {name: server.url for name, server in whisk.functions.items()}
    other = await whisk_gateway(start_gateway, http, registry_of(**entries), tmp_path / "none")
    elsewhere = Whisk(other, Registry(), http, whisk.functions)
    await made(whisk, "triggers/t", {})
    await made(whisk, "rules/r", {"trigger": "t", "action": "hello"})

    async def fires_there() -> Reply | None:
        reply = await fire(elsewhere, "t", {"via": "other"})
        return reply if reply.status == 202 else None

    fired = await wait_until(fires_there, DEADLINE_S, "the other gateway's watch")
    [params] = await bodies(whisk.functions["hello"], 1)
    assert params["via"] == "other"
    assert (await elsewhere.ended(fired.body["activationId"])).body["name"] == "t"


# --- what must be refused -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["has space", "a" * 257, "dot.", "two..dots", ".start", "at@sign", "ünï"],
)
async def test_names_a_key_value_store_cannot_hold_are_400(whisk: Whisk, name: str) -> None:
    reply = await whisk.call(
        "PUT", f"/namespaces/_/triggers/{aiohttp.helpers.quote(name, safe='')}", json={}
    )
    assert_whisk_error(reply, 400, "invalid trigger name")
    rule = await whisk.call(
        "PUT", f"/namespaces/_/rules/{aiohttp.helpers.quote(name, safe='')}", json={}
    )
    assert_whisk_error(rule, 400, "invalid rule name")
    listed = await whisk.call("GET", "/namespaces/_/triggers")
    assert listed.body == []


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ([1, 2], "the trigger must be a JSON object"),
        ({"parameters": {"a": 1}}, "parameters must be a list of {key, value}"),
        ({"parameters": [{"value": 1}]}, "parameters must be a list of {key, value}"),
        ({"parameters": [{"key": "a"}, {"key": "a"}]}, "parameters names 'a' twice"),
        ({"annotations": "x"}, "annotations must be a list of {key, value}"),
        ({"publish": "yes"}, "publish must be true or false"),
        ({"limits": []}, "limits must be a JSON object"),
        ({"annotations": [{"key": "feed", "value": 3}]}, "the annotation feed must name"),
        ({"annotations": [{"key": "feed", "value": "/_/nofeed"}]}, "feed action /_/nofeed"),
        (
            {"parameters": [{"key": "big", "value": "x" * 70_000}]},
            "the trigger is",
        ),
    ],
)
async def test_a_trigger_body_that_cannot_be_taken_is_400_and_nothing_is_made(
    whisk: Whisk, body: Any, message: str
) -> None:
    reply = await put(whisk, "triggers/t", body)
    assert_whisk_error(reply, 400, message)
    assert_whisk_error(await whisk.call("GET", "/namespaces/_/triggers/t"), 404)


async def test_malformed_json_bodies_are_400(whisk: Whisk) -> None:
    for path in ("triggers/t", "rules/r"):
        reply = await whisk.call(
            "PUT",
            f"/namespaces/_/{path}",
            data=b"{nope",
            headers={"Content-Type": "application/json"},
        )
        assert_whisk_error(reply, 400, "The request content was malformed")
    await made(whisk, "triggers/t", {})
    await made(whisk, "rules/r", {"trigger": "t", "action": "hello"})
    for payload in (b"[1]", b'"text"', b"{nope"):
        reply = await whisk.call(
            "POST",
            "/namespaces/_/triggers/t",
            data=payload,
            headers={"Content-Type": "application/json"},
        )
        assert_whisk_error(reply, 400, "The request content was malformed")
    status = await whisk.call("POST", "/namespaces/_/rules/r", data=b"[]")
    assert_whisk_error(status, 400, "status must be")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"action": "hello"}, "the rule's trigger must be a name"),
        ({"trigger": "t"}, "the rule's action must be a name"),
        ({"trigger": "/other/t", "action": "hello"}, "trigger /other/t does not exist"),
        ({"trigger": "/_/pkg/t", "action": "hello"}, "a trigger has no package"),
        ({"trigger": "t", "action": "/_/a/b/c"}, "action /_/a/b/c does not exist"),
        ({"trigger": "t", "action": 7}, "the rule's action must be a name"),
        ({"trigger": "t", "action": "/_/bad name"}, "invalid action name"),
    ],
)
async def test_a_rule_body_that_cannot_be_taken_is_400(
    whisk: Whisk, body: Any, message: str
) -> None:
    await made(whisk, "triggers/t", {})
    reply = await put(whisk, "rules/r", body)
    assert_whisk_error(reply, 400, message)
    assert_whisk_error(await whisk.call("GET", "/namespaces/_/rules/r"), 404)


async def test_a_payload_too_large_for_a_queued_call_is_413_and_nothing_is_queued(
    whisk: Whisk, nats_client: NatsClient
) -> None:
    await made(whisk, "triggers/t", {})
    await made(whisk, "rules/r", {"trigger": "t", "action": "hello"})
    huge = {"blob": "x" * 600_000}  # twice that with the payload kept for the activation
    reply = await fire(whisk, "t", huge)
    assert_whisk_error(reply, 413, "the fire is too large")
    beyond = await fire(
        whisk,
        "t",
        data=io.BytesIO(orjson.dumps({"blob": "x" * 2_000_000})),
        headers={"Content-Type": "application/json"},
    )
    assert_whisk_error(beyond, 413)
    info = await nats_client.jetstream().stream_info("faas-fires")
    assert info.state.last_seq == 0
    assert whisk.functions["hello"].requests == []


async def test_other_namespaces_and_methods(whisk: Whisk) -> None:
    assert_whisk_error(await whisk.call("GET", "/namespaces/other/triggers"), 404)
    assert_whisk_error(await whisk.call("PUT", "/namespaces/other/rules/r", json={}), 404)
    patched = await whisk.call("PATCH", "/namespaces/_/triggers/t")
    assert_whisk_error(patched, 405)
    assert patched.headers["Allow"] == "GET, PUT, POST, DELETE"
    unauthorized = await whisk.call("POST", "/namespaces/_/triggers/t", auth=False)
    assert_whisk_error(unauthorized, 401)


async def test_an_overwrite_meeting_one_made_through_another_gateway_updates_it(
    whisk: Whisk,
) -> None:
    """A PUT with overwrite=true on a gateway whose copy has not caught up yet with one just
    made through another gateway: an update of that one, not a 409."""
    await made(whisk, "triggers/t", {"parameters": [{"key": "a", "value": 1}]})
    await made(whisk, "rules/r", {"trigger": "t", "action": "hello"})
    await whisk.call("POST", "/namespaces/_/rules/r", json={"status": "inactive"})
    handler = handler_of(whisk.gateway, "/api/v1/namespaces/{namespace}/triggers/{name}", "PUT")
    # As if this gateway's watch had not delivered them yet.
    handler._watch.triggers.drop("t")
    handler._watch.rules.drop("r")

    trigger = await made(whisk, "triggers/t?overwrite=true", {"publish": True})
    assert (trigger["version"], trigger["publish"]) == ("0.0.2", True)
    rule = await made(whisk, "rules/r?overwrite=true", {"trigger": "t", "action": "other"})
    assert (rule["version"], rule["status"], rule["action"]["name"]) == (
        "0.0.2",
        "inactive",
        "other",
    )


async def test_fires_are_taken_by_the_lean_server_and_answered_as_the_route_does(
    whisk: Whisk,
) -> None:
    """A fire of a trigger that exists, with its credentials and a small body, on a
    connection that has only fired so far (as a webhook sender's), is served by
    gateway/invocation_server.py (as /async-function/ is, so that firing keeps up with it);
    its answers are the route's: 202 with the activation id, 204 without an active rule,
    OpenWhisk's error shape with X-Request-ID for a payload it refuses. What it does not take
    (no trigger, no credentials) aiohttp's route answers as before."""
    triggers = handler_of(whisk.gateway, "/api/v1/namespaces/{namespace}/triggers/{name}", "POST")
    taken: list[str] = []
    fire_whole = triggers.fire_whole

    async def counted(name: str, request: Any) -> Any:
        taken.append(name)
        return await fire_whole(name, request)

    triggers.fire_whole = counted
    await made(whisk, "triggers/t", {})
    async with aiohttp.ClientSession() as fresh:  # a connection that only fires
        firing = Whisk(whisk.gateway, whisk.registry, fresh, whisk.functions)
        assert (await fire(firing, "t", {"n": 1})).status == 204  # no rule yet
        await made(whisk, "rules/r", {"trigger": "t", "action": "hello"})
        async with aiohttp.ClientSession() as stranger:  # a fresh connection, no credentials
            anonymous = Whisk(whisk.gateway, whisk.registry, stranger, whisk.functions)
            unsigned = await anonymous.call("POST", "/namespaces/_/triggers/t", auth=False)
            assert_whisk_error(unsigned, 401)
        assert taken == ["t"]  # refused before the lean server took it
        accepted = await fire(firing, "t", {"n": 2}, headers={"X-Request-ID": "tx42"})
        assert accepted.status == 202
        assert accepted.headers["X-Request-ID"] == "tx42"
        assert accepted.headers[ACTIVATION_ID_HEADER] == accepted.body["activationId"]
        refused = await fire(
            firing, "t", data=b"[1, 2]", headers={"Content-Type": "application/json"}
        )
        assert_whisk_error(refused, 400)
        assert taken == ["t", "t", "t"]

        assert_whisk_error(await fire(firing, "nope", {}), 404)
        assert_whisk_error(await firing.call("POST", "/namespaces/_/triggers/t", auth=False), 401)
        assert taken == ["t", "t", "t"]
    assert [body["n"] for body in await bodies(whisk.functions["hello"], 1)] == [2]
