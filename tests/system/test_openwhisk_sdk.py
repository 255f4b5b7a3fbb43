"""The real ``openwhisk`` npm client, pinned, against a real gateway, worker and nats-server:
small node scripts doing what OpenWhisk users' code does, with only the API host changed.

The client is installed once into .cache/openwhisk-sdk (git-ignored) with npm and reused;
without node and npm these tests are skipped, saying how to install them.
"""

import asyncio
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import RunningGateway, StartGateway, StartRecorder, StartWorker
from tests.gateway.test_openwhisk import PASSWORD, USER, whisk_gateway
from tests.harness import ROOT, RecordedRequest, Recorder, registry_of

SDK_VERSION = "3.21.9"
SDK_DIR = ROOT / ".cache" / "openwhisk-sdk"
DEADLINE_S = 60.0


@pytest.fixture(scope="session")
def sdk_modules() -> Path:
    """node_modules holding openwhisk@SDK_VERSION, installed on first use."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip(
            "the openwhisk npm client needs node and npm: install Node.js 18 or later "
            "(Debian/Ubuntu: apt-get install nodejs npm; or https://nodejs.org), then run "
            "the tests again; they install the client into .cache/openwhisk-sdk themselves"
        )
    modules = SDK_DIR / "node_modules"
    manifest = modules / "openwhisk" / "package.json"
    if not manifest.exists() or json.loads(manifest.read_text())["version"] != SDK_VERSION:
        SDK_DIR.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                npm,
                "install",
                "--prefix",
                str(SDK_DIR),
                "--no-audit",
                "--no-fund",
                "--no-save",
                f"openwhisk@{SDK_VERSION}",
            ],
            check=True,
            capture_output=True,
            timeout=300,
        )
    assert json.loads(manifest.read_text())["version"] == SDK_VERSION
    return modules


class Gate:
    """A function that holds every call until the test opens the gate."""

    def __init__(self) -> None:
        self.opened = asyncio.Event()

    async def responder(self, request: web.Request, recorded: RecordedRequest) -> web.Response:
        await self.opened.wait()
        return web.json_response({"done": json.loads(recorded.body)})


async def echo(request: web.Request, recorded: RecordedRequest) -> web.Response:
    return web.Response(body=recorded.body, content_type=request.content_type)


class Node:
    """Runs a script with the client, configured as OpenWhisk users configure it: the API
    host and key in __OW_API_HOST and __OW_API_KEY."""

    def __init__(self, modules: Path, tmp_path: Path, gateway: RunningGateway) -> None:
        self._modules = modules
        self._tmp_path = tmp_path
        self._gateway = gateway

    @property
    def api_host(self) -> str:
        return self._gateway.url("/").rstrip("/")  # no trailing slash: the client adds /api/v1

    async def run(
        self, body: str, on_event: Callable[[dict[str, Any]], None] | None = None
    ) -> dict[str, Any]:
        """``body`` runs inside an async function with ``ow`` (the client), ``emit(event)``
        (a line the test sees at once) and ``sleep(ms)``; what it returns is the result."""
        script = self._tmp_path / f"script-{len(list(self._tmp_path.glob('script-*')))}.js"
        script.write_text(
            "const openwhisk = require('openwhisk')\n"
            "const ow = openwhisk()\n"
            "const emit = event => console.log(JSON.stringify({event}))\n"
            "const sleep = ms => new Promise(resolve => setTimeout(resolve, ms))\n"
            "const failure = e => ({message: e.message, statusCode: e.statusCode, "
            "error: e.error})\n"
            f"async function main () {{\n{body}\n}}\n"
            "main().then(result => console.log(JSON.stringify({result})))\n"
            "  .catch(e => { console.log(JSON.stringify({crashed: failure(e)})); "
            "process.exit(1) })\n"
        )
        process = await asyncio.create_subprocess_exec(
            "node",
            str(script),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={
                **os.environ,
                "NODE_PATH": str(self._modules),
                "__OW_API_HOST": self.api_host,
                "__OW_API_KEY": f"{USER}:{PASSWORD}",
            },
        )
        assert process.stdout is not None and process.stderr is not None
        try:
            async with asyncio.timeout(DEADLINE_S):
                outcome: dict[str, Any] = {}
                while line := await process.stdout.readline():
                    message = json.loads(line)
                    if "event" in message and on_event is not None:
                        on_event(message["event"])
                    outcome.update(message)
                errors = await process.stderr.read()
                await process.wait()
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        assert process.returncode == 0, (outcome, errors.decode())
        result: dict[str, Any] = outcome["result"]
        return result


@pytest.fixture
async def node(
    sdk_modules: Path,
    recorder: StartRecorder,
    start_gateway: StartGateway,
    start_worker: StartWorker,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> tuple[Node, Gate, Recorder]:
    gate = Gate()
    function = await recorder(echo)
    held = await recorder(gate.responder)
    entries = {"echo": function.url, "held": held.url}
    gateway = await whisk_gateway(
        start_gateway, http, registry_of(**entries), tmp_path / "no-secrets"
    )
    await start_worker(registry_of(**entries))
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    return Node(sdk_modules, scripts, gateway), gate, function


POLL = """
  // The loop of OpenWhisk's long-running actions article: get until it stops throwing 404.
  async function poll (activationId) {
    let waited = 0
    while (true) {
      try {
        return {activation: await ow.activations.get({activationId}), waited}
      } catch (e) {
        if (e.statusCode !== 404) throw e
        if (waited++ === 0) emit({waiting: activationId})
        await sleep(20)
      }
    }
  }
