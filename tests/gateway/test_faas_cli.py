"""faas-cli against this gateway: the requests a real faas-cli 0.18.12 sent, replayed.

The recording (faas_cli/faas-cli-0.18.12.json, made by faas_cli/record.py) holds every request
of a user's session (login, deploy twice, list, describe, ready, diff, invoke sync and async,
namespaces, logs, secrets, remove, deploy by image) with the status faas-cli got and its exit
code. The test sends the same requests, in the same order, to a gateway with basic auth, and
checks that each gets the status faas-cli took, and what the user would see.
"""

import base64
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pydantic import ValidationError
from yarl import URL

from gateway.settings import GatewaySettings
from tests.conftest import StartGateway, StartRecorder, StartWorker, ready_gateway
from tests.gateway.faas_cli.record import CREDENTIALS, FUNCTION_URL
from tests.harness import RecordedRequest, RunningGateway, registry_of, wait_until

RECORDING = Path(__file__).parent / "faas_cli" / "faas-cli-0.18.12.json"
PASSWORD = "faas-cli-s3cret"


def recording() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(RECORDING.read_text())
    return document


def secrets_in(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "basic-auth-user").write_text("admin\n")
    (directory / "basic-auth-password").write_text(PASSWORD + "\n")
    return directory


async def replay(
    http: aiohttp.ClientSession, gateway: RunningGateway, request: dict[str, Any], function_url: str
) -> tuple[int, bytes, dict[str, str]]:
    token = base64.b64encode(f"admin:{PASSWORD}".encode()).decode()
    headers = {
        name: value.replace(CREDENTIALS, token) for name, value in request["headers"].items()
    }
    body = request["body"].replace(FUNCTION_URL, function_url).encode()
    url = URL(gateway.url("/")).join(URL(request["path_qs"], encoded=True))
    async with http.request(request["method"], url, headers=headers, data=body) as response:
        return response.status, await response.read(), dict(response.headers)


def by_command(document: dict[str, Any], *argv: str) -> list[dict[str, Any]]:
    found = [c for c in document["commands"] if c["argv"][: len(argv)] == list(argv)]
    assert found, argv
    return found


