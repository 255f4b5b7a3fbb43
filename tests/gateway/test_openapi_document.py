"""gateway/openapi.json: valid OpenAPI 3.1, in step with the router (every route documented,
every documented path routed), and served as shipped in the package."""

import json
import re
import tomllib
from typing import Any

import aiohttp
from openapi_spec_validator import OpenAPIV31SpecValidator, validate

from faas_gateway.core.functions import Registry
from gateway.app import create_app
from gateway.handlers.system import document_bytes
from gateway.settings import GatewaySettings
from tests.harness import ROOT

DOCUMENT = ROOT / "gateway" / "openapi.json"
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
