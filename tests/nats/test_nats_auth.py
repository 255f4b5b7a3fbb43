"""NATS with credentials: the stack's nats-server (users gateway and worker with the
permissions faas_gateway.nats.auth derives from the settings) refuses anonymous clients, lets
the gateway and worker do all they do and nothing they should not; and every way of signing
in (user/password, token, NKey seed, .creds file, TLS with client certificates) against a
real nats-server configured for it."""

import asyncio
import base64
import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import nkeys
import pytest
import trustme
from aiohttp import web
from nats.aio.client import Client as NatsClient
from nats.js.errors import NoKeysError
from pydantic import ValidationError

from faas_gateway.nats.auth import (
    EVENTS_USER,
    GATEWAY_USER,
    WORKER_USER,
    NatsCredentialsError,
    StackFiles,
    client_env,
    connect_options,
    redact_url,
    write_stack_files,
)
from faas_gateway.nats.jetstream import key_value
from faas_gateway.nats.link import connect
from faas_gateway.nats.provision import Plan, ensure_all
from faas_gateway.runtime.settings import CommonSettings
from queue_worker.consumer import ensure_consumer
from queue_worker.settings import WorkerSettings
from tests.conftest import RunningGateway, StartGateway, StartRecorder, StartWorker, ready_gateway
from tests.harness import (
    Gate,
    NatsServer,
    RecordedRequest,
    Recorder,
    connect_once,
    final_record,
    get_json,
    post_async,
    registry_of,
    subprocess_env,
    wait_until,
)

DEADLINE_S = 30.0
LARGE_RESULT = bytes(range(256)) * 2600  # 650 KiB: past the inline limit, into the object store


@pytest.fixture
def stack_files(tmp_path: Path) -> StackFiles:
    """What deploy/local_stack.py writes: passwords and the nats-server config."""
    return write_stack_files(CommonSettings(), tmp_path / "secrets", tmp_path / "nats.conf")


@pytest.fixture
async def nats_server(tmp_path: Path, stack_files: StackFiles) -> AsyncIterator[NatsServer]:
    """The stack's nats-server, in place of conftest's open one, for start_gateway and
    start_worker too."""
    server = NatsServer(tmp_path / "nats-store", config_file=stack_files.config)
    await server.start()
    yield server
    server.kill()


def as_user(files: StackFiles, user: str) -> dict[str, Any]:
    return dict(client_env(user, files.password_files[user]))


def violations(server: NatsServer) -> list[str]:
    return [line for line in server.log_path.read_text().splitlines() if "Violation" in line]


async def connect_as(
    server: NatsServer, files: StackFiles, user: str
) -> tuple[NatsClient, CommonSettings]:
    settings = WorkerSettings(nats_url=server.url, **as_user(files, user))
    return await connect(settings, f"test-{user}"), settings


# the stack's server


async def test_the_stacks_nats_server_refuses_clients_without_valid_credentials(
    nats_server: NatsServer, stack_files: StackFiles
) -> None:
    assert "Authorization Violation" in await connect_once(nats_server.url)
    assert "Authorization Violation" in await connect_once(
        nats_server.url, user=GATEWAY_USER, password="not-the-password"
    )
    # With the password the stack made, the same user gets in.
    password = stack_files.password_files[GATEWAY_USER].read_text().strip()
    assert await connect_once(nats_server.url, user=GATEWAY_USER, password=password) == ""
    for path in [stack_files.config, *stack_files.password_files.values()]:
        assert path.stat().st_mode & 0o777 == 0o600, path


async def test_a_gateway_without_credentials_says_so_and_is_not_ready(
    nats_server: NatsServer,
    start_gateway: StartGateway,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="faas.nats")
    gateway = await start_gateway(registry_of(), nats_startup_wait_s=0.1)

    def refusal_logged() -> bool:
        return any("refused the credentials" in r.getMessage() for r in caplog.records)

    await wait_until(refusal_logged, DEADLINE_S, "the refusal in the log")
    status, health = await get_json(http, gateway.url("/healthz"))
    assert status == 503
    assert health["nats"] == "disconnected"