"""


async def test_blocking_invoke_with_result_and_without(node: tuple[Node, Gate, Recorder]) -> None:
    client, _, function = node
    result = await client.run(
        """
  const result = await ow.actions.invoke({name: 'echo', params: {hello: 'world'},
                                          blocking: true, result: true})
  const activation = await ow.actions.invoke({name: 'echo', params: {n: 1}, blocking: true})
  const named = await ow.actions.invoke({name: '/guest/echo', params: {}, blocking: true,
                                         result: true})
  return {result, activation, named}
"""
    )

    assert result["result"] == {"hello": "world"}
    assert result["named"] == {}
    activation = result["activation"]
    assert activation["response"] == {"status": "success", "success": True, "result": {"n": 1}}
    assert len(activation["activationId"]) == 32
    assert [json.loads(request.body) for request in function.requests] == [
        {"hello": "world"},
        {"n": 1},
        {},
    ]
    assert all("Authorization" not in request.headers for request in function.requests)


async def test_non_blocking_invoke_polled_until_it_has_ended_then_result_logs_list(
    node: tuple[Node, Gate, Recorder],
) -> None:
    client, _, _ = node
    result = await client.run(
        POLL
        + """
  const {activationId} = await ow.actions.invoke({name: 'echo', params: {x: 1}})
  const {activation} = await poll(activationId)
  const result = await ow.activations.result({activationId})
  const logs = await ow.activations.logs(activationId)
  const list = await ow.activations.list({name: 'echo', limit: 5})
  const docs = await ow.activations.list({name: 'echo', limit: 5, docs: true})
  const count = await ow.activations.list({name: 'echo', count: true})
  return {activationId, activation, result, logs, list, docs, count}
"""
    )

    activation_id = result["activationId"]
    assert result["activation"]["activationId"] == activation_id
    assert result["activation"]["response"]["result"] == {"x": 1}
    assert result["result"] == {"result": {"x": 1}, "success": True, "status": "success"}
    assert result["logs"] == {"logs": []}
    assert [entry["activationId"] for entry in result["list"]] == [activation_id]
    assert result["docs"][0]["response"]["result"] == {"x": 1}
    assert result["count"] == {"activations": 1}


async def test_the_70_second_case_with_short_times(node: tuple[Node, Gate, Recorder]) -> None:
    """A function that runs longer than a blocking call waits: the blocking call (here with
    a 100 ms wait, as APISIX or wsk ask with ?timeout=) is handed an activation id instead of
    an error, and a non-blocking call is polled until done; both finish once the function
    answers, which it does only after the client has seen a 404."""
    client, gate, _ = node

    def on_event(event: dict[str, Any]) -> None:
        if "waiting" in event:
            gate.opened.set()

    result = await client.run(
        POLL
        + """
  const blocking = await ow.actions.client.request('POST', 'namespaces/_/actions/held',
    {qs: {blocking: true, result: true, timeout: 100}, body: {call: 'blocking'}})
  const {activationId} = await ow.actions.invoke({name: 'held', params: {call: 'async'}})
  const polled = await poll(activationId)
  const first = await poll(blocking.activationId)
  return {blocking, polled, first}
