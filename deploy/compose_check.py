"""deploy/docker-compose.yml for real, on the local Docker engine: `make compose-check`.

First `docker compose config` for every profile. Then, for the stack (no profile) and for the
cluster profile's stack (three NATS servers, two gateways, two workers), one after the other
under a project name of their own: `up --build` on the local images; every service up, and
still up later (no restarts); the image holds no secret; a sync call and an async call with
a callback to the echo service through every gateway, each record read through every
gateway; /system/* refused without the credentials and answered with those of
deploy/secrets; then `docker compose stop` with a 20 s sync call and a 20 s async call in
flight: the sync call gets its answer, and once the stack is started again the async call is
recorded done after one attempt, run and called back once; last `down -v`, also when a
step failed. Needs `make compose-secrets` first (the make target does it).
"""

import argparse
import base64
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "deploy" / "docker-compose.yml"
SECRETS = ROOT / "deploy" / "secrets"
IMAGE = "faas-gateway:local"
PROFILES = ("", "monitoring", "cluster")
START_TIMEOUT_S = 300
CALL_TIMEOUT_S = 60.0
IN_FLIGHT_S = 20
POLL_S = 0.25
LOG_TAIL_LINES = 60

T = TypeVar("T")


@dataclass(frozen=True)
class Stack:
    name: str
    profile: str  # "" for none
    targets: tuple[str, ...]  # services named to `up` (with their dependencies); () for all
    services: frozenset[str]  # every service that must run
    # The variables that place the stack's ports on this host, with their defaults; the
    # gateways' first. A default in use (another program on 8080, say) is moved.
    ports: dict[str, int]
    nats_nodes: tuple[str, ...] = ()  # a cluster's NATS servers, with the replicas expected

    @property
    def gateways(self) -> tuple[str, ...]:
        """The gateways' URLs on this host, as placed by ``place_ports``."""
        return tuple(
            f"http://127.0.0.1:{os.environ[name]}"
            for name in self.ports
            if name.startswith("FAAS_GATEWAY")
        )

    @property
    def project(self) -> str:
        return f"faas-compose-check-{self.name}"

    def compose(self, *args: str) -> list[str]:
        profile = ["--profile", self.profile] if self.profile else []
        return ["docker", "compose", "-p", self.project, "-f", str(COMPOSE_FILE), *profile, *args]


FUNCTIONS = frozenset({"echo", "sleep", "status"})
STACKS = {
    "single": Stack(
        "single",
        "",
        (),
        FUNCTIONS | {"nats", "gateway", "queue-worker"},
        {"FAAS_GATEWAY_PORT": 8080, "FAAS_WORKER_PORT": 8081},
    ),
    "cluster": Stack(
        "cluster",
        "cluster",
        ("gateway-1", "gateway-2", "queue-worker-1", "queue-worker-2"),
        FUNCTIONS
        | {"nats-1", "nats-2", "nats-3", "gateway-1", "gateway-2"}
        | {"queue-worker-1", "queue-worker-2"},
        {
            "FAAS_GATEWAY_1_PORT": 8180,
            "FAAS_GATEWAY_2_PORT": 8280,
            "FAAS_WORKER_1_PORT": 8181,
            "FAAS_WORKER_2_PORT": 8281,
        },
        ("nats-1", "nats-2", "nats-3"),
    ),
}
# Every stream the processes make (faas_gateway/nats/provision.py), with the default names.
STREAMS = frozenset(
    {
        "faas-async",
        "KV_faas-activations",
        "OBJ_faas-activations-results",
        "faas-activations-index",
        "faas-dead-letters",
        "KV_faas-cancellations",
        "KV_faas-functions",
    }
)


class CheckFailed(Exception):
    pass


def say(stack: str, text: str) -> None:
    print(f"compose-check [{stack}]: {text}", flush=True)


def run(argv: list[str], *, check: bool = True, stdin: str | None = None) -> str:
    """Run a command; its output (stdout and stderr); CheckFailed when it fails and ``check``."""
    env = {**os.environ, "COMPOSE_BAKE": "false"}  # the classic builder: no buildx here
    done = subprocess.run(
        argv, cwd=ROOT, env=env, input=stdin, capture_output=True, text=True, check=False
    )
    output = done.stdout + done.stderr
    if check and done.returncode != 0:
        raise CheckFailed(f"`{' '.join(argv)}` exited with {done.returncode}:\n{output[-3000:]}")
    return output


# HTTP


@dataclass
class Answer:
    status: int
    body: bytes
    seconds: float
    headers: dict[str, str] = field(default_factory=dict)

    def json(self) -> object:
        return json.loads(self.body)


