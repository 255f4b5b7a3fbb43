"""gateway/openapi.json: valid OpenAPI 3.1, in step with the router, served as shipped, and true
of a live local stack, as schemathesis checks it (tests/schemathesis.toml says which checks)."""

import asyncio
import contextlib
import json
import random
import re
import signal
import socket
import sys
import tomllib
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from openapi_spec_validator import OpenAPIV31SpecValidator, validate

from faas_gateway.core.functions import Registry
from gateway.app import create_app
from gateway.handlers.system import document_bytes
from gateway.settings import GatewaySettings
from tests.harness import ROOT, subprocess_env, wait_until

DOCUMENT = ROOT / "gateway" / "openapi.json"
SCHEMATHESIS_CONFIG = ROOT / "tests" / "schemathesis.toml"
SCHEMATHESIS_HOOKS = ROOT / "tests" / "schemathesis_hooks.py"
HTTP_METHODS = frozenset({"get", "put", "post", "delete", "options", "head", "patch", "trace"})
# local_stack.py's default ports; the stack under test shifts them all by one offset.
STACK_PORTS = (4222, 8080, 8081, 9001, 9002, 9003)
GATEWAY_PORT = 8080
ECHO_PORT = 9001


def load_document() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(DOCUMENT.read_text())
    return document


def template(path: str) -> str:
    """/async-function/{name} and /async-function/{call_id} are one path to OpenAPI."""
    return re.sub(r"\{[^}]*\}", "{}", path)


def documented_operations() -> dict[str, set[str]]:
    operations: dict[str, set[str]] = {}
    for path, item in load_document()["paths"].items():
        methods = {method.upper() for method in item if method in HTTP_METHODS}
        operations.setdefault(template(path), set()).update(methods)
    return operations


def routed_operations() -> dict[str, set[str]]:
    app = create_app(GatewaySettings(), Registry({}))
    routes: dict[str, set[str]] = {}
    for route in app.router.routes():
        path = route.resource.canonical if route.resource is not None else ""
        if path == "/{tail}":  # the catch-all: a JSON 404 for any path not routed
            continue
        routes.setdefault(template(path), set()).add(route.method)
    return routes


def test_document_is_valid_openapi_3_1():
    document = load_document()

    validate(document, cls=OpenAPIV31SpecValidator)
    assert document["openapi"].startswith("3.1.")


def test_every_route_is_documented_and_every_documented_path_is_routed():
    documented, routed = documented_operations(), routed_operations()

    assert sorted(documented) == sorted(routed)
    for path, methods in routed.items():
        # A "*" route takes every method and answers the ones it does not serve with 405;
        # the document must list at least one. A route for one method must be documented
        # with that method, and the document must list no method that is not routed.
        explicit = methods - {"*"}
        assert explicit <= documented[path], f"{path}: {explicit - documented[path]} undocumented"
        if "*" not in methods:
            assert documented[path] <= explicit, f"{path}: {documented[path]} not routed"
        assert documented[path], f"{path}: no operation documented"


def test_system_routes_name_basic_auth_and_health_metrics_and_document_need_none():
    document = load_document()
    assert document["components"]["securitySchemes"]["basicAuth"] == {
        "type": "http",
        "scheme": "basic",
    }
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if method not in HTTP_METHODS:
                continue
            if path.startswith(("/system/", "/api/v1/")):  # OpenWhisk's API key: the same
                assert operation["security"] == [{"basicAuth": []}], (path, method)
            elif path in ("/healthz", "/metrics", "/openapi.json", "/api/v1"):
                assert operation["security"] == [], (path, method)
            else:  # invocations: open, or basic auth with basic_auth_invocations
                assert operation["security"] == [{}, {"basicAuth": []}], (path, method)


async def test_the_route_serves_the_file_as_shipped_in_the_package(
    start_gateway: Any, http: aiohttp.ClientSession
) -> None:
    gateway = await start_gateway(Registry())

    async with http.get(gateway.url("/openapi.json")) as response:
        assert response.content_type == "application/json"
        assert await response.read() == DOCUMENT.read_bytes() == document_bytes()
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "openapi.json" in package_data["package-data"]["gateway"]


def ports_free(offset: int) -> bool:
    for port in STACK_PORTS:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind(("127.0.0.1", port + offset))
            except OSError:
                return False
    return True


def free_offset() -> int:
    """A shift of the stack's ports at which all of them are free (9003 + offset < 65536)."""
    chooser = random.Random()
    for _ in range(200):
        offset = chooser.randrange(10_000, 56_000)
        if ports_free(offset):
            return offset
    raise AssertionError("no free set of ports for the stack")


