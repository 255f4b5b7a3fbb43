"""gateway/openapi.json: valid OpenAPI 3.1, in step with the router, served as shipped, and true
of a live local stack, as schemathesis checks it (tests/schemathesis.toml says which checks)."""

import json
import re
import signal
import subprocess
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
from tests.harness import ROOT

DOCUMENT = ROOT / "gateway" / "openapi.json"
API_CHECK = ROOT / "deploy" / "api_check.py"  # make api-check
HTTP_METHODS = frozenset({"get", "put", "post", "delete", "options", "head", "patch", "trace"})


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
            if path.startswith("/system/"):
                assert operation["security"] == [{"basicAuth": []}], (path, method)
            elif path in ("/healthz", "/metrics", "/openapi.json"):
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


@pytest.mark.timeout(300)
def test_schemathesis_finds_no_5xx_and_no_response_the_document_does_not_allow(
    tmp_path: Path,
):
    """`make api-check` (deploy/api_check.py), as the development guide shows it: every
    documented operation, generated cases (tests/schemathesis.toml: deterministic, at most 10
    per operation), against the stack `make run` starts, on free ports with a data directory
    of its own, basic auth on /system/* included: schemathesis sends the stack's credentials,
    and checks that a request without them (or with wrong ones) gets 401. The document is
    loaded from the gateway's own /openapi.json, which must be the file in the repo.

    Invocations reach the stack's real sample functions (the generated function name's
    example is `echo`), and the functions schemathesis deploys point at echo too
    (tests/schemathesis_hooks.py). None of them can answer 5xx to what is generated here (no
    query parameter of theirs is documented, so `status?code=500` is never asked for), so a
    5xx, 502 and 504 included, is the gateway's own and fails the run.

    It leaves nothing behind: the stack is stopped, its data directory removed, and what
    schemathesis keeps between runs is not written where it was started.
    """
    run = subprocess.Popen(
        [sys.executable, str(API_CHECK), "--no-color"],  # --no-color: schemathesis's, passed on
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        output, _ = run.communicate(timeout=270)
    except subprocess.TimeoutExpired:
        run.send_signal(signal.SIGTERM)  # it stops its stack on the way out
        run.communicate(timeout=100)
        raise
    report = output.decode(errors="replace")
    assert run.returncode == 0, f"schemathesis found problems:\n{report[-12000:]}"
    assert re.search(r"Tested: [1-9]", report), report[-4000:]
    workdir = re.search(r"data in (\S+)", report)
    assert workdir is not None, report[:2000]
    assert f"stack stopped, {workdir[1]} removed" in report
    assert not Path(workdir[1]).exists()
    assert list(tmp_path.iterdir()) == []
