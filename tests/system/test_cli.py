"""The two console scripts as a user or an orchestrator starts them."""

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from faas_gateway.runtime.command import load_settings
from faas_gateway.runtime.settings import settings_table
from gateway.settings import GatewaySettings
from queue_worker.settings import WorkerSettings
from tests.harness import subprocess_env

SCRIPTS = [
    ("faas-gateway", "gateway", GatewaySettings),
    ("faas-queue-worker", "queue_worker", WorkerSettings),
]


def run(argv: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=60, env=subprocess_env(**env)
    )


@pytest.mark.parametrize(("script", "module", "settings_cls"), SCRIPTS)
def test_help_lists_every_setting(script, module, settings_cls):
    installed = Path(sys.executable).parent / script
    for argv in ([str(installed), "--help"], [sys.executable, "-m", module, "--help"]):
        result = run(argv)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(f"usage: {script}")
        for env, default, _ in settings_table(settings_cls):
            assert f"{env} (default {default})" in result.stdout


@pytest.mark.parametrize(("script", "module", "settings_cls"), SCRIPTS)
def test_malformed_functions_file_stops_start_up_with_a_clear_message(
    tmp_path, script, module, settings_cls
):
    functions = tmp_path / "functions.yml"
    functions.write_text(
        "functions:\n  good:\n    url: http://127.0.0.1:1\n  broken:\n    url: nope\n"
    )
    result = run(
        [sys.executable, "-m", module],
        functions_file=str(functions),
        worker_port="0",
        gateway_port="0",
    )
    assert result.returncode != 0
    assert str(functions) in result.stderr
    assert "'broken'" in result.stderr
    assert "url" in result.stderr


@pytest.mark.parametrize(("script", "module", "settings_cls"), SCRIPTS)
def test_invalid_setting_is_named(script, module, settings_cls):
    result = run([sys.executable, "-m", module], read_timeout="soonish")
    assert result.returncode != 0
    assert "invalid settings" in result.stderr
    assert "read_timeout" in result.stderr
    assert "soonish" in result.stderr


@pytest.mark.parametrize(("script", "module", "settings_cls"), SCRIPTS)
def test_a_signing_secret_without_the_whsec_prefix_stops_start_up_unrepeated(
    script, module, settings_cls
):
    result = run([sys.executable, "-m", module], callback_signing_secret="s3cret-of-old")
    assert result.returncode != 0
    assert "callback_signing_secret" in result.stderr
    assert "does not start with whsec_" in result.stderr
    assert "s3cret-of-old" not in result.stderr  # a secret is never written to a log


def test_settings_come_from_openfaas_env_names_with_go_durations(monkeypatch):
    monkeypatch.setenv("READ_TIMEOUT", "1m5s")
    monkeypatch.setenv("ack_wait", "90s")
    monkeypatch.setenv("exec_timeout", "2.5")
    monkeypatch.setenv("max_inflight", "7")
    worker = WorkerSettings()
    assert worker.read_timeout_s == 65
    assert worker.ack_wait_s == 90
    assert worker.exec_timeout_s == 2.5
    assert worker.max_inflight == 7
    monkeypatch.setenv("upstream_timeout", "500ms")
    assert GatewaySettings().upstream_timeout_s == 0.5


def test_flags_win_over_environment(monkeypatch):
    monkeypatch.setenv("gateway_port", "7777")
    monkeypatch.setenv("nats_url", "nats://10.0.0.1:4222")
    args = argparse.Namespace(gateway_port=9999, nats_url=None)
    settings = load_settings(GatewaySettings, args, ["gateway_port", "nats_url"])
    assert settings.gateway_port == 9999
    assert settings.nats_url == "nats://10.0.0.1:4222"