""",
        on_event,
    )

    assert set(result["blocking"]) == {"activationId"}
    assert result["polled"]["waited"] >= 1
    assert result["polled"]["activation"]["response"]["result"] == {"done": {"call": "async"}}
    assert result["first"]["activation"]["response"]["result"] == {"done": {"call": "blocking"}}


async def test_actions_created_read_listed_updated_and_deleted_with_a_url(
    node: tuple[Node, Gate, Recorder],
) -> None:
    client, _, function = node
    url = function.url
    result = await client.run(
        f"""
  const url = {json.dumps(url)}
  const created = await ow.actions.create({{name: 'made',
    action: {{exec: {{kind: 'blackbox', image: 'none'}},
              annotations: [{{key: 'url', value: url}}]}}}})
  let conflict = null
  try {{ await ow.actions.create({{name: 'made', action: {{exec: {{kind: 'blackbox'}},
    annotations: [{{key: 'url', value: url}}]}}}}) }} catch (e) {{ conflict = failure(e) }}
  // The client's annotations option: {{url}} becomes [{{key: 'url', value}}].
  const packaged = await ow.actions.create({{name: 'pkg/other',
    action: {{exec: {{kind: 'blackbox', image: 'none'}}}}, annotations: {{url}}}})
  const got = await ow.actions.get({{name: 'made'}})
  const list = await ow.actions.list({{limit: 50}})
  const invoked = await ow.actions.invoke({{name: 'pkg/other', params: {{p: 2}}, blocking: true,
                                           result: true}})
  const updated = await ow.actions.update({{name: 'made', action: {{limits: {{timeout: 2000}}}}}})
  let coded = null
  try {{ await ow.actions.create({{name: 'coded', action: 'function main () {{}}'}}) }}
  catch (e) {{ coded = failure(e) }}
  const deleted = await ow.actions.delete({{name: 'made'}})
  let gone = null
  try {{ await ow.actions.get({{name: 'made'}}) }} catch (e) {{ gone = failure(e) }}
  return {{created, conflict, packaged, got, list, invoked, updated, coded, deleted, gone}}
"""
    )

    assert result["created"]["name"] == "made"
    assert {"key": "url", "value": url} in result["created"]["annotations"]
    assert result["conflict"]["statusCode"] == 409
    assert result["packaged"]["namespace"] == "guest/pkg"
    assert result["got"] == result["created"]
    assert {"made", "other", "echo", "held"} <= {action["name"] for action in result["list"]}
    assert result["invoked"] == {"p": 2}
    assert result["updated"]["limits"] == {"timeout": 2000}
    assert {"key": "url", "value": url} in result["updated"]["annotations"]  # kept
    assert result["coded"]["statusCode"] == 400
    assert "give the action the URL" in result["coded"]["message"]
    assert result["deleted"]["name"] == "made"
    assert result["gone"]["statusCode"] == 404


async def test_a_wrong_api_key_is_401(node: tuple[Node, Gate, Recorder]) -> None:
    client, _, function = node
    result = await client.run(
        f"""
  const wrong = openwhisk({{apihost: {json.dumps(client.api_host)}, api_key: '{USER}:wrong'}})
  const outcomes = []
  for (const call of [() => wrong.namespaces.list(),
                      () => wrong.actions.invoke({{name: 'echo', blocking: true}}),
                      () => wrong.activations.list()]) {{
    try {{ outcomes.push({{resolved: await call()}}) }} catch (e) {{ outcomes.push(failure(e)) }}
  }}
  return {{outcomes, namespaces: await ow.namespaces.list()}}
"""
    )

    for outcome in result["outcomes"]:
        assert outcome["statusCode"] == 401, outcome
        assert "The supplied authentication is invalid" in outcome["message"]
    assert result["namespaces"] == ["guest"]
    assert function.requests == []