def call(
    method: str,
    url: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    *,
    auth: bool = False,
    timeout_s: float = CALL_TIMEOUT_S,
) -> Answer:
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    if auth:
        user = (SECRETS / "basic-auth-user").read_text().strip()
        password = (SECRETS / "basic-auth-password").read_text().strip()
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    started = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return Answer(
                response.status,
                response.read(),
                time.monotonic() - started,
                dict(response.headers),
            )
    except urllib.error.HTTPError as error:
        return Answer(error.code, error.read(), time.monotonic() - started, dict(error.headers))


def expect(answer: Answer, status: int, what: str) -> Answer:
    if answer.status != status:
        raise CheckFailed(f"{what}: {answer.status} {answer.body[:300]!r}, expected {status}")
    return answer


def wait_for(condition: Callable[[], T], timeout_s: float, what: str) -> T:
    deadline = time.monotonic() + timeout_s
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise CheckFailed(f"timed out after {timeout_s:g}s waiting for {what}")
        time.sleep(POLL_S)


# the stack's containers


@dataclass(frozen=True)
class Container:
    service: str
    id: str
    state: str
    restarts: int
    started_at: str
    health: str


def containers(stack: Stack) -> dict[str, Container]:
    ids = run(stack.compose("ps", "-a", "-q")).split()
    if not ids:
        return {}
    found: dict[str, Container] = {}
    for info in json.loads(run(["docker", "inspect", *ids])):
        service = info["Config"]["Labels"]["com.docker.compose.service"]
        if service in found:
            raise CheckFailed(f"two containers of {service}")
        state = info["State"]
        found[service] = Container(
            service,
            info["Id"][:12],
            state["Status"],
            int(info["RestartCount"]),
            state["StartedAt"],
            (state.get("Health") or {}).get("Status", "none"),
        )
    return found


def check_all_up(stack: Stack, since: dict[str, Container] | None = None) -> dict[str, Container]:
    """Every service runs, none restarted by its restart policy, and (given the containers as
    they were) none started anew since."""
    now = containers(stack)
    if set(now) != stack.services:
        raise CheckFailed(f"services {sorted(now)}, expected {sorted(stack.services)}")
    for container in now.values():
        if container.state != "running" or container.restarts:
            raise CheckFailed(
                f"{container.service} is {container.state} after {container.restarts} restarts"
            )
        if since is not None and since[container.service].started_at != container.started_at:
            raise CheckFailed(f"{container.service} was started again")
        if container.health not in ("healthy", "none"):
            raise CheckFailed(f"{container.service} is {container.health}")
    return now


def logs(stack: Stack, service: str) -> str:
    return run(stack.compose("logs", "--no-color", "--no-log-prefix", service))


def place_ports(stack: Stack) -> None:
    """Each port variable of the stack in the environment of the compose commands: its
    default when that is free on 127.0.0.1, else a free port."""
    for name, default in stack.ports.items():
        port = default if port_free(default) else free_port()
        os.environ[name] = str(port)
        if port != default:
            say(stack.name, f"{default} is in use on 127.0.0.1: {name}={port}")


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# the checks


def check_configs() -> None:
    for profile in PROFILES:
        run(
            [
                "docker",
                "compose",
                "-f",
                str(COMPOSE_FILE),
                *(["--profile", profile] if profile else []),
                "config",
                "--quiet",
            ]
        )
        shown = f"--profile {profile}" if profile else "no profile"
        say("config", f"docker compose config passes with {shown}")


def check_image_holds_no_secret(stack: Stack) -> None:
    """No file of the image holds a value of deploy/secrets (.dockerignore keeps it out)."""
    values = [
        path.read_text().strip()
        for path in sorted(SECRETS.iterdir())
        if path.is_file() and "password" in path.name
    ]
    found = run(
        [
            *("docker", "run", "-i", "--rm", "--user", "0", "--entrypoint", "sh", IMAGE, "-c"),
            "grep -rlFf - / --exclude-dir=proc --exclude-dir=sys --exclude-dir=dev; echo $?",
        ],
        stdin="\n".join(values) + "\n",
        check=False,
    ).split()
    if found[-1:] != ["1"]:  # grep: 1 is "nothing found"
        raise CheckFailed(f"the image holds secrets of deploy/secrets: {found}")
    say(stack.name, f"the image holds none of the {len(values)} passwords of deploy/secrets")


def record(gateway: str, call_id: str) -> dict[str, object]:
    answer = call("GET", f"{gateway}/system/activations/{call_id}", auth=True)
    if answer.status != 200:
        return {}
    body = answer.json()
    assert isinstance(body, dict)
    return body


def wait_for_status(gateway: str, call_id: str, status: str) -> None:
    wait_for(
        lambda: record(gateway, call_id).get("status") == status,
        CALL_TIMEOUT_S,
        f"call {call_id} to be {status}",
    )


def wait_for_log(stack: Stack, service: str, line: str) -> None:
    wait_for(lambda: line in logs(stack, service), CALL_TIMEOUT_S, f"{service} to log {line}")