class CancelOnRefusal(logging.Handler):
    """Cancels ``task`` as the refusal is logged: inside nats-py's connect loop, just
    before it closes the refused connection, the moment a stopping process may pick."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.task: asyncio.Task[NatsClient] | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.task is not None and "refused the credentials" in record.getMessage():
            self.task.cancel()


async def test_a_connect_given_up_while_nats_refuses_ends_and_leaves_no_socket_open(
    nats_server: NatsServer,
) -> None:
    handler = CancelOnRefusal()
    logger = logging.getLogger("faas.nats")
    logger.addHandler(handler)
    try:
        settings = CommonSettings(nats_url=nats_server.url, nats_reconnect_wait_s=0.1)
        handler.task = asyncio.create_task(connect(settings, "test"))
        done, _ = await asyncio.wait({handler.task}, timeout=DEADLINE_S)
        assert handler.task in done, "the cancelled connect went on retrying"
        assert handler.task.cancelled()
    finally:
        logger.removeHandler(handler)
    # An open socket would fail this test at teardown (ResourceWarning, as an error).


async def echo(request: web.Request, recorded: RecordedRequest) -> web.Response:
    return web.Response(body=recorded.body, content_type="text/plain")


async def large(request: web.Request, recorded: RecordedRequest) -> web.Response:
    return web.Response(body=LARGE_RESULT, content_type="application/octet-stream")


async def broken(request: web.Request, recorded: RecordedRequest) -> web.Response:
    return web.Response(status=500, body=b"broken")


async def test_gateway_and_worker_signed_in_as_their_users_do_all_they_do(
    nats_server: NatsServer,
    stack_files: StackFiles,
    start_gateway: StartGateway,
    start_worker: StartWorker,
    recorder: StartRecorder,
    http: aiohttp.ClientSession,
) -> None:
    gate = Gate()
    echo_function = await recorder(echo)
    registry = registry_of(
        echo=echo_function.url,
        large=(await recorder(large)).url,
        held=(await recorder(gate)).url,
        broken=(await recorder(broken)).url,
    )
    callbacks = await recorder()
    gateway = await ready_gateway(
        start_gateway, http, registry, **as_user(stack_files, GATEWAY_USER)
    )
    await start_worker(registry, **as_user(stack_files, WORKER_USER))

    # An async call with a callback.
    called_back = await post_async(
        http,
        gateway,
        "/async-function/echo",
        data=b"hello",
        headers={"X-Callback-Url": callbacks.url},
    )
    [callback] = await callbacks.wait_for_requests(1, DEADLINE_S)
    assert callback.headers["X-Call-Id"] == called_back
    assert callback.body == b"hello"

    # A result too large for the record goes to the object store and comes back from it.
    large_call = await post_async(http, gateway, "/async-function/large")
    record = await final_record(http, gateway, large_call)
    assert record["response"]["storedIn"] == "objectStore"
    async with http.get(gateway.url(f"/system/activations/{large_call}/result")) as response:
        assert response.status == 200
        assert await response.read() == LARGE_RESULT

    # Waiting for a result watches the record's subject.
    async with http.post(
        gateway.url("/async-function/echo"), data=b"waited", headers={"Prefer": "wait=20"}
    ) as response:
        assert response.status == 200
        assert await response.read() == b"waited"

    # A function deployed through the API reaches the worker, which calls it.
    async with http.post(
        gateway.url("/system/functions"),
        json={"service": "deployed", "image": "example/deployed:1", "url": echo_function.url},
    ) as response:
        assert response.status == 202, await response.text()
    deployed_call = await post_async(http, gateway, "/async-function/deployed", data=b"new")
    assert (await final_record(http, gateway, deployed_call))["status"] == "succeeded"
    assert echo_function.requests[-1].body == b"new"

    # A running call is cancelled: the gateway writes the cancellation, the worker stops it.
    running = await post_async(http, gateway, "/async-function/held")
    await asyncio.wait_for(gate.entered.wait(), DEADLINE_S)
    async with http.delete(gateway.url(f"/async-function/{running}")) as response:
        assert response.status == 202, await response.text()
    assert (await final_record(http, gateway, running))["status"] == "cancelled"

    # A failed call leaves a dead letter (the worker's) that the gateway lists and queues again.
    failed = await post_async(http, gateway, "/async-function/broken")
    assert (await final_record(http, gateway, failed))["status"] == "failed"
    status, letters = await get_json(http, gateway.url("/system/dead-letters"))
    assert status == 200
    assert [letter["callId"] for letter in letters] == [failed]
    async with http.post(gateway.url(f"/system/activations/{failed}/retry")) as response:
        assert response.status == 202, await response.text()
        again = (await response.json())["callId"]
    assert (await final_record(http, gateway, again))["retryOf"] == failed

    status, listing = await get_json(http, gateway.url("/system/activations?limit=100"))
    assert status == 200
    listed = {record["callId"] for record in listing}
    assert {called_back, large_call, deployed_call, running, failed, again} <= listed
    gate.opened.set()

    # Events: a trigger and its rule (the buckets and their watches), fired (the fire stream
    # and the fan-out's consumer), its activation read back.
    await whisk(http, gateway, "PUT", "triggers/t", {})
    await whisk(http, gateway, "PUT", "rules/r", {"trigger": "t", "action": "echo"})
    fired = await whisk(http, gateway, "POST", "triggers/t", {"via": "fire"})
    await wait_until(lambda: echoed(echo_function, "fire"), DEADLINE_S, "the fired rule")
    await wait_until(
        lambda: ended(http, gateway, fired["activationId"]), DEADLINE_S, "the trigger's record"
    )
    # A NATS subject feed, fed by a system signed in as the user events (the gateway's
    # subscription in the queue group), and an alarm (the scheduler's deduplicated publish).
    await whisk(
        http,
        gateway,
        "POST",
        "whisk.system/actions/nats/subject?blocking=true",
        {"lifecycleEvent": "CREATE", "triggerName": "/_/t", "subject": "events.auth"},
    )
    publisher, _ = await connect_as(nats_server, stack_files, EVENTS_USER)
    try:

        async def fed() -> bool:
            await publisher.publish("events.auth", b'{"via": "subject"}')
            return echoed(echo_function, "subject")

        await wait_until(fed, DEADLINE_S, "the subject feed", 0.2)
    finally:
        await publisher.close()
    await whisk(http, gateway, "PUT", "triggers/a", {})
    await whisk(http, gateway, "PUT", "rules/ra", {"trigger": "a", "action": "echo"})
    await whisk(
        http,
        gateway,
        "POST",
        "whisk.system/actions/alarms/alarm?blocking=true",
        {
            "lifecycleEvent": "CREATE",
            "triggerName": "/_/a",
            "cron": "* * * * * *",
            "trigger_payload": {"via": "alarm"},
        },
    )
    await wait_until(lambda: echoed(echo_function, "alarm"), DEADLINE_S, "the alarm")

    # Not one subject either process used was outside its permissions.
    assert violations(nats_server) == []


async def whisk(
    http: aiohttp.ClientSession, gateway: RunningGateway, method: str, path: str, body: Any
) -> Any:
    namespace = "whisk.system" if path.startswith("whisk.system/") else "_"
    path = path.removeprefix("whisk.system/")
    url = gateway.url(f"/api/v1/namespaces/{namespace}/{path}")
    async with http.request(method, url, json=body) as response:
        assert response.status in (200, 202), await response.text()
        return await response.json()


def echoed(function: Recorder, via: str) -> bool:
    return any(
        request.body.startswith(b"{") and json.loads(request.body).get("via") == via
        for request in function.requests
    )


async def ended(http: aiohttp.ClientSession, gateway: RunningGateway, activation_id: str) -> bool:
    status, _ = await get_json(
        http, gateway.url(f"/api/v1/namespaces/_/activations/{activation_id}")
    )
    return status == 200


async def test_the_events_user_may_publish_events_and_nothing_else(
    nats_server: NatsServer, stack_files: StackFiles, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="faas.nats")
    events, settings = await connect_as(nats_server, stack_files, EVENTS_USER)
    try:
        await events.publish("events.orders", b"an event")  # allowed: no denial logged
        await events.publish(settings.subject_for("default", "echo"), b"forged call")
        await events.publish(f"{settings.fire_stream}.trigger.t", b"forged fire")
        await events.subscribe("events.>")

        def all_denied() -> bool:
            messages = " ".join(
                r.getMessage() for r in caplog.records if "NATS denied" in r.getMessage()
            )
            return (
                settings.subject_for("default", "echo") in messages
                and f"{settings.fire_stream}.trigger.t" in messages
                and 'subscription to "events.>"' in messages
            )

        await wait_until(all_denied, DEADLINE_S, "the three denials in the log")
        denied = " ".join(r.getMessage() for r in caplog.records)
        assert "events.orders" not in denied
    finally:
        await events.close()


async def test_the_worker_user_cannot_deploy_functions_or_queue_calls(
    nats_server: NatsServer, stack_files: StackFiles, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="faas.nats")
    worker, settings = await connect_as(nats_server, stack_files, WORKER_USER)
    gateway, _ = await connect_as(nats_server, stack_files, GATEWAY_USER)
    try:
        worker_js = worker.jetstream(timeout=1.0)
        # It may create the bucket (if it starts first) and the queue's stream, as it does.
        await ensure_all(worker_js, Plan.of(settings))
        bucket = key_value(worker_js, settings.functions_bucket)

        with pytest.raises(TimeoutError):  # the server drops it; no ack comes
            await bucket.put("evil", b'{"deployment": {"service": "evil", "url": "http://x"}}')
        with pytest.raises(TimeoutError):
            await worker_js.publish(settings.subject_for("default", "echo"), b"forged")

        gateway_js = gateway.jetstream()
        with pytest.raises(NoKeysError):
            await (await gateway_js.key_value(settings.functions_bucket)).keys()
        assert (await gateway_js.stream_info(settings.nats_stream)).state.messages == 0
    finally:
        await worker.close()
        await gateway.close()
    denied = [r.getMessage() for r in caplog.records if "NATS denied" in r.getMessage()]
    assert any(f"$kv.{settings.functions_bucket}.evil" in message for message in denied)
    assert any(settings.subject_for("default", "echo") in message for message in denied)


async def test_the_gateway_user_cannot_take_drop_or_watch_queued_calls(
    nats_server: NatsServer, stack_files: StackFiles, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="faas.nats")
    gateway, settings = await connect_as(nats_server, stack_files, GATEWAY_USER)
    worker, _ = await connect_as(nats_server, stack_files, WORKER_USER)
    worker_settings = WorkerSettings(**settings.model_dump())
    try:
        gateway_js = gateway.jetstream(timeout=1.0)
        await ensure_all(gateway_js, Plan.of(settings))
        await gateway_js.publish(settings.subject_for("default", "echo"), b"queued call")
        worker_js = worker.jetstream()
        await ensure_consumer(worker_js, worker_settings)
        consumer = worker_settings.consumer_name

        taking = await gateway_js.pull_subscribe_bind(durable=consumer, stream=settings.nats_stream)
        with pytest.raises(TimeoutError):
            await taking.fetch(1, timeout=1.0)
        with pytest.raises(TimeoutError):
            await gateway_js.delete_consumer(settings.nats_stream, consumer)
        with pytest.raises(TimeoutError):
            await gateway_js.purge_stream(settings.nats_stream)
        await gateway.subscribe("_INBOX.worker.>")  # another user's replies

        def all_denied() -> bool:
            messages = " ".join(r.getMessage() for r in caplog.records)
            return all(
                subject in messages
                for subject in (
                    "consumer.msg.next",
                    "consumer.delete",
                    "stream.purge",
                    'subscription to "_inbox.worker.>"',
                )
            )

        await wait_until(all_denied, DEADLINE_S, "the four denials in the log")
        # The call is still there for the worker, which takes it.
        [message] = await (
            await worker_js.pull_subscribe_bind(durable=consumer, stream=settings.nats_stream)
        ).fetch(1, timeout=5.0)
        assert message.data == b"queued call"
        await message.ack_sync()
    finally:
        await gateway.close()
        await worker.close()


# ways to sign in, each against a server configured for it


async def start_server(tmp_path: Path, config: str) -> NatsServer:
    path = tmp_path / "server.conf"
    path.write_text(config)
    server = NatsServer(tmp_path / "store", config_file=path)
    await server.start()
    return server


async def signs_in(settings: CommonSettings) -> bool:
    """Whether the server takes these settings' credentials, through the processes' connect."""
    client = await asyncio.wait_for(connect(settings, "test"), DEADLINE_S)
    try:
        await client.flush(timeout=5)
        return client.is_connected
    finally:
        await client.close()


async def refusal(settings: CommonSettings) -> str:
    """Why the server refuses these settings' credentials (one attempt, no retrying); empty
    when it takes them."""
    return await connect_once(settings.nats_url, **connect_options(settings))


async def refused(settings: CommonSettings) -> bool:
    return "Authorization Violation" in await refusal(settings)


async def test_user_and_password_from_a_setting_or_a_file(tmp_path: Path) -> None:
    server = await start_server(
        tmp_path,
        'authorization { users = [ { user: "alice", password: "s3cret-pass" } ] }\n',
    )
    try:
        password_file = tmp_path / "password"
        password_file.write_text("s3cret-pass\n")  # as a secret file usually ends
        assert await signs_in(
            CommonSettings(nats_url=server.url, nats_user="alice", nats_password="s3cret-pass")
        )
        assert await signs_in(
            CommonSettings(
                nats_url=server.url, nats_user="alice", nats_password_file=str(password_file)
            )
        )
        assert await refused(
            CommonSettings(nats_url=server.url, nats_user="alice", nats_password="wrong")
        )
    finally:
        server.kill()


async def test_token_from_a_setting_or_a_file(tmp_path: Path) -> None:
    server = await start_server(tmp_path, 'authorization { token: "t0ken-value" }\n')
    try:
        token_file = tmp_path / "token"
        token_file.write_text("t0ken-value\n")
        assert await signs_in(CommonSettings(nats_url=server.url, nats_token="t0ken-value"))
        assert await signs_in(CommonSettings(nats_url=server.url, nats_token_file=str(token_file)))
        assert await refused(CommonSettings(nats_url=server.url, nats_token="other"))
    finally:
        server.kill()


def new_nkey(prefix: int) -> tuple[nkeys.KeyPair, bytes]:
    seed = nkeys.encode_seed(os.urandom(32), prefix)
    return nkeys.from_seed(bytearray(seed)), seed


async def test_nkey_seed_file(tmp_path: Path) -> None:
    user, seed = new_nkey(nkeys.PREFIX_BYTE_USER)
    _, other_seed = new_nkey(nkeys.PREFIX_BYTE_USER)
    server = await start_server(
        tmp_path, f'authorization {{ users = [ {{ nkey: "{user.public_key.decode()}" }} ] }}\n'
    )
    try:
        seed_file, other_file = tmp_path / "user.nk", tmp_path / "other.nk"
        seed_file.write_bytes(seed)
        other_file.write_bytes(other_seed)
        assert await signs_in(
            CommonSettings(nats_url=server.url, nats_nkey_seed_file=str(seed_file))
        )
        assert await refused(
            CommonSettings(nats_url=server.url, nats_nkey_seed_file=str(other_file))
        )
    finally:
        server.kill()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def signed_jwt(issuer: nkeys.KeyPair, subject: str, name: str, claims: dict[str, Any]) -> str:
    """A NATS JWT (v2): the operator signs accounts, an account signs its users."""
    body: dict[str, Any] = {
        "jti": "",
        "iat": int(time.time()),
        "iss": issuer.public_key.decode(),
        "name": name,
        "sub": subject,
        "nats": {**claims, "version": 2},
    }
    digest = hashlib.sha512(json.dumps(body).encode()).digest()[:32]
    body["jti"] = base64.b32encode(digest).decode().rstrip("=")
    header = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    payload = _b64(json.dumps(body).encode())
    return f"{header}.{payload}.{_b64(issuer.sign(f'{header}.{payload}'.encode()))}"


def creds_file(path: Path, user_jwt: str, seed: bytes) -> Path:
    path.write_text(
        f"-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n"
        f"-----BEGIN USER NKEY SEED-----\n{seed.decode()}\n------END USER NKEY SEED------\n"
    )
    return path


async def test_creds_file_against_a_server_in_jwt_mode(tmp_path: Path) -> None:
    operator, _ = new_nkey(nkeys.PREFIX_BYTE_OPERATOR)
    account, _ = new_nkey(nkeys.PREFIX_BYTE_ACCOUNT)
    system_account, _ = new_nkey(nkeys.PREFIX_BYTE_ACCOUNT)  # JetStream needs one
    stranger_account, _ = new_nkey(nkeys.PREFIX_BYTE_ACCOUNT)
    user, user_seed = new_nkey(nkeys.PREFIX_BYTE_USER)
    unlimited = {"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1, "conn": -1}
    (tmp_path / "operator.jwt").write_text(
        signed_jwt(operator, operator.public_key.decode(), "op", {"type": "operator"})
    )
    account_jwt = signed_jwt(
        operator,
        account.public_key.decode(),
        "faas",
        {"type": "account", "limits": {**unlimited, "wildcards": True, "leaf": -1}},
    )
    system_jwt = signed_jwt(
        operator, system_account.public_key.decode(), "SYS", {"type": "account"}
    )
    user_claims = {"type": "user", "subs": -1, "data": -1, "payload": -1}
    server = await start_server(
        tmp_path,
        f'operator: "{tmp_path / "operator.jwt"}"\nresolver: MEMORY\n'
        f"system_account: {system_account.public_key.decode()}\n"
        f'resolver_preload: {{ {account.public_key.decode()}: "{account_jwt}", '
        f'{system_account.public_key.decode()}: "{system_jwt}" }}\n',
    )
    try:
        good = creds_file(
            tmp_path / "user.creds",
            signed_jwt(account, user.public_key.decode(), "gateway", user_claims),
            user_seed,
        )
        # Signed by an account the server does not know.
        bad = creds_file(
            tmp_path / "stranger.creds",
            signed_jwt(stranger_account, user.public_key.decode(), "gateway", user_claims),
            user_seed,
        )
        assert await signs_in(CommonSettings(nats_url=server.url, nats_creds_file=str(good)))
        assert await refused(CommonSettings(nats_url=server.url, nats_creds_file=str(bad)))
    finally:
        server.kill()


async def test_tls_with_a_client_certificate(tmp_path: Path) -> None:
    ca = trustme.CA()
    server_cert = ca.issue_cert("127.0.0.1")
    client_cert = ca.issue_cert("faas-gateway")
    files = {
        "ca": tmp_path / "ca.pem",
        "server": tmp_path / "server.pem",
        "server_key": tmp_path / "server.key",
        "client": tmp_path / "client.pem",
        "client_key": tmp_path / "client.key",
    }
    ca.cert_pem.write_to_path(str(files["ca"]))
    server_cert.cert_chain_pems[0].write_to_path(str(files["server"]))
    server_cert.private_key_pem.write_to_path(str(files["server_key"]))
    client_cert.cert_chain_pems[0].write_to_path(str(files["client"]))
    client_cert.private_key_pem.write_to_path(str(files["client_key"]))
    server = await start_server(
        tmp_path,
        f'tls {{ cert_file: "{files["server"]}", key_file: "{files["server_key"]}", '
        f'ca_file: "{files["ca"]}", verify: true }}\n',
    )
    try:
        with_ca: dict[str, Any] = {"nats_url": server.url, "nats_tls_ca_file": str(files["ca"])}
        assert await signs_in(
            CommonSettings(
                **with_ca,
                nats_tls_cert_file=str(files["client"]),
                nats_tls_key_file=str(files["client_key"]),
            )
        )
        # The server verifies clients: no certificate, no connection (the client sees an
        # alert or a reset, depending on when the server's answer overtakes the handshake).
        assert await refusal(CommonSettings(**with_ca)) != ""
        await wait_until(
            lambda: "client didn't provide a certificate" in server.log_path.read_text(),
            DEADLINE_S,
            "the server to say why",
        )
        # And we verify the server: the system's CAs do not know this one.
        assert "CERTIFICATE_VERIFY_FAILED" in await refusal(
            CommonSettings(
                nats_url=server.url,
                nats_tls_cert_file=str(files["client"]),
                nats_tls_key_file=str(files["client_key"]),
            )
        )
    finally:
        server.kill()


async def test_tls_settings_refuse_a_server_that_does_not_require_tls(
    tmp_path: Path, nats_server: NatsServer, stack_files: StackFiles
) -> None:
    """nats-py does TLS only when the server asks for it; with TLS settings, a server that
    does not is refused rather than used in plain text."""
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    settings = CommonSettings(
        nats_url=nats_server.url,
        nats_tls_ca_file=str(tmp_path / "ca.pem"),
        **as_user(stack_files, GATEWAY_USER),
    )
    with pytest.raises(NatsCredentialsError, match="does not require TLS"):
        await connect(settings, "test")


# settings


@pytest.mark.parametrize(
    ("values", "problem"),
    [
        ({"nats_user": "a", "nats_password": "p", "nats_token": "t"}, "one way, not with"),
        ({"nats_token": "t", "nats_creds_file": "x.creds"}, "one way, not with"),
        ({"nats_nkey_seed_file": "a.nk", "nats_creds_file": "x.creds"}, "one way, not with"),
        ({"nats_user": "a"}, "nats_user needs nats_password"),
        ({"nats_password": "p"}, "a NATS password needs nats_user"),
        (
            {"nats_user": "a", "nats_password": "p", "nats_password_file": "f"},
            "nats_password or nats_password_file, not both",
        ),
        ({"nats_token": "t", "nats_token_file": "f"}, "nats_token or nats_token_file"),
        ({"nats_tls_cert_file": "c.pem"}, "go together"),
        ({"nats_tls_key_file": "c.key"}, "go together"),
        (
            {"nats_url": "nats://u:p@127.0.0.1:4222", "nats_token": "t"},
            "nats_url carries credentials",
        ),
        ({"nats_inbox_prefix": "_INBOX.>"}, "nats_inbox_prefix"),
        ({"nats_inbox_prefix": ""}, "nats_inbox_prefix"),
    ],
)
def test_conflicting_or_incomplete_credentials_are_refused_at_start(
    values: dict[str, str], problem: str
) -> None:
    with pytest.raises(ValidationError, match=problem) as raised:
        CommonSettings(**values)
    for secret in ("p", "t"):
        assert f"'{secret}'" not in str(raised.value)  # values are not repeated back


def test_secrets_stay_out_of_reprs_and_logged_urls() -> None:
    settings = CommonSettings(nats_user="alice", nats_password="hunter2-pass")
    assert "hunter2-pass" not in repr(settings)
    assert connect_options(settings)["password"] == "hunter2-pass"
    assert (
        redact_url("nats://alice:pw@h1:4222,nats://h2:4222") == "nats://***@h1:4222,nats://h2:4222"
    )
    assert redact_url("tls://t0ken@h:4443") == "tls://***@h:4443"
    assert redact_url("nats://127.0.0.1:4222") == "nats://127.0.0.1:4222"


@pytest.mark.parametrize("module", ["gateway", "queue_worker"])
def test_an_unreadable_credential_file_stops_start_up_with_a_clear_message(
    tmp_path: Path, module: str
) -> None:
    missing = tmp_path / "no-such-password"
    result = subprocess.run(
        [sys.executable, "-m", module],
        capture_output=True,
        text=True,
        timeout=60,
        env=subprocess_env(
            nats_user="alice",
            nats_password_file=str(missing),
            gateway_port="0",
            worker_port="0",
        ),
    )
    assert result.returncode != 0
    assert f"nats_password_file: cannot read {missing}" in result.stderr


@pytest.mark.parametrize("module", ["gateway", "queue_worker"])
def test_conflicting_credentials_stop_start_up_without_echoing_them(module: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", module],
        capture_output=True,
        text=True,
        timeout=60,
        env=subprocess_env(nats_token="t0p-secret-token", nats_creds_file="/x.creds"),
    )
    assert result.returncode != 0
    assert "sign in to NATS one way, not with nats_token and nats_creds_file" in result.stderr
    assert "t0p-secret-token" not in result.stderr
