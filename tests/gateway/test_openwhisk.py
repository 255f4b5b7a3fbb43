"""OpenWhisk's API under /api/v1 against a real gateway, worker and nats-server: every route,
its statuses, error shape and headers, the 404 until an activation has ended, blocking calls
that turn into 202s, and APISIX's openwhisk plugin's request, exactly as it sends it, with
what APISIX would then answer its own client (docs/openwhisk.md; the contract is
OpenWhisk's controller, its npm client and apisix/plugins/openwhisk.lua)."""

import asyncio
import base64
import json
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDictProxy

from faas_gateway.core.functions import Registry
from tests.conftest import RunningGateway, StartGateway, StartRecorder, StartWorker, ready_gateway
from tests.gateway.helpers import handler_of
from tests.harness import RecordedRequest, Recorder, free_port, get_json, registry_of, wait_until

DEADLINE_S = 30.0
USER, PASSWORD = "whisk", "s3cret"
API_KEY = f"{USER}:{PASSWORD}"
AUTH = {"Authorization": "Basic " + base64.b64encode(API_KEY.encode()).decode()}
ACTIVATION_ID = re.compile(r"[0-9a-f]{32}")
NOT_FOUND = "The requested resource does not exist."
ACTIVATION_ID_HEADER = "x-openwhisk-activation-id"


async def whisk_gateway(
    start_gateway: StartGateway, http: aiohttp.ClientSession, registry: Registry, secrets: Path
) -> RunningGateway:
    """A ready gateway whose Basic auth credentials are the OpenWhisk API key ``API_KEY``
    (``secrets``: a folder with no credential files, so that the settings' ones apply)."""
    return await ready_gateway(
        start_gateway,
        http,
        registry,
        basic_auth=True,
        basic_auth_user=USER,
        basic_auth_password=PASSWORD,
        secret_mount_path=secrets,
    )


class Gate:
    """A function that holds every call until the test opens the gate."""

    def __init__(self) -> None:
        self.opened = asyncio.Event()
        self.entered = asyncio.Event()

    async def responder(self, request: web.Request, recorded: RecordedRequest) -> web.Response:
        self.entered.set()
        await self.opened.wait()
        return web.json_response({"held": json.loads(recorded.body)})


async def echo(request: web.Request, recorded: RecordedRequest) -> web.Response:
    return web.Response(body=recorded.body, content_type=request.content_type)


async def text(request: web.Request, recorded: RecordedRequest) -> web.Response:
    return web.Response(text="hello", headers={"X-Custom": "yes"})


async def boom(request: web.Request, recorded: RecordedRequest) -> web.Response:
    return web.json_response({"error": "boom"}, status=500)


async def nope(request: web.Request, recorded: RecordedRequest) -> web.Response:
    return web.Response(status=404, text="no such thing")


async def array(request: web.Request, recorded: RecordedRequest) -> web.Response:
    return web.json_response([1, 2])


async def never(request: web.Request, recorded: RecordedRequest) -> web.Response:
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


@dataclass
class Reply:
    status: int
    headers: CIMultiDictProxy[str]
    body: Any
    raw: bytes