def jsz(stack: Stack, node: str) -> dict[str, Any]:
    """A NATS server's JetStream report, from its monitoring port (8222), which only the NATS
    network reaches: read through a gateway."""
    script = (
        "import sys, urllib.request; sys.stdout.write(urllib.request.urlopen("
        f"'http://{node}:8222/jsz?accounts=true&streams=true&config=true'"
        ").read().decode())"
    )
    report = json.loads(run(stack.compose("exec", "-T", stack.targets[0], "python", "-c", script)))
    assert isinstance(report, dict)
    return report


def check_replicas(stack: Stack) -> None:
    """A cluster: one JetStream meta group of all its servers, and every stream (and the
    buckets' and object store's) with a replica on each, all current as its leader sees it."""
    nodes = sorted(stack.nats_nodes)
    led: dict[str, str] = {}
    for node in nodes:
        report = jsz(stack, node)
        meta = report.get("meta_cluster", {})
        if meta.get("cluster_size") != len(nodes):
            raise CheckFailed(f"JetStream meta group as {node} sees it: {meta}")
        streams = {
            detail["name"]: detail
            for account in report.get("account_details", [])
            for detail in account.get("stream_detail", [])
        }
        if set(streams) != STREAMS:
            raise CheckFailed(f"{node} has streams {sorted(streams)}, expected {sorted(STREAMS)}")
        for name, detail in streams.items():
            cluster = detail.get("cluster", {})
            others = [peer["name"] for peer in cluster.get("replicas", [])]
            if detail["config"]["num_replicas"] != len(nodes) or sorted([node, *others]) != nodes:
                raise CheckFailed(f"{name} as {node} sees it: {detail['config']}, {cluster}")
            if cluster.get("leader") == node:
                if not all(peer.get("current") for peer in cluster["replicas"]):
                    raise CheckFailed(f"{name}: a replica is behind its leader {node}: {cluster}")
                led[name] = node
    if set(led) != STREAMS:
        raise CheckFailed(f"streams without a leader: {sorted(STREAMS - set(led))}")
    say(
        stack.name,
        f"JetStream clustered on {', '.join(nodes)}: {len(led)} streams, buckets and object "
        f"stores with {len(nodes)} replicas each, all current (leaders: "
        + ", ".join(f"{name} on {node}" for name, node in sorted(led.items()))
        + ")",
    )


def check_calls(stack: Stack) -> None:
    for gateway in stack.gateways:
        text = f"sync through {gateway}".encode()
        answer = expect(call("POST", f"{gateway}/function/echo", text), 200, "sync call")
        if answer.body != text:
            raise CheckFailed(f"sync call: {answer.body!r}, expected {text!r}")
        say(stack.name, f"sync call through {gateway}: 200 in {answer.seconds:.3f}s, echoed")

        expect(call("GET", f"{gateway}/system/functions"), 401, "/system/* without credentials")
        listed = expect(
            call("GET", f"{gateway}/system/functions", auth=True), 200, "/system/functions"
        ).json()
        assert isinstance(listed, list)
        names = sorted(function["name"] for function in listed)
        if not set(names) >= FUNCTIONS:
            raise CheckFailed(f"/system/functions lists {names}")
        say(stack.name, f"/system/functions: 401 without credentials, {names} with them")

    for gateway in stack.gateways:
        answer = expect(
            call(
                "POST",
                f"{gateway}/async-function/echo",
                b"async",
                {"X-Callback-Url": f"http://echo:8080/callback/{stack.name}"},
            ),
            202,
            "async call",
        )
        payload = answer.json()
        assert isinstance(payload, dict)
        call_id = str(payload["callId"])
        wait_for_status(gateway, call_id, "succeeded")
        wait_for_log(
            stack,
            "echo",
            f"POST /callback/{stack.name} -> 200 X-Call-Id={call_id} "
            "X-Function-Name=echo X-Function-Status=200",
        )
        for other in stack.gateways:
            if record(other, call_id).get("status") != "succeeded":
                raise CheckFailed(f"record {call_id} not readable through {other}")
        say(
            stack.name,
            f"async call {call_id} through {gateway}: 202, succeeded, called back at echo, "
            f"its record read through {len(stack.gateways)} gateway(s)",
        )


def sleep_call_started(gateway: str) -> bool:
    metrics = call("GET", f"{gateway}/metrics").body.decode()
    found = re.search(
        r'^gateway_function_invocation_started\{function_name="sleep"\} (\S+)$',
        metrics,
        re.MULTILINE,
    )
    return found is not None and float(found.group(1)) >= 1


