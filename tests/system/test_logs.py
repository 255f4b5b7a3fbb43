"""log_format: text for people, json (one object a line) for collectors; both carry the call."""

import asyncio
import io
import json
import logging
import re
import signal
import subprocess
import sys
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from pydantic import ValidationError

from faas_gateway.runtime.logs import call_context, new_formatter
from faas_gateway.runtime.settings import CommonSettings
from tests.harness import ROOT, RecordedRequest, free_port, subprocess_env, wait_until

RFC3339_MS_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def emit(log_format: str, emit_with: Any) -> str:
    """What one logger call writes through the formatter of ``log_format``."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(new_formatter(log_format))
    logger = logging.getLogger(f"faas.test.{log_format}")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    try:
        emit_with(logger)
    finally:
        logger.handlers.clear()
    return out.getvalue()


def log_failure(logger: logging.Logger) -> None:
    try:
        raise RuntimeError("upstream broke\nbadly")
    except RuntimeError:
        logger.exception(
            "call failed: %s", "502", extra={**call_context("c-1", "echo"), "attempt": 2}
        )


def test_settings_default_to_text_and_take_json_from_the_environment(monkeypatch):
    assert CommonSettings().log_format == "text"
    monkeypatch.setenv("LOG_FORMAT", "json")
    assert CommonSettings().log_format == "json"
    monkeypatch.setenv("LOG_FORMAT", "yaml")
    with pytest.raises(ValidationError):
        CommonSettings()


def test_text_puts_the_call_on_the_first_line_before_the_traceback():
    lines = emit("text", log_failure).splitlines()
    assert re.fullmatch(
        r"\S+ \S+ ERROR faas\.test\.text: call failed: 502 callId=c-1 function=echo", lines[0]
    ), lines[0]
    assert lines[1] == "Traceback (most recent call last):"
    assert lines[-2:] == ["RuntimeError: upstream broke", "badly"]


def test_text_without_a_call_has_no_call_fields():
    line = emit("text", lambda logger: logger.info("listening"))
    assert line.endswith("faas.test.text: listening\n")
    assert "callId" not in line


def test_json_is_one_object_a_line_with_the_call_extras_and_the_traceback():
    output = emit("json", log_failure)
    assert output.count("\n") == 1  # the message's and the traceback's newlines are escaped
    entry = json.loads(output)
    assert list(entry)[:4] == ["time", "level", "logger", "message"]
    assert RFC3339_MS_UTC.fullmatch(entry["time"]), entry["time"]
    assert entry["level"] == "ERROR"
    assert entry["logger"] == "faas.test.json"
    assert entry["message"] == "call failed: 502"
    assert entry["callId"] == "c-1"
    assert entry["function"] == "echo"
    assert entry["attempt"] == 2
    assert entry["exception"].startswith("Traceback (most recent call last):\n")
    assert entry["exception"].endswith("RuntimeError: upstream broke\nbadly")
    assert list(entry)[-1] == "exception"


def test_json_time_is_the_records_in_utc():
    record = logging.makeLogRecord({"msg": "x", "created": 1738324800.1239})
    entry = json.loads(new_formatter("json").format(record))
    assert entry["time"] == "2025-01-31T12:00:00.123Z"


def test_json_without_a_call_has_no_call_fields_and_writes_odd_extras_as_text():
    output = emit("json", lambda logger: logger.info("listening", extra={"peer": object()}))
    entry = json.loads(output)
    assert "callId" not in entry and "function" not in entry
    assert entry["peer"].startswith("<object object")


UNRULY = """
import asyncio, threading, warnings
import aiohttp
from aiohttp import web
from nats.aio.client import _default_error_callback
from faas_gateway.runtime.logs import configure_logging
from faas_gateway.runtime.settings import CommonSettings

configure_logging(CommonSettings(log_format="json"))

async def broken(request):
    raise RuntimeError("handler broke")

async def libraries():
    runner = web.AppRunner(web.Application())
    runner.app.router.add_get("/", broken)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}/") as response:
            assert response.status == 500
    await runner.cleanup()
    # What nats-py does with an error when no error_cb is given.
    await _default_error_callback(ConnectionError("nats went away"))