@dataclass
class Whisk:
    """The API of one gateway (Basic auth on, so the API key is USER:PASSWORD)."""

    gateway: RunningGateway
    registry: Registry  # the gateway's
    http: aiohttp.ClientSession
    functions: dict[str, Recorder] = field(default_factory=dict)
    gate: Gate = field(default_factory=Gate)

    def url(self, path: str) -> str:
        return self.gateway.url("/api/v1" + path)

    async def call(
        self,
        method: str,
        path: str,
        *,
        auth: bool = True,
        headers: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> Reply:
        sent = {**(AUTH if auth else {}), **(headers or {})}
        async with self.http.request(method, self.url(path), headers=sent, **kwargs) as response:
            raw = await response.read()
            body = json.loads(raw) if raw else None
            return Reply(response.status, response.headers, body, raw)

    async def ended(self, activation_id: str) -> Reply:
        """GET the activation until it stops answering 404, as OpenWhisk clients poll."""

        async def poll() -> Reply | None:
            reply = await self.call("GET", f"/namespaces/_/activations/{activation_id}")
            if reply.status == 404:
                return None
            return reply

        reply: Reply = await wait_until(poll, DEADLINE_S, f"activation {activation_id}")
        return reply


@pytest.fixture
async def whisk(
    recorder: StartRecorder,
    start_gateway: StartGateway,
    start_worker: StartWorker,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> Whisk:
    gate = Gate()
    responders = {
        "echo": echo,
        "text": text,
        "boom": boom,
        "nope": nope,
        "array": array,
        "held": gate.responder,
        "never": never,
        "pkg__hello": echo,
    }
    functions = {name: await recorder(responder) for name, responder in responders.items()}
    entries: dict[str, str | dict[str, Any]] = {
        name: server.url for name, server in functions.items()
    }
    entries["never"] = {"url": functions["never"].url, "exec_timeout": "0.3s"}
    entries["gone"] = f"http://127.0.0.1:{free_port()}"
    registry = registry_of(**entries)
    gateway = await whisk_gateway(start_gateway, http, registry, tmp_path / "no-secrets")
    await start_worker(registry_of(**entries))
    return Whisk(gateway, registry, http, functions, gate)


def assert_whisk_error(reply: Reply, status: int, message: str | None = None) -> str:
    """OpenWhisk's error: {"error", "code"}, the code being the request id of the reply."""
    assert reply.status == status, reply.body
    assert reply.headers["Content-Type"] == "application/json"
    assert set(reply.body) == {"error", "code"}
    assert reply.body["code"] == reply.headers["X-Request-ID"]
    if message is not None:
        assert reply.body["error"].startswith(message), reply.body
    return str(reply.body["error"])


# --- the API, its namespace and auth ------------------------------------------------------------


async def test_info_is_open_and_everything_else_takes_the_api_key(whisk: Whisk) -> None:
    info = await whisk.call("GET", "", auth=False)
    assert info.status == 200
    assert info.body["api_paths"] == ["/api/v1"]
    assert info.headers["X-Request-ID"]

    for path in ("/namespaces", "/namespaces/_/actions", "/namespaces/guest/activations"):
        refused = await whisk.call("GET", path, auth=False)
        assert_whisk_error(refused, 401, "The supplied authentication is invalid")
        assert refused.headers["WWW-Authenticate"].startswith("Basic")
    wrong = await whisk.call(
        "POST",
        "/namespaces/_/actions/echo?blocking=true",
        auth=False,
        headers={"Authorization": "Basic " + base64.b64encode(b"whisk:wrong").decode()},
    )
    assert_whisk_error(wrong, 401)
    assert whisk.functions["echo"].requests == []

    namespaces = await whisk.call("GET", "/namespaces")
    assert (namespaces.status, namespaces.body) == (200, ["guest"])
    assert ACTIVATION_ID.fullmatch(namespaces.headers["X-Request-ID"])


async def test_paths_take_underscore_and_the_namespace_and_nothing_else(whisk: Whisk) -> None:
    for namespace in ("_", "guest"):
        reply = await whisk.call("GET", f"/namespaces/{namespace}/actions/echo")
        assert reply.status == 200
        assert reply.body["namespace"] == "guest"

    for path in (
        "/namespaces/other/actions/echo",
        "/namespaces/other/activations",
        "/namespaces/_/actions/nosuch",
        "/namespaces/_/packages",
        "/nosuch",
    ):
        assert_whisk_error(await whisk.call("GET", path), 404, NOT_FOUND)
    assert_whisk_error(await whisk.call("POST", "/namespaces/other/actions/echo"), 404)
    assert whisk.functions["echo"].requests == []


async def test_client_request_id_is_kept_and_other_methods_get_405(whisk: Whisk) -> None:
    mine = await whisk.call("GET", "/namespaces", headers={"X-Request-ID": "trace-42"})
    assert mine.headers["X-Request-ID"] == "trace-42"
    bad = await whisk.call("GET", "/namespaces", headers={"X-Request-ID": "a b\tc"})
    assert ACTIVATION_ID.fullmatch(bad.headers["X-Request-ID"])

    refused = await whisk.call("PATCH", "/namespaces/_/actions/echo")
    assert_whisk_error(refused, 405)
    assert refused.headers["Allow"] == "GET, PUT, POST, DELETE"
    assert_whisk_error(await whisk.call("DELETE", "/namespaces/_/activations"), 405)


# --- invoking -----------------------------------------------------------------------------------


async def test_blocking_invoke_with_result_answers_the_functions_json_object(whisk: Whisk) -> None:
    params = {"name": "Ada", "n": [1, 2]}
    reply = await whisk.call(
        "POST", "/namespaces/_/actions/echo?blocking=true&result=true", json=params
    )

    assert reply.status == 200
    assert reply.body == params
    assert reply.headers["Content-Type"] == "application/json"
    activation_id = reply.headers["x-openwhisk-activation-id"]
    assert ACTIVATION_ID.fullmatch(activation_id)
    assert reply.headers["X-Request-ID"]
    (called,) = whisk.functions["echo"].requests
    assert called.method == "POST" and called.path == "/" and called.query_string == ""
    assert called.headers["Content-Type"] == "application/json"
    assert json.loads(called.body) == params
    assert called.headers["X-Call-Id"] == activation_id
    assert "Authorization" not in called.headers


async def test_blocking_invoke_answers_the_activation_which_is_then_recorded(
    whisk: Whisk,
) -> None:
    reply = await whisk.call("POST", "/namespaces/guest/actions/echo?blocking=true", json={"a": 1})

    assert reply.status == 200
    activation = reply.body
    activation_id = activation["activationId"]
    assert reply.headers["x-openwhisk-activation-id"] == activation_id
    assert activation["response"] == {"status": "success", "success": True, "result": {"a": 1}}
    assert activation["namespace"] == "guest" and activation["name"] == "echo"
    assert activation["version"] == "0.0.1" and activation["publish"] is False
    assert activation["subject"] == "guest" and activation["logs"] == []
    assert activation["end"] >= activation["start"] > 0
    assert activation["duration"] >= 0
    annotations = {entry["key"]: entry["value"] for entry in activation["annotations"]}
    assert annotations["path"] == "guest/echo"
    assert annotations["kind"] == "blackbox"

    stored = await whisk.ended(activation_id)
    assert stored.status == 200
    assert stored.body["response"] == activation["response"]
    assert stored.body["start"] == activation["start"]
    status, record = await get_json(
        whisk.http, whisk.gateway.url(f"/system/activations/{activation_id}")
    )
    assert status == 401  # /system takes the same credentials
    async with whisk.http.get(
        whisk.gateway.url(f"/system/activations/{activation_id}"), headers=AUTH
    ) as response:
        record = await response.json()
    assert record["status"] == "succeeded" and record["function"] == "echo"


async def test_params_empty_body_is_an_empty_object_and_others_are_malformed(
    whisk: Whisk,
) -> None:
    empty = await whisk.call("POST", "/namespaces/_/actions/echo?blocking=true&result=true")
    assert (empty.status, empty.body) == (200, {})
    assert whisk.functions["echo"].requests[-1].body == b"{}"

    for body in (b"a=1&b=2", b"[1, 2]", b'"text"', b"{"):
        reply = await whisk.call(
            "POST",
            "/namespaces/_/actions/echo?blocking=true",
            data=body,
            headers={"Content-Type": "application/json"},
        )
        assert_whisk_error(reply, 400, "The request content was malformed")
    assert len(whisk.functions["echo"].requests) == 1


@pytest.mark.parametrize("wait_ms", ["0", "60001", "-5", "1.5", "abc", ""])
async def test_timeout_is_milliseconds_from_1_to_60000(whisk: Whisk, wait_ms: str) -> None:
    reply = await whisk.call(
        "POST", f"/namespaces/_/actions/echo?blocking=true&timeout={wait_ms}", json={}
    )
    error = assert_whisk_error(reply, 400)
    assert error == "Timeout must be number of milliseconds up to 60000."
    assert whisk.functions["echo"].requests == []


async def test_non_blocking_invoke_is_queued_and_404_until_it_has_ended(whisk: Whisk) -> None:
    # The npm client's request: a bare '?' and no flags.
    reply = await whisk.call("POST", "/namespaces/_/actions/held?", json={"x": 1})

    assert reply.status == 202
    activation_id = reply.body["activationId"]
    assert reply.body == {"activationId": activation_id}
    assert reply.headers["x-openwhisk-activation-id"] == activation_id
    assert ACTIVATION_ID.fullmatch(activation_id)
    await asyncio.wait_for(whisk.gate.entered.wait(), DEADLINE_S)  # the worker runs it
    for suffix in ("", "/result", "/logs"):
        early = await whisk.call("GET", f"/namespaces/_/activations/{activation_id}{suffix}")
        assert_whisk_error(early, 404, NOT_FOUND)
    listed = await whisk.call("GET", "/namespaces/_/activations?name=held")
    assert listed.body == []  # listed once it has ended, as OpenWhisk lists it

    whisk.gate.opened.set()
    ended = await whisk.ended(activation_id)
    assert ended.status == 200
    assert ended.body["response"]["result"] == {"held": {"x": 1}}
    result = await whisk.call("GET", f"/namespaces/_/activations/{activation_id}/result")
    assert result.body == {"result": {"held": {"x": 1}}, "success": True, "status": "success"}
    logs = await whisk.call("GET", f"/namespaces/guest/activations/{activation_id}/logs")
    assert (logs.status, logs.body) == (200, {"logs": []})
    (called,) = whisk.functions["held"].requests
    assert called.method == "POST" and called.headers["Content-Type"] == "application/json"
    assert called.headers["X-Call-Id"] == activation_id
    assert "Authorization" not in called.headers


async def test_a_blocking_call_still_running_after_timeout_turns_into_202(whisk: Whisk) -> None:
    reply = await whisk.call(
        "POST", "/namespaces/_/actions/held?blocking=true&result=true&timeout=50", json={"y": 2}
    )

    assert reply.status == 202
    activation_id = reply.body["activationId"]
    assert reply.body == {"activationId": activation_id}
    assert reply.headers["x-openwhisk-activation-id"] == activation_id
    early = await whisk.call("GET", f"/namespaces/_/activations/{activation_id}")
    assert_whisk_error(early, 404)

    whisk.gate.opened.set()  # the call goes on in the gateway, and ends now
    ended = await whisk.ended(activation_id)
    assert ended.body["response"] == {
        "status": "success",
        "success": True,
        "result": {"held": {"y": 2}},
    }
    assert len(whisk.functions["held"].requests) == 1  # called once, not queued again


async def test_results_and_statuses_of_every_ending(whisk: Whisk) -> None:
    async def invoke(action: str, result: bool = False) -> Reply:
        flags = "blocking=true" + ("&result=true" if result else "")
        return await whisk.call("POST", f"/namespaces/_/actions/{action}?{flags}", json={})

    wrapped = await invoke("text", result=True)
    assert wrapped.status == 200
    assert wrapped.body["statusCode"] == 200
    assert wrapped.body["body"] == "hello"
    assert wrapped.body["headers"]["X-Custom"] == "yes"
    assert wrapped.body["headers"]["Content-Type"].startswith("text/plain")
    assert "Content-Length" not in wrapped.body["headers"]

    listed = await invoke("array", result=True)
    assert (listed.status, listed.body["statusCode"], listed.body["body"]) == (200, 200, "[1, 2]")

    failed = await invoke("boom")
    assert failed.status == 502
    assert failed.body["response"] == {
        "status": "application error",
        "success": False,
        "result": {"error": "boom"},
    }
    assert failed.headers["x-openwhisk-activation-id"] == failed.body["activationId"]
    missing = await invoke("nope", result=True)
    assert missing.status == 502
    assert (missing.body["statusCode"], missing.body["body"]) == (404, "no such thing")

    slow = await invoke("never")  # exec_timeout 0.3s, shorter than the wait
    assert slow.status == 502
    assert slow.body["response"]["status"] == "action developer error"
    assert "timeout" in slow.body["response"]["result"]["error"]

    unreachable = await invoke("gone")
    assert unreachable.status == 500
    assert unreachable.body["response"]["status"] == "whisk internal error"
    assert unreachable.body["response"]["success"] is False
    assert unreachable.headers["x-openwhisk-activation-id"]

    # The records say the same once written.
    for reply, status in ((failed, "application error"), (slow, "action developer error")):
        stored = await whisk.ended(reply.body["activationId"])
        assert stored.body["response"]["status"] == status
        assert stored.body["response"]["result"] == reply.body["response"]["result"]


async def test_actions_of_a_package_are_functions_named_package__action(whisk: Whisk) -> None:
    reply = await whisk.call(
        "POST", "/namespaces/_/actions/pkg/hello?blocking=true&result=true", json={"p": 1}
    )
    assert (reply.status, reply.body) == (200, {"p": 1})
    action = await whisk.call("GET", "/namespaces/guest/actions/pkg/hello")
    assert action.body["namespace"] == "guest/pkg" and action.body["name"] == "hello"
    assert_whisk_error(await whisk.call("GET", "/namespaces/_/actions/other/hello"), 404)


async def test_invokes_are_taken_by_the_lean_server_and_answered_as_the_route_does(
    whisk: Whisk,
) -> None:
    """An invoke of an action that exists, with its credentials, a small body and a plain
    query, on a connection that has only invoked so far (as a client's that calls actions),
    is served by gateway/invocation_server.py, as /function/ is, so that a blocking invoke
    adds no more than /function/ does (bench scenario 9); its answers are the route's. What
    it does not take (no such action, no credentials, an escaped query) aiohttp's route
    answers as before, on a connection that stays aiohttp's."""
    actions = handler_of(whisk.gateway, "/api/v1/namespaces/{namespace}/actions/{name}", "POST")
    taken: list[str] = []
    invoke_whole = actions.invoke_whole

    async def counted(name: str, query: Any, request: Any) -> Any:
        taken.append(name)
        return await invoke_whole(name, query, request)

    actions.invoke_whole = counted
    async with aiohttp.ClientSession() as fresh:  # a connection that only invokes
        invoking = Whisk(whisk.gateway, whisk.registry, fresh, whisk.functions)
        result = await invoking.call(
            "POST",
            "/namespaces/_/actions/echo?blocking=true&result=true",
            json={"a": 1},
            headers={"X-Request-ID": "tx7"},
        )
        assert (result.status, result.body) == (200, {"a": 1})
        assert result.headers["X-Request-ID"] == "tx7"
        assert ACTIVATION_ID.fullmatch(result.headers[ACTIVATION_ID_HEADER])
        whole = await invoking.call(
            "POST", "/namespaces/guest/actions/pkg/hello?blocking=true", json={"p": 2}
        )
        assert whole.status == 200, whole.body
        assert whole.body["response"]["result"] == {"p": 2}
        assert whole.body["activationId"] == whole.headers[ACTIVATION_ID_HEADER]
        queued = await invoking.call("POST", "/namespaces/_/actions/echo", json={"n": 3})
        assert queued.status == 202
        assert (await whisk.ended(queued.body["activationId"])).body["response"]["result"] == {
            "n": 3
        }
        bad_timeout = "/namespaces/_/actions/echo?blocking=true&timeout=0"
        assert_whisk_error(await invoking.call("POST", bad_timeout), 400)
        not_an_object = await invoking.call(
            "POST",
            "/namespaces/_/actions/echo",
            data=b"[1]",
            headers={"Content-Type": "application/json"},
        )
        assert_whisk_error(not_an_object, 400)
        assert taken == ["echo", "pkg__hello", "echo", "echo", "echo"]

    for path, auth, status in (
        ("/namespaces/_/actions/nothing?blocking=true", True, 404),
        ("/namespaces/_/actions/echo?blocking=true", False, 401),
        ("/namespaces/_/actions/echo?blocking=true&result=true&note=a%20b", True, 200),
    ):
        async with aiohttp.ClientSession() as other:  # each on a fresh connection
            reply = await Whisk(whisk.gateway, whisk.registry, other).call(
                "POST", path, auth=auth, json={"b": 4}
            )
            if status == 200:
                assert (reply.status, reply.body) == (200, {"b": 4})
            else:
                assert_whisk_error(reply, status)
    assert len(taken) == 5


# --- APISIX's openwhisk plugin ------------------------------------------------------------------


async def apisix(
    whisk: Whisk, action: str, body: bytes, query: list[tuple[str, str]]
) -> tuple[int, dict[str, str], bytes]:
    """The plugin's request (apisix/plugins/openwhisk.lua, access phase), then what it does
    with the answer: the status, headers and body APISIX's own client gets."""
    url = whisk.url(f"/namespaces/guest/actions/{action}")
    headers = {
        "Authorization": "Basic " + base64.b64encode(API_KEY.encode()).decode(),
        "Content-Type": "application/json",
    }
    async with whisk.http.post(url, params=query, data=body, headers=headers) as response:
        status, raw = response.status, await response.read()
    try:
        result = json.loads(raw)
    except ValueError:
        return 503, {}, b""  # "failed to parse openwhisk response data"
    if not isinstance(result, dict):
        return status, {}, raw
    code = result.get("statusCode") or status
    answer = result.get("body") or raw
    if not isinstance(answer, bytes | str):
        answer = json.dumps(answer)  # APISIX JSON-encodes a table
    return (
        code,
        dict(result.get("headers") or {}),
        answer.encode() if isinstance(answer, str) else answer,
    )


PLUGIN_QUERIES = [
    [("blocking", "true"), ("result", "true"), ("timeout", "3000")],
    [("timeout", "3000"), ("result", "true"), ("blocking", "true")],
    [("result", "true"), ("timeout", "3000"), ("blocking", "true")],
]


@pytest.mark.parametrize("query", PLUGIN_QUERIES)
async def test_apisix_route_gets_the_functions_status_headers_and_body(
    whisk: Whisk, query: list[tuple[str, str]]
) -> None:
    # TEST 6/9 of the plugin's suite: the result object is the body.
    assert await apisix(whisk, "echo", b'{"hello": "world"}', query) == (
        200,
        {},
        b'{"hello": "world"}',
    )
    # TESTs 17, 19, 21: statusCode, headers and body in the result take effect.
    status, _, _ = await apisix(whisk, "echo", b'{"statusCode": 407}', query)
    assert status == 407
    _, headers, _ = await apisix(whisk, "echo", b'{"headers": {"test": "header"}}', query)
    assert headers == {"test": "header"}
    _, _, body = await apisix(whisk, "echo", b'{"body": {"test": "body"}}', query)
    assert json.loads(body) == {"test": "body"}
    # A GET through APISIX: an empty body, still with Content-Type: application/json.
    assert await apisix(whisk, "echo", b"", query) == (200, {}, b"{}")
    # A function that answers text: APISIX serves its status, headers and body.
    status, headers, body = await apisix(whisk, "text", b"", query)
    assert (status, headers["X-Custom"], body) == (200, "yes", b"hello")
    status, _, body = await apisix(whisk, "nope", b"", query)
    assert (status, body) == (404, b"no such thing")
    # TEST 7: a form body is OpenWhisk's 400; TEST 11: an unknown action is its 404.
    status, _, body = await apisix(whisk, "echo", b"a=1&b=2", query)
    assert status == 400 and b"The request content was malformed" in body
    status, _, body = await apisix(whisk, "nosuch", b"", query)
    assert status == 404 and json.loads(body)["error"] == NOT_FOUND


async def test_apisix_route_to_a_slow_action_gets_the_202_before_its_read_timeout(
    whisk: Whisk,
) -> None:
    status, _, body = await apisix(
        whisk, "held", b'{"z": 3}', [("blocking", "true"), ("result", "true"), ("timeout", "50")]
    )
    assert status == 202
    activation_id = json.loads(body)["activationId"]
    whisk.gate.opened.set()
    assert (await whisk.ended(activation_id)).body["response"]["result"] == {"held": {"z": 3}}


async def test_every_invoke_answer_is_json_for_apisix(whisk: Whisk) -> None:
    """A non-JSON or empty answer is a 503 at APISIX: none of the endings gives one."""
    for action in ("echo", "text", "boom", "nope", "array", "never", "gone", "nosuch"):
        reply = await whisk.call(
            "POST", f"/namespaces/_/actions/{action}?blocking=true&result=true", data=b""
        )
        assert reply.headers["Content-Type"] == "application/json", action
        assert isinstance(json.loads(reply.raw), dict), action
        # Each call that reached a function names its activation, a failed one too.
        called = action != "nosuch"
        assert (ACTIVATION_ID_HEADER in reply.headers) == called, action


# --- actions ------------------------------------------------------------------------------------


def url_action(url: str, **more: Any) -> dict[str, Any]:
    """What the npm client's actions.create({name, action: <this>}) sends, verbatim."""
    return {
        "exec": {"kind": "blackbox", "image": "any/image"},
        "annotations": [{"key": "url", "value": url}],
        **more,
    }


async def test_actions_are_created_read_listed_updated_and_deleted(whisk: Whisk) -> None:
    target = whisk.functions["echo"].url
    created = await whisk.call("PUT", "/namespaces/_/actions/made?", json=url_action(target))

    assert created.status == 200
    assert created.body["name"] == "made" and created.body["namespace"] == "guest"
    assert created.body["exec"]["kind"] == "blackbox"
    assert created.body["exec"]["image"] == "any/image"
    assert {"key": "url", "value": target} in created.body["annotations"]
    again = await whisk.call("PUT", "/namespaces/_/actions/made", json=url_action(target))
    assert_whisk_error(again, 409, "resource already exists")

    # Same registry as /system/functions: callable at /function/made.
    async with whisk.http.post(whisk.gateway.url("/function/made"), data=b"hi") as response:
        assert (response.status, await response.read()) == (200, b"hi")
    invoked = await whisk.call(
        "POST", "/namespaces/_/actions/made?blocking=true&result=true", json={"k": "v"}
    )
    assert (invoked.status, invoked.body) == (200, {"k": "v"})

    other = whisk.functions["text"].url
    updated = await whisk.call(
        "PUT",
        "/namespaces/_/actions/made?overwrite=true",
        json=url_action(other, limits={"timeout": 1500}),
    )
    assert updated.status == 200
    assert {"key": "url", "value": other} in updated.body["annotations"]
    assert updated.body["limits"] == {"timeout": 1500}
    got = await whisk.call("GET", "/namespaces/_/actions/made?code=false")
    assert got.body == updated.body

    listed = await whisk.call("GET", "/namespaces/_/actions?limit=2&skip=1")
    names = sorted(function.name for function in whisk.registry)
    assert [action["name"] for action in listed.body] == names[1:3]
    count = await whisk.call("GET", "/namespaces/_/actions?count=true")
    assert count.body == {"actions": len(names)}

    deleted = await whisk.call("DELETE", "/namespaces/_/actions/made")
    assert deleted.status == 200 and deleted.body["name"] == "made"
    assert_whisk_error(await whisk.call("GET", "/namespaces/_/actions/made"), 404)
    assert_whisk_error(await whisk.call("DELETE", "/namespaces/_/actions/made"), 404)


async def test_functions_deployed_through_system_are_actions_and_packages_can_be_made(
    whisk: Whisk,
) -> None:
    deploy = {"service": "fromfaas", "url": whisk.functions["echo"].url}
    async with whisk.http.post(
        whisk.gateway.url("/system/functions"), json=deploy, headers=AUTH
    ) as response:
        assert response.status == 202
    action = await whisk.call("GET", "/namespaces/_/actions/fromfaas")
    assert action.status == 200

    made = await whisk.call(
        "PUT", "/namespaces/_/actions/tools/upper", json=url_action(whisk.functions["echo"].url)
    )
    assert made.status == 200 and made.body["namespace"] == "guest/tools"
    async with whisk.http.get(
        whisk.gateway.url("/system/function/tools__upper"), headers=AUTH
    ) as response:
        assert response.status == 200


async def test_actions_that_cannot_be_made_get_a_400_that_says_why(whisk: Whisk) -> None:
    code = await whisk.call(
        "PUT",
        "/namespaces/_/actions/coded",
        json={"exec": {"kind": "nodejs:default", "code": "function main() {}"}},
    )
    error = assert_whisk_error(code, 400)
    assert "HTTP functions" in error and '"key": "url"' in error
    for body, words in (
        ({"exec": {"kind": "blackbox", "image": "x"}}, "no URL"),
        ({"exec": {"kind": "sequence", "components": ["/_/a"]}}, "Sequences"),
        (url_action("ftp://example.com/"), "url"),
        (url_action("http://127.0.0.1:1", parameters=[{"key": "a", "value": 1}]), "parameters"),
    ):
        reply = await whisk.call("PUT", "/namespaces/_/actions/bad", json=body)
        assert words in assert_whisk_error(reply, 400), body
    bad_name = await whisk.call("PUT", "/namespaces/_/actions/a.b", json=url_action("http://x"))
    assert_whisk_error(bad_name, 400)
    malformed = await whisk.call(
        "PUT", "/namespaces/_/actions/bad", data=b"{", headers={"Content-Type": "application/json"}
    )
    assert_whisk_error(malformed, 400, "The request content was malformed")
    # Functions of the functions file are read-only here, as through /system/functions.
    file_function = await whisk.call(
        "PUT", "/namespaces/_/actions/echo?overwrite=true", json=url_action("http://127.0.0.1:1")
    )
    assert "functions file" in assert_whisk_error(file_function, 409)
    assert_whisk_error(await whisk.call("DELETE", "/namespaces/_/actions/echo"), 409)


# --- activations --------------------------------------------------------------------------------


async def test_activation_listing_newest_first_with_its_filters(whisk: Whisk) -> None:
    ids = []
    for index in range(4):
        action = "echo" if index % 2 == 0 else "text"
        reply = await whisk.call("POST", f"/namespaces/_/actions/{action}?blocking=true", json={})
        ids.append(reply.body["activationId"])
    for activation_id in ids:
        await whisk.ended(activation_id)
    newest_first = ids[::-1]

    listed = await whisk.call("GET", "/namespaces/_/activations")
    assert [entry["activationId"] for entry in listed.body] == newest_first
    summary = listed.body[0]
    assert "response" not in summary and "logs" not in summary
    assert summary["statusCode"] == 0 and summary["name"] == "text"
    skip = await whisk.call("GET", "/namespaces/_/activations?limit=2&skip=1")
    assert [entry["activationId"] for entry in skip.body] == newest_first[1:3]
    named = await whisk.call("GET", "/namespaces/_/activations?name=echo&docs=true")
    assert [entry["activationId"] for entry in named.body] == [ids[2], ids[0]]
    assert named.body[0]["response"]["status"] == "success"
    count = await whisk.call("GET", "/namespaces/_/activations?count=true&name=text")
    assert count.body == {"activations": 2}
    starts = [entry["start"] for entry in listed.body]
    window = await whisk.call(
        "GET", f"/namespaces/_/activations?since={starts[2]}&upto={starts[1]}"
    )
    assert [entry["activationId"] for entry in window.body] == newest_first[1:3]
    everything = await whisk.call("GET", "/namespaces/_/activations?limit=0")
    assert len(everything.body) == 4

    for query, words in (
        ("limit=201", "The value '201' is not in the range of 0 to 200"),
        ("limit=x", "The value 'x' is not an integer"),
        ("skip=-1", "The value '-1' is not greater than or equal to 0"),
        ("since=yesterday", "Parameter is not a valid value"),
        ("name=a/b/c", "Parameter may be a 'simple' name"),
        ("docs=true&count=true", "The parameter 'docs' is not permitted with 'count'."),
    ):
        assert_whisk_error(
            await whisk.call("GET", f"/namespaces/_/activations?{query}"), 400, words
        )


async def test_activation_ids_are_checked_and_unknown_ones_are_404(whisk: Whisk) -> None:
    invalid = await whisk.call("GET", "/namespaces/_/activations/not..valid")
    assert_whisk_error(invalid, 400, "The activation id is not valid.")
    unknown = await whisk.call("GET", f"/namespaces/_/activations/{uuid.uuid4().hex}/result")
    assert_whisk_error(unknown, 404, NOT_FOUND)
