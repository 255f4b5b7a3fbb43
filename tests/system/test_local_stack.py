"""`make run` (deploy/local_stack.py) as a user runs it: real processes on shifted ports, each
stack with a data directory of its own. One stack per data directory; a gateway or worker that
dies comes back; nats-server that cannot come back stops the stack; a stop waits for the
gateway's drain and a second Ctrl-C does not; the sample sleep function ends its sleeps on
SIGTERM; the install shows progress."""

import asyncio
import base64
import os
import re
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import aiohttp
import pytest

from tests.harness import ROOT, free_port, wait_until

sys.path.insert(0, str(ROOT / "deploy"))
import local_stack

WAIT_S = 60.0
STACK_PORTS = (
    local_stack.NATS_PORT,
    local_stack.GATEWAY_PORT,
    local_stack.WORKER_PORT,
    *local_stack.FUNCTION_PORTS.values(),
)


def free_offset(taken: frozenset[int] | set[int] = frozenset()) -> int:
    """An offset at which every port of the stack is free: below the ephemeral ports (32768
    and up), where a connection of another process may sit on a port without listening."""
    for offset in range(11000, 23000, 10):
        if offset not in taken and all(port_free(port + offset) for port in STACK_PORTS):
            return offset
    raise AssertionError("no free port offset")


