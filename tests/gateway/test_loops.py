"""Calls that would come back to the gateway: a function URL that is the gateway's own address
is refused at deploy and in the functions file, and a request that comes back through the
gateway (its Via entry for the same function) gets 508 instead of going round for ever.
Real gateways, worker, NATS and functions; the looping functions pass requests back to the
gateway as a misconfigured proxy would."""

import socket
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict

from gateway.loops import MAX_GATEWAY_HOPS, gateway_url_problem_now
from tests.conftest import RunningGateway, StartGateway, StartRecorder, StartWorker, ready_gateway
from tests.harness import RecordedRequest, free_port, registry_of, subprocess_env

DEADLINE_S = 30.0
# Forwards beyond this are the unfixed gateway going round: the test function stops there,
# so a loop the gateway misses fails the test instead of running away.
MOST_FORWARDS = 5


def this_machines_address() -> str | None:
    """A non-loopback address of this machine, if it has one (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: only the route is looked up
        except OSError:
            return None
        address = str(probe.getsockname()[0])
    return None if address.startswith("127.") else address


# --- function URLs that are the gateway itself ----------------------------------------------------


@pytest.mark.parametrize(
    ("url", "gateway_host", "refused"),
    [
        ("http://127.0.0.1:{port}", "127.0.0.1", True),
        ("http://127.0.0.1:{port}/base/", "127.0.0.1", True),
        ("http://localhost:{port}", "127.0.0.1", True),
        ("http://0.0.0.0:{port}", "127.0.0.1", True),
        ("http://127.0.0.2:{port}", "0.0.0.0", True),  # all of 127/8 is this machine
        ("http://[::1]:{port}", "::", True),
        ("http://127.0.0.2:{port}", "127.0.0.1", False),  # another address than the one bound
        ("http://127.0.0.1:{other}", "127.0.0.1", False),
        ("http://127.0.0.1", "127.0.0.1", False),  # port 80
        ("http://192.0.2.1:{port}", "0.0.0.0", False),  # not this machine's
        ("http://no-such-host.invalid:{port}", "0.0.0.0", False),
    ],
)
def test_a_url_is_the_gateway_when_its_address_and_port_are(url, gateway_host, refused):
    port = 18080
    problem = gateway_url_problem_now(url.format(port=port, other=port + 1), gateway_host, port)
    assert (problem is not None) == refused, problem
    if refused:
        assert "points at this gateway" in problem


def test_an_address_of_this_machines_interfaces_is_the_gateway_listening_on_all():
    address = this_machines_address()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    assert gateway_url_problem_now(f"http://{address}:8080", "0.0.0.0", 8080) is not None
    assert gateway_url_problem_now(f"http://{address}:8080", "127.0.0.1", 8080) is None


async def test_deploying_a_function_at_the_gateways_own_address_is_400(
    recorder: StartRecorder, start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    function = await recorder()
    port = free_port()  # what gateway_port says; the check reads the settings
    gateway = await ready_gateway(
        start_gateway, http, registry_of(), gateway_host="0.0.0.0", gateway_port=port
    )
    url = gateway.url("/system/functions")

    for target in (
        f"http://127.0.0.1:{port}",
        f"http://localhost:{port}/x",
        f"http://0.0.0.0:{port}",
    ):
        async with http.post(url, json={"service": "self", "url": target}) as response:
            assert response.status == 400, target
            error = (await response.json())["error"]
        assert "points at this gateway" in error
    async with http.post(url, json={"service": "fine", "url": function.url}) as response:
        assert response.status == 202
    async with http.put(
        url, json={"service": "fine", "url": f"http://127.0.0.1:{port}"}
    ) as response:
        assert response.status == 400
    async with http.get(url) as response:
        [listed] = await response.json()
    assert (listed["name"], listed["url"]) == ("fine", function.url)


def test_a_functions_file_entry_at_the_gateways_own_address_stops_start_up(tmp_path):
    port = free_port()
    functions = tmp_path / "functions.yml"
    functions.write_text(f"functions:\n  self:\n    url: http://localhost:{port}/\n")
    result = subprocess.run(
        [sys.executable, "-m", "gateway"],
        capture_output=True,
        text=True,
        timeout=60,
        env=subprocess_env(functions_file=str(functions), gateway_port=str(port)),
    )
    assert result.returncode != 0
    assert str(functions) in result.stderr
    assert "'self'" in result.stderr
    assert "points at this gateway" in result.stderr


# --- requests that come back through the gateway: 508 ---------------------------------------------


def passing_back(
    gateway_url: Callable[[], str], forwards: list[int], drop: tuple[str, ...] = ()
) -> Any:
    """A function that passes its request on to ``gateway_url()`` with the headers it got
    (but ``drop``), as a proxy would, and answers with what it gets back."""

    async def respond(request: web.Request, recorded: RecordedRequest) -> web.StreamResponse:
        forwards.append(1)
        if len(forwards) > MOST_FORWARDS:
            return web.Response(status=200, text="went round")
        headers = CIMultiDict(recorded.headers)
        for name in ("Host", "Content-Length", "Transfer-Encoding", "Connection", *drop):
            headers.popall(name, None)
        async with (
            aiohttp.ClientSession(auto_decompress=False) as session,
            session.post(gateway_url(), headers=headers, data=recorded.body) as answer,
        ):
            body = await answer.read()
            return web.Response(status=answer.status, body=body, content_type=answer.content_type)

    return respond


async def test_a_sync_call_that_comes_back_through_the_gateway_is_508(
    recorder: StartRecorder, start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    gateway: RunningGateway | None = None
    forwards: list[int] = []
    function = await recorder(passing_back(lambda: gateway.url("/function/loop"), forwards))
    gateway = await start_gateway(registry_of(loop=function.url))

    async with http.post(gateway.url("/function/loop"), data=b"round") as response:
        assert response.status == 508
        error = (await response.json())["error"]
    assert "come back through the gateway" in error
    assert len(function.requests) == 1
    [upstream] = function.requests
    via = upstream.headers["Via"]
    assert via.startswith("1.1 faas-gateway-") and via.endswith(" (function loop)")


async def test_an_async_call_whose_function_queues_it_again_is_refused_with_508(
    recorder: StartRecorder,
    start_gateway: StartGateway,
    start_worker: StartWorker,
    http: aiohttp.ClientSession,
) -> None:
    """The worker's call carries the gateway's Via entry, queued with the call. (The function
    drops X-Call-Id: passed on, it would make the gateway take the new call for a duplicate
    of the first.)"""
    gateway: RunningGateway | None = None
    forwards: list[int] = []
    function = await recorder(
        passing_back(lambda: gateway.url("/async-function/loop"), forwards, drop=("X-Call-Id",))
    )
    receiver = await recorder()
    registry = registry_of(loop=function.url)
    gateway = await ready_gateway(start_gateway, http, registry)
    await start_worker(registry)

    async with http.post(
        gateway.url("/async-function/loop"), headers={"X-Callback-Url": receiver.url}
    ) as response:
        assert response.status == 202
    [callback] = await receiver.wait_for_requests(1, DEADLINE_S)
    assert callback.headers["X-Function-Status"] == "508"
    assert len(function.requests) == 1


async def test_a_chain_of_different_functions_is_no_loop(
    recorder: StartRecorder, start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    """A function may call another through the gateway with the headers it got."""
    gateway: RunningGateway | None = None
    last = await recorder()
    second = await recorder(passing_back(lambda: gateway.url("/function/last"), []))
    first = await recorder(passing_back(lambda: gateway.url("/function/second"), []))
    gateway = await start_gateway(registry_of(first=first.url, second=second.url, last=last.url))

    async with http.post(gateway.url("/function/first"), data=b"on") as response:
        assert response.status == 200
        assert await response.read() == b"ok"
    [arrived] = last.requests
    assert arrived.headers["Via"].count("faas-gateway-") == 3


async def test_too_many_gateway_hops_are_508(
    recorder: StartRecorder, start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    function = await recorder()
    gateway = await start_gateway(registry_of(f=function.url))
    hops = ", ".join(f"1.1 faas-gateway-other{index} (function g)" for index in range(99))
    fewer = hops.split(", ")[: MAX_GATEWAY_HOPS - 1]

    async with http.get(gateway.url("/function/f"), headers={"Via": ", ".join(fewer)}) as response:
        assert response.status == 200
    async with http.get(gateway.url("/function/f"), headers={"Via": hops}) as response:
        assert response.status == 508
    [passed] = function.requests
    assert passed.headers["Via"].startswith(", ".join(fewer) + ", 1.1 faas-gateway-")


async def test_an_unrelated_via_passes_on_with_ours_added(
    recorder: StartRecorder, start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    function = await recorder()
    gateway = await start_gateway(registry_of(f=function.url))

    async with http.get(
        gateway.url("/function/f"), headers={"Via": "1.0 fred, 1.1 p.example.net"}
    ) as response:
        assert response.status == 200
    [passed] = function.requests
    [via] = passed.headers.getall("Via")
    assert via.startswith("1.0 fred, 1.1 p.example.net, 1.1 faas-gateway-")
    assert via.endswith(" (function f)")