class LocalStack:
    """deploy/local_stack.py (`make run`) on shifted ports with its own data directory."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.log_path = data_dir / "stack.log"
        self.process: asyncio.subprocess.Process | None = None
        self.offset = 0

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{GATEWAY_PORT + self.offset}"

    def credentials(self) -> str:
        """user:password for /system/*, as the stack made them on its first start."""
        secrets = self.data_dir / f"data-{self.offset}" / "secrets"
        user = (secrets / "basic-auth-user").read_text().strip()
        return f"{user}:{(secrets / 'basic-auth-password').read_text().strip()}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    async def start(self, http: aiohttp.ClientSession) -> None:
        # Another test or stack may take a port between the probe and the bind: try again.
        for _ in range(3):
            self.offset = free_offset()
            if await self._try_start():
                break
        else:
            raise AssertionError(f"the local stack did not start:\n{self.log()[-4000:]}")

        async def healthy() -> bool:
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(f"{self.gateway_url}/healthz") as response:
                    return response.status == 200
            return False

        await wait_until(healthy, 30.0, "the stack's gateway to reach NATS", interval_s=0.1)

    async def _try_start(self) -> bool:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable,
                str(ROOT / "deploy" / "local_stack.py"),
                "--port-offset",
                str(self.offset),
                "--data-dir",
                str(self.data_dir / f"data-{self.offset}"),
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                env=subprocess_env(
                    # Callbacks only to a name on this machine: a generated X-Callback-Url to
                    # any other host is a 400 at once, with no DNS lookup and nothing sent.
                    callback_allowed_hosts="localhost",
                    callback_max_attempts="1",
                    # Prefer: wait=N waits at most this long: a generated call to a function
                    # deployed with a queue no worker serves would otherwise hold for a minute.
                    max_wait="2s",
                    shutdown_grace="5s",
                ),
            )
        process = self.process

        def up_or_exited() -> bool:
            return "stack is up" in self.log() or process.returncode is not None

        await wait_until(up_or_exited, 60.0, "the local stack to start", interval_s=0.1)
        if process.returncode is not None:
            await process.wait()
            return False
        return True

    async def stop(self) -> None:
        process = self.process
        if process is None or process.returncode is not None:
            return
        process.send_signal(signal.SIGTERM)  # it stops its processes in order
        try:
            await asyncio.wait_for(process.wait(), 90)
        except TimeoutError:
            process.kill()
            await process.wait()


@pytest.mark.timeout(300)
async def test_schemathesis_finds_no_5xx_and_no_response_the_document_does_not_allow(
    tmp_path: Path, http: aiohttp.ClientSession
):
    """Every documented operation, generated cases (tests/schemathesis.toml: deterministic,
    at most 10 per operation), against the stack `make run` starts, basic auth on /system/*
    included: schemathesis sends the stack's credentials, and checks that a request without
    them (or with wrong ones) gets 401. The document is loaded from the gateway's own
    /openapi.json.

    Invocations reach the stack's real sample functions (the generated function name's
    example is `echo`), and the functions schemathesis deploys point at echo too
    (tests/schemathesis_hooks.py). None of them can answer 5xx to what is generated here (no
    query parameter of theirs is documented, so `status?code=500` is never asked for), so a
    5xx, 502 and 504 included, is the gateway's own and fails the run.
    """
    stack = LocalStack(tmp_path / "stack")
    try:
        await stack.start(http)
        async with http.get(f"{stack.gateway_url}/openapi.json") as response:
            assert response.status == 200
            assert await response.read() == DOCUMENT.read_bytes()
        argv = [
            sys.executable,
            "-m",
            "schemathesis.cli",
            "--config-file",
            str(SCHEMATHESIS_CONFIG),
            "run",
            f"{stack.gateway_url}/openapi.json",
            "--auth",
            stack.credentials(),
            "--no-color",
        ]
        run = await asyncio.create_subprocess_exec(
            *argv,
            cwd=tmp_path,
            env=subprocess_env(
                SCHEMATHESIS_HOOKS=str(SCHEMATHESIS_HOOKS),
                FAAS_TEST_FUNCTION_URL=f"http://127.0.0.1:{ECHO_PORT + stack.offset}",
            ),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            output, _ = await asyncio.wait_for(run.communicate(), 240)
        except TimeoutError:
            run.kill()
            await run.wait()
            raise
        report = output.decode(errors="replace")
        assert run.returncode == 0, f"schemathesis found problems:\n{report[-12000:]}"
        assert re.search(r"Tested: [1-9]", report), report[-4000:]
    finally:
        await stack.stop()