async def test_a_faas_cli_session_gets_what_faas_cli_took(
    start_gateway: StartGateway,
    start_worker: StartWorker,
    recorder: StartRecorder,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    function = await recorder()
    gateway = await ready_gateway(
        start_gateway,
        http,
        registry_of(),
        basic_auth=True,
        secret_mount_path=secrets_in(tmp_path / "secrets"),
    )
    await start_worker(registry_of())
    document = recording()
    assert document["client"] == "faas-cli 0.18.12"
    answers: dict[str, list[tuple[int, Any, dict[str, str]]]] = {}
    for command in document["commands"]:
        for request in command["requests"]:
            status, body, headers = await replay(http, gateway, request, function.url)
            assert status == request["status"], (command["argv"], request, body)
            is_json = headers.get("Content-Type", "").startswith("application/json")
            answers.setdefault(" ".join(command["argv"]), []).append(
                (status, json.loads(body) if is_json else body, headers)
            )

    # faas-cli exited 0 where it worked, and 1 where this gateway says no.
    failed = {" ".join(c["argv"]) for c in document["commands"] if c["exit"] != 0}
    assert failed == {
        "logs hello --tail=false",
        "secret list",
        "remove plain",  # the second time: gone already
        "deploy --image example/nourl:1 --name nourl",
    }

    # Headers a faas-cli sends: its user agent, Basic auth after login, JSON bodies.
    deploy = by_command(document, "deploy", "-f")[0]["requests"]
    assert [r["method"] for r in deploy] == ["PUT", "POST"]  # update first, deploy on a 404
    assert deploy[0]["headers"]["User-Agent"].startswith("faas-cli/")
    assert deploy[0]["headers"]["Authorization"] == f"Basic {CREDENTIALS}"
    assert deploy[0]["headers"]["Content-Type"] == "application/json"

    info = answers["version --warn-update=false"][0][1]
    assert info["provider"]["provider"] == "faas-gateway" and info["version"]["release"]

    # describe: the stack.yml's image, labels, annotations and environment, as deployed.
    described = answers["describe hello"][0][1]
    assert described["image"] == "example/hello:0.1"
    assert described["url"] == function.url
    assert described["labels"] == {"team": "web"}
    assert described["annotations"]["exec_timeout"] == "30s"
    assert described["envVars"] == {"GREETING": "hi"}
    assert described["availableReplicas"] >= 1  # what faas-cli ready waits for
    listed = answers["list -v"][0][1]
    assert [f["name"] for f in listed] == ["hello"]

    # invoke: reached the function through the annotation's URL, sync and async.
    sync_status, sync_body, _ = answers["invoke hello"][0]
    assert (sync_status, sync_body) == (200, b"ok")
    _, _, async_headers = answers["invoke hello --async"][0]
    call_id = async_headers["X-Call-Id"]
    await wait_until(lambda: call_id in function.by_call_id(), 30.0, "the async call")
    bodies = [r.body for r in function.requests]
    assert bodies[:2] == [b"world", b"later"]

    assert answers["namespace list"][0][1] == ["openfaas-fn"]
    assert answers["namespace get openfaas-fn"][0][1]["name"] == "openfaas-fn"

    # What this gateway does not do: a JSON 501 that says what to do instead.
    for command, words in [("logs hello --tail=false", "logs"), ("secret list", "secrets")]:
        status, error, _ = answers[command][0]
        assert status == 501 and words in error["error"], command

    # A deploy by image alone: 404 for the update, then a 400 that says how to give a URL.
    nourl = answers["deploy --image example/nourl:1 --name nourl"]
    assert [status for status, _, _ in nourl] == [404, 400]
    assert "com.openfaas.url" in nourl[1][1]["error"]

    list_request = by_command(document, "list")[0]["requests"][0]
    status, listed_after, _ = await replay(http, gateway, list_request, "")
    # hello and plain removed, nourl never deployed
    assert (status, json.loads(listed_after)) == (200, [])


async def test_function_url_template_places_a_function_deployed_by_image(
    start_gateway: StartGateway,
    recorder: StartRecorder,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    function = await recorder()
    gateway = await ready_gateway(
        start_gateway,
        http,
        registry_of(),
        basic_auth=True,
        secret_mount_path=secrets_in(tmp_path / "secrets"),
        # Where compose reaches functions by service name this is http://{name}:8080.
        function_url_template=function.url + "/{namespace}/{name}",
    )
    nourl = by_command(recording(), "deploy", "--image", "example/nourl:1")[0]["requests"]
    assert [await replay(http, gateway, r, "") for r in nourl][-1][0] == 202
    async with http.post(gateway.url("/function/nourl"), data=b"x") as response:
        assert response.status == 200
    seen: RecordedRequest = function.requests[-1]
    assert seen.path == "/openfaas-fn/nourl"


async def test_namespaces_scale_and_unknown_updates(
    start_gateway: StartGateway, recorder: StartRecorder, http: aiohttp.ClientSession
) -> None:
    function = await recorder()
    gateway = await ready_gateway(start_gateway, http, registry_of(echo=function.url))
    async with http.get(gateway.url("/system/namespace/other")) as response:
        assert response.status == 404
        assert "openfaas-fn" in (await response.json())["error"]
    scale = {"serviceName": "echo", "replicas": 2}
    async with http.post(gateway.url("/system/scale-function/echo"), json=scale) as response:
        assert response.status == 501
        assert "max_inflight" in (await response.json())["error"]
    # faas-cli updates first: an unknown function is a 404 whatever the body lacks.
    async with http.put(gateway.url("/system/functions"), json={"service": "nope"}) as response:
        assert response.status == 404
    # Go's null for an unset map or list is taken as empty.
    document = {"service": "nulls", "url": function.url, "labels": None, "secrets": None}
    async with http.post(gateway.url("/system/functions"), json=document) as response:
        assert response.status == 202, await response.text()
        assert (await response.json())["labels"] == {}


@pytest.mark.parametrize("template", ["http://{nme}:8080", "http://{0}:8080", "http://{name"])
def test_a_function_url_template_that_cannot_be_filled_in_stops_start_up(template: str) -> None:
    with pytest.raises(ValidationError, match="function_url_template"):
        GatewaySettings(function_url_template=template)
