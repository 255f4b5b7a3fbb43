"""gateway_workers > 1: several gateway processes share one port and report metrics as one."""

import asyncio
import re
import signal
import sys

import aiohttp

from tests.harness import free_port, subprocess_env, wait_until


async def test_processes_share_the_port_sum_their_metrics_and_stop_cleanly(
    tmp_path, nats_server, recorder, http
):
    function = await recorder()
    functions_file = tmp_path / "functions.yml"
    functions_file.write_text(f"functions:\n  echo:\n    url: {function.url}\n")
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        env=subprocess_env(
            gateway_workers="2",
            gateway_port=str(port),
            nats_url=nats_server.url,
            functions_file=str(functions_file),
        ),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"

    async def healthy() -> bool:
        try:
            async with http.get(f"{base}/healthz") as response:
                return response.status == 200
        except aiohttp.ClientError:
            return False

    try:
        await wait_until(healthy, 30, "the gateway processes")
        calls = 40
        for _ in range(calls):
            # A new connection each time, so the kernel spreads them over both processes.
            async with (
                aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s,
                s.post(f"{base}/function/echo", data=b"x") as response,
            ):
                assert response.status == 200
        assert len(function.requests) == calls
        async with http.get(f"{base}/metrics") as response:
            text = await response.text()
        served = re.search(
            r'gateway_function_invocation_total\{code="200",function_name="echo"\} (\S+)', text
        )
        assert served is not None, text
        # With 40 new connections the kernel's hash all but surely gave each process some
        # (all on one: 2**-39), so a /metrics of one process alone would count fewer.
        assert float(served.group(1)) == calls
        started = re.search(
            r'gateway_function_invocation_started\{function_name="echo"\} (\S+)', text
        )
        assert started is not None and float(started.group(1)) == calls
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        output, _ = await asyncio.wait_for(process.communicate(), 30)
    log = output.decode()
    assert process.returncode == 0, log
    assert "2 gateway processes share port" in log