def port_free(port: int) -> bool:
    import socket

    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class RunningStack:
    """deploy/local_stack.py as a process, its output collected as it comes."""

    def __init__(self, data_dir: Path, offset: int, env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.offset = offset
        self.env = env or {}
        self.output = bytearray()
        self.process: asyncio.subprocess.Process | None = None
        self._collector: asyncio.Task[None] | None = None

    async def start(self) -> "RunningStack":
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            str(ROOT / "deploy" / "local_stack.py"),
            "--port-offset",
            str(self.offset),
            "--data-dir",
            str(self.data_dir),
            env={**os.environ, **self.env},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        self._collector = asyncio.create_task(self._collect())
        return self

    async def _collect(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        while chunk := await self.process.stdout.read(4096):
            self.output.extend(chunk)

    @property
    def text(self) -> str:
        return self.output.decode(errors="replace")

    async def wait_for(self, pattern: str, what: str) -> re.Match[str]:
        def found() -> re.Match[str] | None:
            match = re.search(pattern, self.text, re.MULTILINE)
            if match is None and self.process is not None and self.process.returncode is not None:
                raise AssertionError(f"the stack exited before {what}:\n{self.text[-3000:]}")
            return match

        return await wait_until(found, WAIT_S, what)

    async def up(self) -> "RunningStack":
        await self.wait_for(r"^stack is up", "the stack to be up")
        return self

    def pid(self, service: str) -> int:
        started = re.findall(rf"^started {service} (?:again )?\(pid (\d+)\)$", self.text, re.M)
        return int(started[-1])

    def url(self, default_port: int, path: str) -> str:
        return f"http://127.0.0.1:{default_port + self.offset}{path}"

    async def exited(self) -> int:
        assert self.process is not None and self._collector is not None
        code = await asyncio.wait_for(self.process.wait(), WAIT_S)
        await self._collector
        return code

    async def stop(self) -> int:
        assert self.process is not None
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGINT)
        return await self.exited()

    def kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()


@pytest.fixture
async def stacks():
    started: list[RunningStack] = []

    async def start(data_dir: Path, offset: int, **env: str) -> RunningStack:
        stack = await RunningStack(data_dir, offset, env).start()
        started.append(stack)
        return stack

    yield start
    for stack in started:
        if stack.process is not None and stack.process.returncode is None:
            stack.process.send_signal(signal.SIGINT)
            stack.process.send_signal(signal.SIGINT)  # at once: the test is over
    for stack in started:
        try:
            await stack.exited()
        except TimeoutError:
            stack.kill()


async def status_of(url: str) -> int:
    try:
        async with aiohttp.ClientSession() as http, http.get(url) as response:
            return response.status
    except aiohttp.ClientError:
        return 0


async def async_call_succeeds(stack: RunningStack) -> None:
    """An async call through the stack's gateway, run by its worker, its record read back."""
    password = (stack.data_dir / "secrets" / "basic-auth-password").read_text().strip()
    token = base64.b64encode(f"admin:{password}".encode()).decode()
    async with aiohttp.ClientSession(headers={"Authorization": f"Basic {token}"}) as http:
        async with http.post(stack.url(local_stack.GATEWAY_PORT, "/async-function/echo")) as r:
            assert r.status == 202
            call_id = (await r.json())["callId"]

        async def succeeded() -> bool:
            url = stack.url(local_stack.GATEWAY_PORT, f"/system/activations/{call_id}")
            async with http.get(url) as response:
                return response.status == 200 and (await response.json())["status"] == "succeeded"

        await wait_until(succeeded, WAIT_S, f"call {call_id} on the stack at +{stack.offset}")


async def test_two_stacks_run_side_by_side_and_never_share_a_data_directory(tmp_path, stacks):
    first = await stacks(tmp_path / "a", free_offset())
    await first.up()
    second = await stacks(tmp_path / "b", free_offset({first.offset}))
    await second.up()
    await asyncio.gather(async_call_succeeds(first), async_call_succeeds(second))

    # A third on the first one's data directory (on free ports) is refused before it starts
    # anything, saying which stack holds it and what to do.
    third = await stacks(tmp_path / "a", free_offset({first.offset, second.offset}))
    assert await third.exited() == 1
    assert third.text.startswith(
        f"cannot start: {tmp_path / 'a'} is in use by another stack "
        f"(pid {first.process.pid}, port offset {first.offset})"
    ), third.text
    assert "--data-dir" in third.text and "nats" not in third.text

    await asyncio.gather(async_call_succeeds(first), async_call_succeeds(second))
    assert await first.stop() == 0
    assert await second.stop() == 0
    assert "exited with" not in first.text + second.text


async def test_a_gateway_or_worker_that_dies_comes_back_and_nats_that_cannot_stops_the_stack(
    tmp_path, stacks
):
    stack = await (await stacks(tmp_path / "data", free_offset())).up()
    services = (("worker", local_stack.WORKER_PORT), ("gateway", local_stack.GATEWAY_PORT))
    for service, port in services:
        dead = stack.pid(service)
        os.kill(dead, signal.SIGKILL)
        await stack.wait_for(
            rf"^{service} exited with -9 after [\d.]+s; starting it again in 1s$",
            f"the {service}'s restart to be announced",
        )
        await stack.wait_for(rf"^started {service} again \(pid \d+\)$", f"the {service} again")
        assert stack.pid(service) != dead
        healthz = stack.url(port, "/healthz")
        await wait_until(lambda url=healthz: status_is_ok(url), WAIT_S, f"the {service} healthy")
    await async_call_succeeds(stack)

    # nats-server that cannot start again (its config broken) stops the stack, in order.
    (tmp_path / "data" / "nats-server.conf").write_text("not a config {\n")
    os.kill(stack.pid("nats"), signal.SIGKILL)
    assert await stack.exited() == 1
    tail = stack.text[stack.text.index("nats exited with -9") :]
    assert len(re.findall(r"^nats exited with 1 after [\d.]+s; starting it", tail, re.M)) == 2
    assert "nats-server cannot be started again (3 tries" in tail
    assert re.search(r"^stopping: waiting up to [\d.]+s for the gateway", tail, re.M)
    assert tail.rstrip().endswith("stopped")


async def status_is_ok(url: str) -> bool:
    return await status_of(url) == 200


async def test_a_stop_waits_for_the_gateways_grace_and_a_second_ctrl_c_stops_at_once(
    tmp_path, stacks
):
    """The gateway may take its shutdown_grace for running calls, sync and turned async; the
    stack waits that long and a margin (the 40 s it waited before cut a 60 s grace short),
    says so, and stops at once on a second Ctrl-C, saying what that costs."""
    stack = await (await stacks(tmp_path / "data", free_offset(), shutdown_grace="45s")).up()
    async with aiohttp.ClientSession() as http:
        sync = asyncio.create_task(
            http.get(stack.url(local_stack.GATEWAY_PORT, "/function/sleep?seconds=600"))
        )
        await stack.wait_for(r"^sleep\s+\| sleeping 600s$", "the sync call to start")
        assert stack.process is not None
        stack.process.send_signal(signal.SIGINT)
        await stack.wait_for(
            r"^stopping: waiting up to 55s for the gateway \(shutdown_grace 45s for running "
            r"calls, sync and turned async\) and up to 55s for the "
            r"worker \(shutdown_grace 45s for running calls\); Ctrl-C again stops at once$",
            "what the stop waits for",
        )
        await stack.wait_for(r"^worker\s+\| .*stopped: 0 calls complete", "the worker to stop")
        assert stack.process.returncode is None, "the stack did not wait for the gateway"
        assert not sync.done()
        stack.process.send_signal(signal.SIGINT)
        await stack.wait_for(r"^stopping now: sync calls still running are cut off", "the cost")
        # Well inside the gateway's 55 s: the second Ctrl-C did not wait for it.
        await asyncio.wait_for(stack.exited(), 30)
        with pytest.raises(aiohttp.ClientError):
            await sync
    assert stack.text.rstrip().endswith("stopped")


def test_the_stop_timeouts_follow_the_processes_settings(monkeypatch):
    monkeypatch.setenv("shutdown_grace", "100s")
    gateway_s, gateway_drains = local_stack.gateway_stop_timeout_s()
    worker_s, _ = local_stack.worker_stop_timeout_s()
    assert gateway_s > 100 and worker_s > 100
    assert "shutdown_grace 100s" in gateway_drains
    monkeypatch.setenv("shutdown_grace", "not a duration")  # the process stops at start
    assert local_stack.gateway_stop_timeout_s()[0] > 60


async def test_the_sample_sleep_function_ends_its_sleeps_on_sigterm():
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(ROOT / "deploy" / "sample_functions.py"),
        "sleep",
        "--port",
        str(port),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert process.stdout is not None
    try:
        assert b"listening" in await asyncio.wait_for(process.stdout.readline(), WAIT_S)
        async with aiohttp.ClientSession() as http:
            call = asyncio.create_task(http.get(f"http://127.0.0.1:{port}/?seconds=600"))
            line = await asyncio.wait_for(process.stdout.readline(), WAIT_S)
            assert line == b"sleeping 600s\n"
            process.send_signal(signal.SIGTERM)
            # Long before the 600 s: the sleep ends with the stop.
            response = await asyncio.wait_for(call, WAIT_S)
            body = await response.json()
        assert response.status == 503
        assert body["error"].startswith("stopping: slept ")
        assert 0 <= body["slept"] < 600
        assert await asyncio.wait_for(process.wait(), WAIT_S) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


def test_the_install_shows_progress_and_the_license_is_an_spdx_expression():
    run = subprocess.run(
        ["make", "-n", "--no-print-directory", "-W", "pyproject.toml", "install"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    [install] = [line for line in run.stdout.splitlines() if "pip install" in line and "-e" in line]
    assert "--quiet" not in install and "-q " not in install
    assert any(line.startswith("echo ") for line in run.stdout.splitlines())
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["license"] == "MIT"  # not the deprecated {text = ...}
    [setuptools] = [r for r in pyproject["build-system"]["requires"] if "setuptools" in r]
    assert setuptools == "setuptools>=77"  # the first that reads an SPDX project.license
