"""HTTP load for a fixed time: wrk when it is installed, else the built-in generator."""

import asyncio
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class LoadResult:
    tool: str
    requests: int
    seconds: float
    requests_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    errors: int  # non-2xx/3xx answers and socket errors

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def load_tool(choice: str) -> str:
    if choice == "auto":
        return "wrk" if shutil.which("wrk") else "builtin"
    if choice == "wrk" and not shutil.which("wrk"):
        raise SystemExit("--load wrk: wrk is not installed (Debian: apt-get install wrk)")
    return choice


async def run_load(
    tool: str,
    url: str,
    *,
    connections: int,
    seconds: float,
    method: str = "POST",
    body_bytes: int = 1024,
    headers: dict[str, str] | None = None,
    body: str | None = None,
) -> LoadResult:
    """``body``: the request body as text (a JSON document, say) instead of ``body_bytes``
    of "x"."""
    headers = dict(headers or {})
    if body is None:
        body = "x" * body_bytes
    if body:
        headers.setdefault("Content-Type", "application/octet-stream")
    if tool == "wrk":
        return await _wrk(url, connections, seconds, method, body, headers)
    return await _builtin(url, connections, seconds, method, body, headers)


def _lua_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


async def _wrk(
    url: str,
    connections: int,
    seconds: float,
    method: str,
    body: str,
    headers: dict[str, str],
) -> LoadResult:
    lines = [f"wrk.method = {_lua_string(method)}"]
    if body:
        lines.append(f"wrk.body = {_lua_string(body)}")
    for name, value in headers.items():
        lines.append(f"wrk.headers[{_lua_string(name)}] = {_lua_string(value)}")
    with tempfile.TemporaryDirectory(prefix="faas-bench-wrk-") as scratch:
        script_path = os.path.join(scratch, "request.lua")
        with open(script_path, "w") as script:  # noqa: ASYNC230 - a few bytes, once per run
            script.write("\n".join(lines) + "\n")
        output = await _run_wrk(script_path, url, connections, seconds)
    return parse_wrk(output)


async def _run_wrk(script_path: str, url: str, connections: int, seconds: float) -> str:
    process = await asyncio.create_subprocess_exec(
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--latency",
        "-s",
        script_path,
        url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    return (await process.communicate())[0].decode()


_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def parse_wrk(output: str) -> LoadResult:
    def number(pattern: str) -> float:
        match = re.search(pattern, output)
        if match is None:
            raise RuntimeError(f"unexpected wrk output:\n{output}")
        return float(match.group(1))

    def percentile(label: str) -> float:
        match = re.search(rf"^\s+{label}%\s+([\d.]+)(us|ms|s|m)\s*$", output, re.MULTILINE)
        if match is None:
            raise RuntimeError(f"unexpected wrk output:\n{output}")
        return float(match.group(1)) * _UNIT_MS[match.group(2)]

    requests_match = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", output)
    if requests_match is None:
        raise RuntimeError(f"unexpected wrk output:\n{output}")
    errors = 0
    if non_2xx := re.search(r"Non-2xx or 3xx responses: (\d+)", output):
        errors += int(non_2xx.group(1))
    if socket := re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    ):
        errors += sum(int(value) for value in socket.groups())
    return LoadResult(
        tool="wrk",
        requests=int(requests_match.group(1)),
        seconds=float(requests_match.group(2)) * _UNIT_MS[requests_match.group(3)] / 1000,
        requests_per_s=number(r"Requests/sec:\s+([\d.]+)"),
        p50_ms=percentile("50"),
        p90_ms=percentile("90"),
        p99_ms=percentile("99"),
        errors=errors,
    )


async def _builtin(
    url: str,
    connections: int,
    seconds: float,
    method: str,
    body: str,
    headers: dict[str, str],
) -> LoadResult:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.loadgen",
        "--url",
        url,
        "--connections",
        str(connections),
        "--seconds",
        str(seconds),
        "--method",
        method,
        "--body",
        body,
        "--headers",
        json.dumps(headers),
        stdout=asyncio.subprocess.PIPE,
    )
    output = (await process.communicate())[0]
    return LoadResult(**json.loads(output))
