from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator

from faas_gateway.runtime.settings import CommonSettings, Seconds, setting


class GatewaySettings(CommonSettings):
    gateway_host: str = setting("127.0.0.1", "gateway_host", "Address the gateway listens on.")
    gateway_port: int = setting(8080, "gateway_port", "Port the gateway listens on.")
    gateway_workers: int = setting(
        1,
        "gateway_workers",
        "Gateway processes sharing the port (SO_REUSEPORT); 0: one per CPU core.",
    )
    invocation_server: Literal["httptools", "aiohttp"] = setting(
        "httptools",
        "invocation_server",
        "What serves invocations: httptools, a lean HTTP/1.1 server in front of aiohttp's "
        "on the same port that takes sync calls, async POSTs and trigger fires with a body of "
        "known length up to 64 KiB and hands every other request (and the rest of its "
        "connection) to aiohttp; or aiohttp for everything.",
    )
    read_timeout_s: Seconds = setting(
        60.0, "read_timeout", "Sync calls: longest wait for the next bytes from a function."
    )
    write_timeout_s: Seconds = setting(
        60.0, "write_timeout", "Sync calls: longest wait to connect to a function."
    )
    upstream_timeout_s: Seconds = setting(
        60.0,
        "upstream_timeout",
        "Sync calls: limit on a whole call, response body included, unless the function "
        "sets its own exec_timeout.",
    )
    request_body_timeout_s: Annotated[Seconds, Field(gt=0)] = setting(
        60.0,
        "request_body_timeout",
        "Longest wait for the next bytes of a request body, then 408; a wait between bytes, "
        "so an upload that keeps moving is never cut, however long it takes.",
    )
    max_async_body_bytes: int | None = setting(
        None,
        "max_async_body_bytes",
        "Largest async request body; larger gets 413. Default: the NATS server's max_payload "
        "minus 64 KiB for the envelope (983,040 bytes with NATS defaults).",
    )
    publish_timeout_s: Seconds = setting(
        5.0, "publish_timeout", "Async calls: longest wait for JetStream's publish ack (then 503)."
    )
    nats_startup_wait_s: Seconds = setting(
        3.0,
        "nats_startup_wait",
        "How long start-up waits for NATS before serving sync calls without it (it keeps "
        "trying in the background).",
    )
    shutdown_grace_s: Seconds = setting(
        60.0,
        "shutdown_grace",
        "On SIGTERM/SIGINT, how long running calls (sync, and those that turned async) may finish.",
    )
    max_wait_s: Seconds = setting(
        60.0,
        "max_wait",
        "Cap on the wait a client asks for with Prefer: wait=N (async and sync calls).",
    )
    sync_async_after_s: Seconds = setting(
        0.0,
        "sync_async_after",
        "Every sync call the function has not answered after this long turns async (202 "
        "and an activation record); 0: off.",
    )
    function_url_template: str = setting(
        "",
        "function_url_template",
        "The URL of a function deployed without one (faas-cli sends an image, not a URL), "
        "e.g. http://{name}:8080 where function containers are reached by service name; "
        "{name} and {namespace} are filled in. Empty: a deployment needs a url or the "
        "annotation com.openfaas.url.",
    )
    max_turned_async: int = setting(
        1000,
        "max_turned_async",
        "Sync calls that turned async and still run, per gateway process, at most; a sync "
        "call that could turn async beyond it gets 429 before it is sent.",
    )
    openwhisk_namespace: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_@.-]{0,255}$")] = (
        setting(
            "guest",
            "openwhisk_namespace",
            "The one namespace of the OpenWhisk API (/api/v1); its paths take it or _.",
        )
    )
    basic_auth: bool = setting(
        False,
        "basic_auth",
        "HTTP Basic auth on every /system/* route (as OpenFaaS) and on the OpenWhisk API "
        "(/api/v1, whose API key is user:password).",
    )
    basic_auth_invocations: bool = setting(
        False,
        "basic_auth_invocations",
        "With basic_auth, also require it on /function/* and /async-function/*.",
    )
    secret_mount_path: Path = setting(
        Path("/run/secrets"),
        "secret_mount_path",
        "Directory holding the files basic-auth-user and basic-auth-password.",
    )
    basic_auth_user: str = setting(
        "", "basic_auth_user", "Basic auth user when secret_mount_path has no credential files."
    )
    basic_auth_password: str = setting(
        "",
        "basic_auth_password",
        "Basic auth password when secret_mount_path has no credential files (local use).",
    )

    @field_validator("function_url_template")
    @classmethod
    def _template_fills_in(cls, template: str) -> str:
        # A typo such as {nme} is found at start-up, not as a 500 on the first deploy.
        try:
            template.format(name="f", namespace="n")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"only {{name}} and {{namespace}} can be filled in: {exc}") from exc
        return template
