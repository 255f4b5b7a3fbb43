"""deploy/docker-compose.yml as far as it can be checked without a Docker engine: what goes into
the image, the secrets' modes, one build, stop order and grace periods, the cluster profile.
`make compose-check` runs it for real (deploy/compose_check.py)."""

import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from faas_gateway.core.timefmt import parse_duration_s
from gateway.settings import GatewaySettings
from queue_worker.settings import WorkerSettings
from tests.harness import ROOT

COMPOSE = yaml.safe_load((ROOT / "deploy" / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
IMAGE = "faas-gateway:local"
GATEWAYS = [
    name for name, service in SERVICES.items() if service.get("command") == ["faas-gateway"]
]
WORKERS = [
    name for name, service in SERVICES.items() if service.get("command") == ["faas-queue-worker"]
]
FUNCTIONS = ["echo", "sleep", "status"]
CLUSTER_NODES = ["nats-1", "nats-2", "nats-3"]


# .dockerignore


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def pattern_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as Docker reads it (Go's filepath.Match, plus ``**`` for any
    number of directories), relative to the build context."""
    out = ""
    index = 0
    pattern = pattern.strip("/")
    while index < len(pattern):
        if pattern.startswith("**/", index):
            out += "(?:.*/)?"
            index += 3
        elif pattern.startswith("**", index):
            out += ".*"
            index += 2
        elif pattern[index] == "*":
            out += "[^/]*"
            index += 1
        elif pattern[index] == "?":
            out += "[^/]"
            index += 1
        elif pattern[index] == "[":
            end = pattern.index("]", index)
            out += pattern[index : end + 1]
            index = end + 1
        else:
            out += re.escape(pattern[index])
            index += 1
    return re.compile(out)


def excluded(path: str) -> bool:
    """Whether the build context leaves ``path`` out: a pattern matches it or a directory it
    is in (then all of it is left out). No pattern here starts with "!", so none brings a
    path back."""
    patterns = dockerignore_patterns()
    assert not any(pattern.startswith("!") for pattern in patterns)
    parts = path.split("/")
    prefixes = ["/".join(parts[: index + 1]) for index in range(len(parts))]
    return any(
        pattern_regex(pattern).fullmatch(prefix) for pattern in patterns for prefix in prefixes
    )


@pytest.mark.parametrize(
    "path",
    [
        "deploy/secrets/basic-auth-password",
        "deploy/secrets/nats-server.conf",
        ".git/config",
        ".venv/bin/python",
        ".data/secrets/basic-auth-password",
        ".data/port-offset-100/nats/jetstream/x",
        "bench/results/run.json",
        "faas_gateway/__pycache__/settings.cpython-311.pyc",
        "gateway/handlers/__pycache__/sync.cpython-311.pyc",
        ".pytest_cache/v/cache/nodeids",
        ".mypy_cache/3.11/x.json",
        ".ruff_cache/0.6/x",
        "faas_gateway.egg-info/PKG-INFO",
        "build/lib/gateway/app.py",
    ],
)
def test_dockerignore_keeps_secrets_data_history_and_caches_out_of_the_image(path):
    assert excluded(path), f".dockerignore lets {path} into the build context"


def test_dockerignore_keeps_what_the_dockerfile_copies():
    copied = []
    for line in (ROOT / "deploy" / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            copied += line.split()[1:-1]
    files = [
        path.relative_to(ROOT).as_posix()
        for source in copied
        for path in ([ROOT / source] if (ROOT / source).is_file() else (ROOT / source).rglob("*"))
        if path.is_file() and "__pycache__" not in path.parts and "secrets" not in path.parts
    ]
    assert "deploy/sample_functions.py" in files and "gateway/openapi.json" in files
    assert [path for path in files if excluded(path)] == []


def test_every_path_git_ignores_as_private_is_kept_out_of_the_image():
    """.gitignore's entries are what must never be shared; none may reach the image."""
    for line in (ROOT / ".gitignore").read_text().splitlines():
        entry = line.strip().rstrip("/")
        if entry and not entry.startswith("#"):
            sample = entry.replace("*", "x") + "/x"
            assert excluded(sample), f"{entry} is git-ignored but would go into the image"


# secrets


def run_compose_secrets(directory: Path) -> str:
    done = subprocess.run(
        [sys.executable, str(ROOT / "deploy" / "compose_secrets.py"), str(directory)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_compose_secrets_are_readable_in_the_containers_and_locked_on_the_host(tmp_path):
    """Compose mounts each secret with its host mode and owner, and the image runs as another
    uid: the files are readable by all (644) in a directory only its owner may enter (700).
    A directory made before with other modes (755, files 600) is locked first, then opened."""
    secrets = tmp_path / "secrets"
    secrets.mkdir(mode=0o755)
    (secrets / "basic-auth-password").write_text("kept-password\n")
    (secrets / "basic-auth-password").chmod(0o600)
    (secrets / "not-ours").write_text("left alone\n")
    (secrets / "not-ours").chmod(0o600)
    output = run_compose_secrets(secrets)
    assert "may be entered by its owner only" in output
    assert mode(secrets) == 0o700
    mounted = {Path(secret["file"]).name for secret in COMPOSE["secrets"].values()}
    for name in mounted:
        assert (secrets / name).is_file(), f"compose mounts {name}, which is not made"
        assert mode(secrets / name) == 0o644, name
    assert mode(secrets / "not-ours") == 0o600
    made = {path.name: path.read_text() for path in secrets.iterdir()}
    assert made["basic-auth-password"] == "kept-password\n"

    run_compose_secrets(secrets)
    assert {path.name: path.read_text() for path in secrets.iterdir()} == made


def test_the_cluster_config_includes_the_users_and_authenticates_routes(tmp_path):
    secrets = tmp_path / "secrets"
    run_compose_secrets(secrets)
    config = (secrets / "nats-cluster.conf").read_text()
    route_password = (secrets / "nats-route-password").read_text().strip()
    # The users file is mounted beside it, under its secret's name.
    [included] = re.findall(r"^include \./(\S+)$", config, re.MULTILINE)
    assert COMPOSE["secrets"][included]["file"] == "./secrets/nats-server.conf"
    assert f'authorization {{ user: "route", password: "{route_password}" }}' in config
    routes = re.findall(r'"nats-route://route:([^@]+)@([^:]+):6222"', config)
    assert routes == [(route_password, node) for node in CLUSTER_NODES]


# services


def test_the_image_is_built_once_and_every_other_service_names_it():
    builders = [name for name, service in SERVICES.items() if "build" in service]
    assert builders == ["echo"]
    ours = [name for name, service in SERVICES.items() if service.get("image") == IMAGE]
    assert set(ours) == {*GATEWAYS, *WORKERS, *FUNCTIONS}
    for name in ours:
        assert SERVICES[name]["pull_policy"] == "never", name
    for name in (*GATEWAYS, *WORKERS):
        # Named alone to `up` (the cluster's), each still has the image built first; the
        # other functions come up with them.
        assert set(builders) <= set(SERVICES[name]["depends_on"]), name


def seconds(value: str) -> float:
    return parse_duration_s(value)


@pytest.mark.parametrize("name", GATEWAYS)
def test_a_gateway_outlasts_its_drain_and_its_functions_outlive_it(name):
    """`docker compose stop`: Docker waits stop_grace_period (10 s when unset) before SIGKILL;
    the gateway's running calls, sync and turned async, may take shutdown_grace. Compose
    stops a service before what it depends on: NATS and the functions."""
    service = SERVICES[name]
    grace = GatewaySettings(**service["environment"]).shutdown_grace_s
    assert seconds(service["stop_grace_period"]) > grace
    assert {*FUNCTIONS} <= set(service["depends_on"])
    assert any(dependency.startswith("nats") for dependency in service["depends_on"])


@pytest.mark.parametrize("name", WORKERS)
def test_a_worker_outlasts_its_drain_and_its_functions_outlive_it(name):
    service = SERVICES[name]
    grace = WorkerSettings(**service["environment"]).shutdown_grace_s
    assert seconds(service["stop_grace_period"]) > grace
    assert {*FUNCTIONS} <= set(service["depends_on"])
    assert any(dependency.startswith("nats") for dependency in service["depends_on"])


def test_the_cluster_profile_runs_three_nats_servers_two_gateways_two_workers_replicas_3():
    cluster = {
        name for name, service in SERVICES.items() if "cluster" in service.get("profiles", [])
    }
    assert cluster == {*CLUSTER_NODES, "gateway-1", "gateway-2", "queue-worker-1", "queue-worker-2"}
    urls = ",".join(f"nats://{node}:4222" for node in CLUSTER_NODES)
    for name in ("gateway-1", "gateway-2", "queue-worker-1", "queue-worker-2"):
        environment = SERVICES[name]["environment"]
        assert environment["nats_url"] == urls
        assert environment["nats_stream_replicas"] == "3"
        assert set(CLUSTER_NODES) <= set(SERVICES[name]["depends_on"])
    volumes = set()
    for node in CLUSTER_NODES:
        command = SERVICES[node]["command"]
        assert command[command.index("--name") + 1] == node  # JetStream clustering needs names
        assert command[command.index("--config") + 1] == "/run/secrets/nats-cluster-conf"
        assert "--jetstream" in command
        [volume] = SERVICES[node]["volumes"]
        volumes.add(volume.split(":")[0])
        assert set(SERVICES[node]["secrets"]) == {"nats-server-conf", "nats-cluster-conf"}
    assert len(volumes) == 3  # a store each
    # The two stacks' ports on this host do not collide, so both may run at once; each may
    # be moved by a variable of its own (make compose-check moves those in use).
    published = [
        re.fullmatch(r"127\.0\.0\.1:\$\{(FAAS_\w+_PORT):-(\d+)\}:\d+", port)
        for service in SERVICES.values()
        if "profiles" not in service or "cluster" in service["profiles"]
        for port in service.get("ports", [])
    ]
    assert all(published), published
    for group in (1, 2):
        values = [match.group(group) for match in published if match]
        assert len(values) == len(set(values)) == 6


def test_compose_check_runs_in_ci_when_a_docker_daemon_answers():
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(
        r"^compose-check: compose-secrets\n\t.*deploy/compose_check\.py", makefile, re.M
    )
    ci = (ROOT / ".ci" / "run").read_text()
    assert "docker info" in ci and "make compose-check" in ci and "skipped" in ci
