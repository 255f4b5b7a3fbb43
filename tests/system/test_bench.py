"""The benchmark harness keeps working: its wrk parser, its own load generator, a short run.

No figures are asserted (timing thresholds do not belong in tests); only that the harness
measures and reports."""

import asyncio
import json
import os
import socket
import sys

import pytest

from bench.load import parse_wrk
from tests.harness import ROOT

WRK_OUTPUT = """\
Running 2s test @ http://127.0.0.1:9701/function/echo
  1 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     5.10ms    1.20ms  20.00ms   80.00%
    Req/Sec     9.80k   500.00    10.50k    70.00%
  Latency Distribution
     50%  480.00us
     75%    5.50ms
     90%    6.10ms
     99%    1.20s
  19600 requests in 2.00s, 22.00MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 4
Requests/sec:   9800.50
Transfer/sec:     11.00MB
"""


def test_wrk_output_is_parsed_with_units_and_errors():
    result = parse_wrk(WRK_OUTPUT)
    assert result.requests == 19600
    assert result.seconds == pytest.approx(2.0)
    assert result.requests_per_s == pytest.approx(9800.5)
    assert result.p50_ms == pytest.approx(0.48)
    assert result.p90_ms == pytest.approx(6.1)
    assert result.p99_ms == pytest.approx(1200.0)
    assert result.errors == 4 + 2 + 1


def test_unexpected_wrk_output_is_an_error():
    with pytest.raises(RuntimeError, match="unexpected wrk output"):
        parse_wrk("unable to connect to 127.0.0.1:1 Connection refused")


async def test_builtin_load_generator_reports_json(recorder):
    function = await recorder()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.loadgen",
        "--url",
        function.url + "/x",
        "--connections",
        "4",
        "--seconds",
        "0.5",
        "--body-bytes",
        "16",
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    output, _ = await asyncio.wait_for(process.communicate(), 60)
    result = json.loads(output)
    assert process.returncode == 0
    assert result["tool"] == "builtin"
    assert result["requests"] == len(function.requests) > 0
    assert result["errors"] == 0
    assert 0 < result["p50_ms"] <= result["p99_ms"]
    assert function.requests[0].body == b"x" * 16


def free_base_port() -> int:
    for base in range(21000, 60000, 97):
        ports = range(base, base + 6)
        if all(_free(port) for port in ports):
            return base
    raise AssertionError("no six free ports")


def _free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


async def test_a_short_run_measures_and_reports(tmp_path):
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench",
        "--quick",
        "--scenarios",
        "2,3,8",
        "--seconds",
        "1",
        "--load",
        "builtin",
        "--base-port",
        str(free_base_port()),
        "--results-dir",
        str(tmp_path),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), 180)
    text = output.decode()
    assert process.returncode == 0, text
    assert "load generator: builtin" in text
    [saved] = list(tmp_path.glob("*.json"))
    results = {r["number"]: r for r in json.loads(saved.read_text())["results"]}
    assert set(results) == {2, 3, 8}
    assert results[2]["value"] is not None  # a latency was measured
    assert results[3]["details"]["growth_mib"]["upload"] is not None
    listing = results[8]["details"]["listing"]
    assert listing["seeded"]["kv_messages"] == listing["seeded"]["count"] > 0
    assert results[8]["value"] == listing["timings"]["newest"]["p50_ms"] > 0
    assert results[8]["details"]["recording_cost"] is not None
    assert results[8]["met"] is not None
    assert "| 3 | Sync proxy, 100 MiB upload and download" in (tmp_path / "latest.md").read_text()


async def test_a_peer_gets_its_column_and_its_cpu_per_request(tmp_path, recorder):
    """--peer with --peer-pid: scenarios 1 and 2 measure the peer beside ours, read its CPU
    time from its pid, and print the side-by-side table with its column."""
    peer = await recorder()  # answers /function/echo; it runs in this test's process
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench",
        "--quick",
        "--scenarios",
        "1,2",
        "--seconds",
        "1",
        "--load",
        "builtin",
        "--gateway-workers",
        "1",
        "--peer",
        peer.url,
        "--peer-pid",
        str(os.getpid()),
        "--base-port",
        str(free_base_port()),
        "--results-dir",
        str(tmp_path),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), 180)
    text = output.decode()
    assert process.returncode == 0, text
    name = f"peer {peer.url}"
    [saved] = list(tmp_path.glob("*.json"))
    results = {r["number"]: r for r in json.loads(saved.read_text())["results"]}
    throughput, latency = results[1]["details"], results[2]["details"]
    assert throughput["rates"][name] > 0
    assert throughput["cpu_us_per_request"][name] > 0
    assert throughput["ours_over_peer"][name]["gateway x1"] > 0
    assert name in latency["added_ms"]
    assert "gateway x1 >= 1.05 x each peer" in results[1]["target"]
    table = (tmp_path / "latest.md").read_text()
    assert f"| figure | direct | gateway x1 | {name} |" in table
    assert f"| c=50 ours / {name} |" in table
    assert len(peer.requests) > 0


async def test_a_peer_pid_that_does_not_exist_is_refused_at_once(tmp_path):
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench",
        "--peer",
        "http://127.0.0.1:1",
        "--peer-pid",
        "999999999",
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 2
    assert "--peer-pid 999999999: no such process" in output.decode()