asyncio.run(libraries())
thread = threading.Thread(target=lambda: 1 / 0, name="helper")
thread.start()
thread.join()
warnings.warn("careful\\nnow")
raise RuntimeError("line one\\nline two")
"""


def test_json_mode_writes_libraries_uncaught_exceptions_and_warnings_as_json_lines():
    result = subprocess.run(
        [sys.executable, "-W", "always", "-c", UNRULY],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=subprocess_env(),
    )
    assert result.returncode == 1
    assert result.stdout == ""
    entries = [json.loads(line) for line in result.stderr.splitlines()]
    assert [entry["logger"] for entry in entries] == [
        "aiohttp.server",
        "nats.aio.client",
        "faas",
        "py.warnings",
        "faas",
    ], result.stderr
    assert entries[0]["exception"].endswith("RuntimeError: handler broke")
    assert entries[1]["exception"].endswith("ConnectionError: nats went away")
    assert entries[2]["message"] == "uncaught exception in thread helper"
    assert entries[2]["exception"].endswith("ZeroDivisionError: division by zero")
    assert "careful\nnow" in entries[3]["message"]
    assert entries[4]["message"] == "uncaught exception"
    assert entries[4]["level"] == "CRITICAL"
    assert entries[4]["exception"].endswith("RuntimeError: line one\nline two")


# End to end: a real gateway and worker as their own processes, as an operator runs them.


async def failing(request: web.Request, recorded: RecordedRequest) -> web.StreamResponse:
    return web.Response(status=500, body=b"nope")


async def start(module: str, **env: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        module,
        cwd=ROOT,
        env=subprocess_env(log_format="json", log_level="debug", **env),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )


async def stop(process: asyncio.subprocess.Process) -> tuple[int | None, str]:
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
    try:
        output, _ = await asyncio.wait_for(process.communicate(), 30)
    except TimeoutError:
        process.kill()
        output, _ = await asyncio.wait_for(process.communicate(), 10)
    return process.returncode, output.decode()


async def test_json_logs_of_both_processes_carry_the_call_on_every_line_about_it(
    tmp_path, nats_server, recorder, http
):
    function = await recorder(failing)
    callback_receiver = await recorder(failing)
    functions_file = tmp_path / "functions.yml"
    functions_file.write_text(
        "functions:\n"
        f"  down:\n    url: http://127.0.0.1:{free_port()}\n"
        f"  flaky:\n    url: {function.url}\n"
    )
    gateway_port, worker_port = free_port(), free_port()
    common = {"nats_url": nats_server.url, "functions_file": str(functions_file)}
    gateway = await start("gateway", gateway_port=str(gateway_port), **common)
    worker = await start(
        "queue_worker",
        worker_port=str(worker_port),
        fetch_wait="0.5",
        max_retry_attempts="2",
        initial_retry_wait="0.05",
        max_retry_wait="0.2",
        callback_max_attempts="2",
        callback_initial_wait="0.05",
        callback_max_wait="0.2",
        **common,
    )
    base = f"http://127.0.0.1:{gateway_port}"
    sync_id, async_id = "log-test-sync-1", "log-test-async-1"

    async def healthy(url: str) -> bool:
        try:
            async with http.get(url) as response:
                return response.status == 200
        except aiohttp.ClientError:
            return False

    async def callback_given_up() -> bool:
        async with http.get(f"{base}/system/activations/{async_id}") as response:
            if response.status != 200:
                return False
            record = await response.json()
        return bool(record["status"] == "failed" and record["callback"]["state"] == "failed")

    try:
        await wait_until(lambda: healthy(f"{base}/healthz"), 30, "the gateway")
        await wait_until(lambda: healthy(f"http://127.0.0.1:{worker_port}/healthz"), 30, "worker")
        async with http.post(
            f"{base}/function/down", data=b"x", headers={"X-Call-Id": sync_id}
        ) as response:
            assert response.status == 502
        async with http.post(
            f"{base}/async-function/flaky",
            data=b"x",
            headers={"X-Call-Id": async_id, "X-Callback-Url": callback_receiver.url},
        ) as response:
            assert response.status == 202
        await wait_until(callback_given_up, 30, "the failed call and its failed callback")
        assert len(function.requests) == 2
    finally:
        worker_exit, worker_log = await stop(worker)
        gateway_exit, gateway_log = await stop(gateway)
    assert (gateway_exit, worker_exit) == (0, 0), gateway_log + worker_log

    about: dict[str, list[dict[str, Any]]] = {sync_id: [], async_id: []}
    for line in (gateway_log + worker_log).splitlines():
        entry = json.loads(line)  # every line, the libraries' included
        assert isinstance(entry, dict), line
        assert RFC3339_MS_UTC.fullmatch(entry["time"]), line
        assert {"level", "logger", "message"} <= entry.keys(), line
        for call_id, function_name in ((sync_id, "down"), (async_id, "flaky")):
            if call_id in line:
                assert entry.get("callId") == call_id, line
                assert entry.get("function") == function_name, line
                about[call_id].append(entry)
    # The lines the checks above ran on: without them the test would pass on no logs at all.
    assert any(e["message"].startswith("sync call failed") for e in about[sync_id]), about
    worker_lines = [e["message"] for e in about[async_id] if e["logger"] == "faas.worker"]
    assert any(message.startswith("attempt 1; next in") for message in worker_lines), about
    assert any(
        e["logger"] == "faas.callback" and "given up" in e["message"] for e in about[async_id]
    ), about
    assert any(e["logger"] == "faas.gateway" for e in about[async_id]), about  # "queued"
