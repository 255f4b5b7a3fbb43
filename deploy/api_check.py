"""gateway/openapi.json against a live stack, with schemathesis: `make api-check`.

Starts the local stack (deploy/local_stack.py, what `make run` starts) on free ports with a
data directory of its own, runs schemathesis against the gateway's /openapi.json with the
stack's credentials (settings tests/schemathesis.toml, hooks tests/schemathesis_hooks.py),
then stops the stack and removes the directory: nothing is left behind, and a `make run`
going on beside it is not touched. The suite runs it too (test_openapi.py).
"""

import argparse
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import local_stack

ROOT = local_stack.ROOT
SCHEMATHESIS_CONFIG = ROOT / "tests" / "schemathesis.toml"
SCHEMATHESIS_HOOKS = ROOT / "tests" / "schemathesis_hooks.py"
DOCUMENT = ROOT / "gateway" / "openapi.json"
STACK_PORTS = (
    local_stack.NATS_PORT,
    local_stack.GATEWAY_PORT,
    local_stack.WORKER_PORT,
    *local_stack.FUNCTION_PORTS.values(),
)
# Settings of the stack under test, on top of the caller's environment.
STACK_SETTINGS = {
    # Callbacks only to a name on this machine: a generated X-Callback-Url to any other host
    # is a 400 at once, with no DNS lookup and nothing sent.
    "callback_allowed_hosts": "localhost",
    "callback_max_attempts": "1",
    # Prefer: wait=N waits at most this long: a generated call to a function deployed with a
    # queue no worker serves would otherwise hold for a minute.
    "max_wait": "2s",
    "shutdown_grace": "5s",
}
START_ATTEMPTS = 3
START_TIMEOUT_S = 60.0
HEALTHY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 90.0
POLL_INTERVAL_S = 0.1
LOG_TAIL_LINES = 40


class StackError(Exception):
    """The stack did not start or did not become healthy."""


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_offset() -> int:
    """A shift of the stack's ports at which all of them are free (9003 + offset < 65536)."""
    chooser = random.Random()
    for _ in range(200):
        offset = chooser.randrange(10_000, 56_000)
        if all(port_free(port + offset) for port in STACK_PORTS):
            return offset
    raise StackError("no free set of ports for the stack")


def with_settings(settings: dict[str, str]) -> dict[str, str]:
    """This process's environment with ``settings`` in place of any spelling of their names
    (settings are case-insensitive)."""
    env = {key: value for key, value in os.environ.items() if key.lower() not in settings}
    env.update(settings)
    return env


class Stack:
    """deploy/local_stack.py on shifted ports, with its data and log under ``workdir``."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.log_path = workdir / "stack.log"
        self.offset = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def data_dir(self) -> Path:
        return self.workdir / f"data-{self.offset}"

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{local_stack.GATEWAY_PORT + self.offset}"

    @property
    def echo_url(self) -> str:
        return f"http://127.0.0.1:{local_stack.FUNCTION_PORTS['echo'] + self.offset}"

    def credentials(self) -> str:
        """user:password for /system/*, as the stack made them on its start."""
        secrets = self.data_dir / "secrets"
        user = (secrets / "basic-auth-user").read_text().strip()
        return f"{user}:{(secrets / 'basic-auth-password').read_text().strip()}"

    def log_tail(self) -> str:
        if not self.log_path.exists():
            return ""
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-LOG_TAIL_LINES:])

    def start(self) -> None:
        # Another stack may take a port between the probe and the bind: try again elsewhere.
        for _ in range(START_ATTEMPTS):
            self.offset = free_offset()
            if self._try_start():
                break
        else:
            raise StackError("the local stack did not start")
        deadline = time.monotonic() + HEALTHY_TIMEOUT_S
        while not self._healthy():
            if time.monotonic() > deadline:
                raise StackError(f"the stack's gateway did not reach NATS in {HEALTHY_TIMEOUT_S}s")
            time.sleep(POLL_INTERVAL_S)

    def _try_start(self) -> bool:
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    str(ROOT / "deploy" / "local_stack.py"),
                    "--port-offset",
                    str(self.offset),
                    "--data-dir",
                    str(self.data_dir),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=with_settings(STACK_SETTINGS),
                start_new_session=True,  # Ctrl-C reaches only us; we stop the stack in order
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            if "stack is up" in self.log_path.read_text(errors="replace"):
                return True
            time.sleep(POLL_INTERVAL_S)
        self.stop()
        return False

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.gateway_url}/healthz", timeout=2) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):  # 503 while NATS is not ready, or no answer
            return False

    def served_document(self) -> bytes:
        with urllib.request.urlopen(f"{self.gateway_url}/openapi.json", timeout=10) as response:
            body: bytes = response.read()
        return body

    def stop(self) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)  # it stops its processes in order
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def run_schemathesis(stack: Stack, arguments: list[str]) -> int:
    argv = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "--config-file",
        str(SCHEMATHESIS_CONFIG),
        "run",
        f"{stack.gateway_url}/openapi.json",
        "--auth",
        stack.credentials(),
        *arguments,
    ]
    env = with_settings(
        {"SCHEMATHESIS_HOOKS": str(SCHEMATHESIS_HOOKS), "FAAS_TEST_FUNCTION_URL": stack.echo_url}
    )
    # In the throwaway directory: what schemathesis and hypothesis keep between runs goes too.
    return subprocess.run(argv, cwd=stack.workdir, env=env, check=False).returncode


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Other arguments go on to `schemathesis run`, e.g. --max-examples 50 or "
        "--include-path-regex '^/system/activations'. The exit status is schemathesis's.",
    )
    _, schemathesis_arguments = parser.parse_known_args()
    # The stack runs in a session of its own (Ctrl-C does not reach it), so a SIGTERM must
    # end this process through the finally below, which stops the stack, not kill it outright.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    workdir = Path(tempfile.mkdtemp(prefix="faas-api-check-"))
    stack = Stack(workdir)
    try:
        stack.start()
        print(
            f"api-check: local stack up on ports shifted by {stack.offset} "
            f"(gateway {stack.gateway_url}), data in {workdir}",
            flush=True,
        )
        if stack.served_document() != DOCUMENT.read_bytes():
            # schemathesis would check the document the gateway serves, not the one here.
            print(
                f"api-check: the gateway serves another document than {DOCUMENT} "
                "(an install that is not editable? run `make install`)",
                file=sys.stderr,
            )
            return 1
        status = run_schemathesis(stack, schemathesis_arguments)
        if status != 0:
            print(f"api-check: the stack's last log lines:\n{stack.log_tail()}", file=sys.stderr)
        return status
    except StackError as exc:
        print(f"api-check: {exc}\n{stack.log_tail()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        stack.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        print(f"api-check: stack stopped, {workdir} removed", flush=True)


if __name__ == "__main__":
    sys.exit(main())
