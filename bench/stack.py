"""The processes a benchmark run needs, each on its own port, with logs in the run folder."""

import asyncio
import contextlib
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import aiohttp

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Ports:
    base: int

    @property
    def services(self) -> int:
        return self.base

    @property
    def gateway(self) -> int:
        return self.base + 1

    @property
    def gateway_multi(self) -> int:
        return self.base + 2

    @property
    def baseline(self) -> int:
        return self.base + 3

    @property
    def worker(self) -> int:
        return self.base + 4

    @property
    def nats(self) -> int:
        return self.base + 5


@dataclass
class Proc:
    name: str
    process: asyncio.subprocess.Process
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def _status_kib(self, field: str) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise RuntimeError(f"no {field} for {self.name}")

    def cpu_seconds(self) -> float:
        """User and system CPU time of the process and its children still running (the
        processes of a multi-process gateway)."""
        return process_tree_cpu_seconds(self.pid)

    def rss_bytes(self) -> int:
        return self._status_kib("VmRSS") * 1024

    def peak_rss_bytes(self) -> int:
        """The high-water mark of the resident set since start or the last reset_peak()."""
        return self._status_kib("VmHWM") * 1024

    def reset_peak(self) -> None:
        Path(f"/proc/{self.pid}/clear_refs").write_text("5")

    async def stop(self, timeout_s: float = 60) -> None:
        if self.process.returncode is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.process.wait(), timeout_s)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()


def process_tree_cpu_seconds(pid: int) -> float:
    total = 0.0
    for member in [pid, *_children(pid)]:
        try:
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


class CpuSource(Protocol):
    """Where a process's CPU time is read: our own processes, or a peer gateway's."""

    def cpu_seconds(self) -> float: ...


@dataclass(frozen=True)
class PidCpu:
    """A peer gateway's CPU time from its pid (``--peer-pid``), its children included."""

    pid: int

    def cpu_seconds(self) -> float:
        if not Path(f"/proc/{self.pid}").exists():
            raise RuntimeError(f"--peer-pid {self.pid}: no such process")
        return process_tree_cpu_seconds(self.pid)


@dataclass(frozen=True)
class CgroupCpu:
    """A peer's CPU time from its cgroup (``--peer-cgroup``): a container, or a systemd unit.
    cgroup v2 keeps it in ``cpu.stat`` (usage_usec), v1 in ``cpuacct.usage`` (ns)."""

    path: Path

    def cpu_seconds(self) -> float:
        stat = self.path / "cpu.stat"
        if stat.exists():
            for line in stat.read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "usage_usec":
                    return int(value) / 1e6
        usage = self.path / "cpuacct.usage"
        if usage.exists():
            return int(usage.read_text()) / 1e9
        raise RuntimeError(f"--peer-cgroup {self.path}: neither cpu.stat nor cpuacct.usage")


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = [int(child) for child in (task / "children").read_text().split()]
        except (FileNotFoundError, ValueError):
            continue
        for child in children:
            found += [child, *_children(child)]
    return found


def nats_server_binary() -> str:
    beside_python = Path(sys.executable).parent / "nats-server"
    return str(beside_python) if beside_python.exists() else "nats-server"


class BenchStack:
    def __init__(self, run_dir: Path, ports: Ports) -> None:
        self.run_dir = run_dir
        self.ports = ports
        self.procs: list[Proc] = []
        self.functions_file = run_dir / "functions.yml"

    @property
    def nats_url(self) -> str:
        return f"nats://127.0.0.1:{self.ports.nats}"

    @property
    def services_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.services}"

    def write_functions_file(self) -> None:
        base = self.services_url
        functions = {
            "echo": base,
            "instant": f"{base}/instant",
            "sleep": f"{base}/sleep",
            "sink": f"{base}/sink",
            "big": f"{base}/big",
        }
        lines = ["functions:"]
        for name, url in functions.items():
            lines += [
                f"  {name}:",
                f"    url: {url}",
                "    exec_timeout: 5m",
                "    read_timeout: 5m",
            ]
        self.functions_file.write_text("\n".join(lines) + "\n")

    async def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Proc:
        log_path = self.run_dir / f"{name}.log"
        with log_path.open("ab") as log:
            process = await asyncio.create_subprocess_exec(
                *argv,
                cwd=ROOT,
                env={**os.environ, **(env or {})},
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        proc = Proc(name, process, log_path)
        self.procs.append(proc)
        return proc

    async def start_nats(self) -> Proc:
        proc = await self.spawn(
            "nats",
            [
                nats_server_binary(),
                "--jetstream",
                "--store_dir",
                str(self.run_dir / "nats"),
                "--addr",
                "127.0.0.1",
                "--port",
                str(self.ports.nats),
            ],
        )
        await wait_for_port(self.ports.nats, proc)
        return proc

    async def start_services(self) -> Proc:
        argv = [sys.executable, "-m", "bench.services", "--port", str(self.ports.services)]
        proc = await self.spawn("services", argv)
        await wait_for_http(f"{self.services_url}/stats", proc)
        return proc

    def _common_env(self) -> dict[str, str]:
        return {
            "nats_url": self.nats_url,
            "functions_file": str(self.functions_file),
            "log_level": "warning",
        }

    async def start_gateway(self, name: str, port: int, workers: int) -> Proc:
        env = {**self._common_env(), "gateway_port": str(port), "gateway_workers": str(workers)}
        proc = await self.spawn(name, [sys.executable, "-m", "gateway"], env)
        await wait_for_http(f"http://127.0.0.1:{port}/healthz", proc)
        return proc

    async def start_worker(self, name: str, max_inflight: int, **settings: str) -> Proc:
        env = {
            **self._common_env(),
            "worker_port": str(self.ports.worker),
            "max_inflight": str(max_inflight),
            **settings,
        }
        proc = await self.spawn(name, [sys.executable, "-m", "queue_worker"], env)
        await wait_for_http(f"http://127.0.0.1:{self.ports.worker}/healthz", proc)
        return proc

    async def start_baseline(self) -> Proc:
        argv = [
            sys.executable,
            "-m",
            "bench.baseline",
            "--port",
            str(self.ports.baseline),
            "--nats-url",
            self.nats_url,
        ]
        proc = await self.spawn("baseline", argv)
        await wait_for_port(self.ports.baseline, proc)
        return proc

    async def stop_all(self) -> None:
        # Reverse order: NATS goes last, so the others stop cleanly.
        for proc in reversed(self.procs):
            with contextlib.suppress(ProcessLookupError):
                await proc.stop()


async def wait_for_port(port: int, proc: Proc, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.process.returncode is not None:
            raise RuntimeError(f"{proc.name} exited; see {proc.log_path}")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        return
    raise RuntimeError(f"{proc.name} did not open port {port}; see {proc.log_path}")


async def wait_for_http(url: str, proc: Proc, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if proc.process.returncode is not None:
                raise RuntimeError(f"{proc.name} exited; see {proc.log_path}")
            try:
                async with session.get(url) as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise RuntimeError(f"{url} did not answer 200; see {proc.log_path}")
