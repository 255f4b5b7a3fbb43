"""Basic auth as in OpenFaaS: /system/* behind it when basic_auth=true, the invocation routes
too with basic_auth_invocations=true, credentials from secret files or settings."""

import base64
from pathlib import Path

import aiohttp
import pytest

from gateway.app import create_app
from gateway.auth import AuthSetupError, Credentials
from tests.conftest import StartGateway, StartRecorder, gateway_settings, ready_gateway
from tests.harness import registry_of

SYSTEM_ROUTES = [
    ("GET", "/system/functions"),
    ("POST", "/system/functions"),
    ("PUT", "/system/functions"),
    ("DELETE", "/system/functions"),
    ("GET", "/system/function/echo"),
    ("GET", "/system/info"),
    ("GET", "/system/namespaces"),
    ("GET", "/system/activations"),
    ("GET", "/system/activations/abc"),
    ("GET", "/system/activations/abc/result"),
    ("POST", "/system/activations/abc/retry"),
    ("GET", "/system/dead-letters"),
]


def secrets_in(directory: Path, user: str, password: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "basic-auth-user").write_text(user + "\n")
    (directory / "basic-auth-password").write_text(password + "\n")
    return directory


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


async def status_of(
    http: aiohttp.ClientSession, method: str, url: str, auth: dict[str, str] | None = None
) -> tuple[int, str | None]:
    async with http.request(method, url, headers=auth) as response:
        if response.status == 401:
            assert (await response.json())["error"] == "authentication required"
        return response.status, response.headers.get("WWW-Authenticate")


async def test_every_system_route_needs_the_credentials_from_the_secret_files(
    start_gateway: StartGateway,
    recorder: StartRecorder,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    function = await recorder()
    secrets = secrets_in(tmp_path / "secrets", "admin", "s3cret")
    gateway = await ready_gateway(
        start_gateway,
        http,
        registry_of(echo=function.url),
        basic_auth=True,
        secret_mount_path=secrets,
    )
    good = basic("admin", "s3cret")
    for method, path in SYSTEM_ROUTES:
        status, challenge = await status_of(http, method, gateway.url(path))
        assert (status, challenge) == (401, 'Basic realm="Restricted"'), (method, path)
        status, _ = await status_of(http, method, gateway.url(path), basic("admin", "x"))
        assert status == 401, (method, path)
        status, _ = await status_of(http, method, gateway.url(path), good)
        assert status != 401, (method, path)
    for method, path in [("GET", "/healthz"), ("GET", "/metrics"), ("POST", "/function/echo")]:
        status, _ = await status_of(http, method, gateway.url(path))
        assert status == 200, path
    status, _ = await status_of(http, "POST", gateway.url("/async-function/echo"))
    assert status == 202


async def test_invocations_need_auth_when_asked_and_env_credentials_work(
    start_gateway: StartGateway,
    recorder: StartRecorder,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    function = await recorder()
    gateway = await ready_gateway(
        start_gateway,
        http,
        registry_of(echo=function.url),
        basic_auth=True,
        basic_auth_invocations=True,
        secret_mount_path=tmp_path / "none-here",
        basic_auth_user="local",
        basic_auth_password="pw",
    )
    good = basic("local", "pw")
    for method, path in [
        ("POST", "/function/echo"),
        ("POST", "/async-function/echo"),
        ("DELETE", "/async-function/some-call"),
    ]:
        status, challenge = await status_of(http, method, gateway.url(path))
        assert (status, challenge) == (401, 'Basic realm="Restricted"'), path
        status, _ = await status_of(http, method, gateway.url(path), good)
        assert status in (200, 202, 404), path
    assert len(function.requests) == 1  # only the authenticated sync call reached it
    status, _ = await status_of(http, "GET", gateway.url("/healthz"))
    assert status == 200


def test_basic_auth_without_credentials_stops_start_up(tmp_path: Path) -> None:
    settings = gateway_settings(
        "nats://127.0.0.1:1", basic_auth=True, secret_mount_path=tmp_path / "empty"
    )
    with pytest.raises(AuthSetupError, match="basic-auth-user"):
        create_app(settings, registry_of())
    half = tmp_path / "half"
    half.mkdir()
    (half / "basic-auth-user").write_text("admin")
    settings = gateway_settings("nats://127.0.0.1:1", basic_auth=True, secret_mount_path=half)
    with pytest.raises(AuthSetupError, match="basic-auth-password"):
        create_app(settings, registry_of())


@pytest.mark.parametrize(
    ("header", "accepted"),
    [
        ("Basic " + base64.b64encode(b"admin:s3cret").decode(), True),
        ("basic " + base64.b64encode(b"admin:s3cret").decode(), True),
        ("Basic " + base64.b64encode(b"admin:s3cret ").decode(), False),
        ("Basic " + base64.b64encode(b"admin:").decode(), False),
        ("Basic " + base64.b64encode(b"admin").decode(), False),
        ("Basic " + base64.b64encode(b":s3cret").decode(), False),
        ("Basic " + base64.b64encode(b"Admin:s3cret").decode(), False),
        ("Basic not-base64!", False),
        ("Bearer " + base64.b64encode(b"admin:s3cret").decode(), False),
        ("", False),
        (None, False),
    ],
)
def test_credentials_accept_only_the_exact_pair(header: str | None, accepted: bool) -> None:
    assert Credentials(b"admin", b"s3cret").accept(header) is accepted