def check_stop_with_calls_in_flight(stack: Stack) -> None:
    sync_gateway, async_gateway = stack.gateways[0], stack.gateways[-1]
    answers: list[Answer] = []
    sync_call = threading.Thread(
        target=lambda: answers.append(
            call(
                "GET",
                f"{sync_gateway}/function/sleep?seconds={IN_FLIGHT_S}",
                timeout_s=IN_FLIGHT_S + 120,
            )
        )
    )
    sync_call.start()
    payload = expect(
        call(
            "POST",
            f"{async_gateway}/async-function/sleep?seconds={IN_FLIGHT_S}",
            b"",
            {"X-Callback-Url": f"http://echo:8080/callback/{stack.name}/stopped"},
        ),
        202,
        "async call",
    ).json()
    assert isinstance(payload, dict)
    call_id = str(payload["callId"])
    wait_for(lambda: sleep_call_started(sync_gateway), CALL_TIMEOUT_S, "the sync call to start")
    wait_for_status(async_gateway, call_id, "running")
    say(stack.name, f"a {IN_FLIGHT_S}s sync call and a {IN_FLIGHT_S}s async call run; stopping")
    started = time.monotonic()
    run(stack.compose("stop"))
    stopped_s = time.monotonic() - started
    sync_call.join(timeout=IN_FLIGHT_S + 130)
    if not answers:
        raise CheckFailed("the sync call in flight got no answer")
    answer = expect(answers[0], 200, "the sync call in flight")
    if answer.json() != {"slept": float(IN_FLIGHT_S)}:
        raise CheckFailed(f"the sync call in flight: {answer.body!r}")
    say(
        stack.name,
        f"docker compose stop took {stopped_s:.1f}s; the sync call in flight completed: "
        f"200 {answer.body.decode().strip()} after {answer.seconds:.1f}s",
    )

    start(stack)
    done = record(async_gateway, call_id)
    if done.get("status") != "succeeded" or done.get("attempts") != 1:
        raise CheckFailed(f"the async call in flight: {done}")
    runs = logs(stack, "sleep").count(f"X-Call-Id={call_id}")
    callbacks = logs(stack, "echo").count(f"X-Call-Id={call_id} X-Function-Name=sleep")
    if (runs, callbacks) != (1, 1):
        raise CheckFailed(f"the async call in flight ran {runs} times, called back {callbacks}")
    say(
        stack.name,
        f"started again: the async call in flight {call_id} is succeeded after 1 attempt, "
        "ran once, called back once",
    )


def start(stack: Stack) -> None:
    run(stack.compose("up", "-d", "--wait", "--wait-timeout", str(START_TIMEOUT_S), *stack.targets))


def check_stack(stack: Stack) -> None:
    place_ports(stack)
    started = time.monotonic()
    run(
        stack.compose(
            "up", "-d", "--build", "--wait", "--wait-timeout", str(START_TIMEOUT_S), *stack.targets
        )
    )
    first = check_all_up(stack)
    say(
        stack.name,
        f"up --build in {time.monotonic() - started:.0f}s: {len(first)} services running "
        f"({', '.join(sorted(first))})",
    )
    check_image_holds_no_secret(stack)
    check_calls(stack)
    if stack.nats_nodes:
        check_replicas(stack)
    check_all_up(stack, since=first)
    say(stack.name, "every service still up, none restarted")
    check_stop_with_calls_in_flight(stack)
    check_all_up(stack)
    say(stack.name, "every service up again, none restarted")


def tear_down(stack: Stack) -> bool:
    run(stack.compose("down", "-v", "--remove-orphans", "--timeout", "10"), check=False)
    left = run(stack.compose("ps", "-a", "-q"), check=False).split()
    left += run(["docker", "volume", "ls", "-q", "--filter", f"name={stack.project}_"]).split()
    if left:
        print(f"compose-check [{stack.name}]: left after down -v: {left}", file=sys.stderr)
        return False
    say(stack.name, "down -v: containers, networks and volumes removed")
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--stack",
        action="append",
        choices=sorted(STACKS),
        help="check only this stack (repeatable); default: all",
    )
    args = parser.parse_args()
    if run(["docker", "info"], check=False).count("Server Version") == 0:
        print("compose-check: no Docker daemon answers (docker info)", file=sys.stderr)
        return 1
    try:
        check_configs()
    except CheckFailed as failure:
        print(f"compose-check: FAILED: {failure}", file=sys.stderr)
        return 1
    for name in args.stack or list(STACKS):
        stack = STACKS[name]
        try:
            check_stack(stack)
        except CheckFailed as failure:
            print(f"compose-check [{name}]: FAILED: {failure}", file=sys.stderr)
            tail = stack.compose("logs", "--no-color", "--tail", str(LOG_TAIL_LINES))
            print(run(tail, check=False))
            tear_down(stack)
            return 1
        if not tear_down(stack):
            return 1
    print(f"compose-check: passed ({', '.join(args.stack or list(STACKS))})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
