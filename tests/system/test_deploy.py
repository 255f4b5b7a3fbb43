"""What a new user reads and runs: the README and docs/ (the settings table, the curl lines,
the links), the local stack, docker-compose, the sample functions. The compose file cannot run
here (no Docker engine), so it is checked against the code it configures."""

import asyncio
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from aiohttp.test_utils import TestClient, TestServer

from faas_gateway.core.functions import load_functions_file
from faas_gateway.nats.auth import GATEWAY_USER, WORKER_USER, connect_options, password_file
from faas_gateway.runtime.settings import CommonSettings, settings_table
from gateway.auth import PASSWORD_FILE, USER_FILE
from gateway.settings import GatewaySettings
from queue_worker.settings import WorkerSettings
from tests.harness import ROOT, NatsServer, connect_once, wait_until
from tests.system.test_local_stack import free_offset

sys.path.insert(0, str(ROOT / "deploy"))
import local_stack
import sample_functions

README = ROOT / "README.md"
OPERATIONS = ROOT / "docs" / "operations.md"  # the configuration table
# Every page a user reads, the README first: its curl lines come first, as a user meets them.
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
COMPOSE = yaml.safe_load((ROOT / "deploy" / "docker-compose.yml").read_text())


@pytest.mark.parametrize("settings_cls", [CommonSettings, GatewaySettings, WorkerSettings])
def test_operations_guide_documents_every_setting_with_its_default(settings_cls):
    table = OPERATIONS.read_text()
    for env, default, _ in settings_table(settings_cls):
        row = f"| `{env}` | `{default}` |"
        assert row in table, f"the configuration table in {OPERATIONS.name} lacks {row}"


def test_the_readme_is_a_five_minute_read():
    lines = README.read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; reference goes to docs/"


def github_anchor(heading: str) -> str:
    """The id GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.MULTILINE | re.DOTALL)
    found: set[str] = set()
    for heading in re.findall(r"^#+ (.+)$", text, re.MULTILINE):
        anchor, n = github_anchor(heading), 1
        while anchor in found:  # a repeated heading gets -1, -2, ...
            anchor, n = f"{github_anchor(heading)}-{n}", n + 1
        found.add(anchor)
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_every_link_between_the_pages_leads_somewhere(page):
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.MULTILINE | re.DOTALL)
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    local = [link for link in links if not re.match(r"[a-z]+:", link)]
    for link in local:
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        assert target.exists(), f"{page.name}: {link} leads to no file"
        if anchor:
            assert anchor in anchors(target), f"{page.name}: {link} leads to no heading"


def env_names(settings_cls) -> set[str]:
    return {env for env, _, _ in settings_table(settings_cls)}


def test_compose_services_use_only_real_settings_and_commands():
    services = {
        name: service
        for name, service in COMPOSE["services"].items()
        if "profiles" not in service  # the optional ones: see test_compose_monitoring_profile
    }
    assert set(services) == {"nats", "gateway", "queue-worker", "echo", "sleep", "status"}
    for name, settings_cls in (("gateway", GatewaySettings), ("queue-worker", WorkerSettings)):
        unknown = set(services[name]["environment"]) - env_names(settings_cls)
        assert not unknown, f"{name} sets unknown settings {unknown}"
        # The values must parse as the settings they configure.
        settings_cls(**{k: str(v) for k, v in services[name]["environment"].items()})
    assert services["gateway"]["command"] == ["faas-gateway"]
    assert services["queue-worker"]["command"] == ["faas-queue-worker"]
    for function in ("echo", "sleep", "status"):
        command = services[function]["command"]
        assert command[:3] == ["python", "deploy/sample_functions.py", function]
    assert "--jetstream" in services["nats"]["command"]
    # Basic auth from Docker secrets, named as the gateway reads them (make compose-secrets).
    assert services["gateway"]["environment"]["basic_auth"] == "true"
    mount = Path(services["gateway"]["environment"]["secret_mount_path"])
    assert mount == Path("/run/secrets")  # where compose mounts secrets
    assert services["gateway"]["secrets"][:2] == [USER_FILE, PASSWORD_FILE]
    for name in (USER_FILE, PASSWORD_FILE):
        assert COMPOSE["secrets"][name]["file"] == f"./secrets/{name}"
    assert "deploy/compose_secrets.py deploy/secrets" in (ROOT / "Makefile").read_text()


def mounted_secret_file(service: dict, mount: str) -> Path:
    """The host file behind a path under /run/secrets that ``service`` is given."""
    name = Path(mount).relative_to("/run/secrets").as_posix()
    assert name in service["secrets"], f"{name} is not given to the service"
    return Path(COMPOSE["secrets"][name]["file"])


def test_compose_nats_has_users_and_no_function_container_reaches_it():
    services = COMPOSE["services"]
    command = services["nats"]["command"]
    config = mounted_secret_file(services["nats"], command[command.index("--config") + 1])
    assert config == Path("secrets/nats-server.conf")
    for name, user in (("gateway", GATEWAY_USER), ("queue-worker", WORKER_USER)):
        env = services[name]["environment"]
        assert {key: env[key] for key in ("nats_user", "nats_inbox_prefix")} == {
            "nats_user": user,
            "nats_inbox_prefix": f"_INBOX.{user}",
        }
        password = mounted_secret_file(services[name], env["nats_password_file"])
        assert password == password_file(Path("secrets"), user)
    # make compose-secrets writes the files the secrets name (tests/system/test_compose.py).
    makefile = (ROOT / "Makefile").read_text()
    assert "deploy/compose_secrets.py deploy/secrets" in makefile

    # Every service names its networks (none falls into "default" beside NATS); only the
    # gateway and the worker share one with NATS, and they share one with each function.
    networks = {name: set(service["networks"]) for name, service in services.items()}
    assert set(COMPOSE["networks"]) == set().union(*networks.values())
    with_nats = {name for name, nets in networks.items() if nets & networks["nats"]}
    assert with_nats == {"nats", "gateway", "queue-worker"} | {
        name for name in services if re.fullmatch(r"(nats|gateway|queue-worker)-\d", name)
    }  # and the cluster profile's
    for function in ("echo", "sleep", "status"):
        assert networks[function] & networks["gateway"] & networks["queue-worker"]
    for monitored in ("gateway", "queue-worker"):
        assert networks["prometheus"] & networks[monitored]


async def test_compose_secrets_config_lets_in_exactly_its_users(tmp_path):
    """`make compose-secrets` without Docker: the files it writes, given to a real
    nats-server as compose gives them, let the users in with the settings compose sets."""
    secrets = tmp_path / "secrets"
    run = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "faas_gateway.nats.auth",
        str(secrets),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await run.communicate()
    assert run.returncode == 0, out.decode()
    passwords = {
        user: password_file(secrets, user).read_text() for user in (GATEWAY_USER, WORKER_USER)
    }
    server = NatsServer(tmp_path / "store", config_file=secrets / "nats-server.conf")
    await server.start()
    try:
        assert "Authorization Violation" in await connect_once(server.url)
        for name in ("gateway", "queue-worker"):
            env = COMPOSE["services"][name]["environment"]
            settings = CommonSettings(
                nats_url=server.url,
                nats_user=env["nats_user"],
                nats_password_file=str(password_file(secrets, env["nats_user"])),
                nats_inbox_prefix=env["nats_inbox_prefix"],
            )
            assert await connect_once(server.url, **connect_options(settings)) == ""
    finally:
        server.kill()
    # Run again: the passwords are kept.
    run = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "faas_gateway.nats.auth", str(secrets)
    )
    assert await run.wait() == 0
    for user, password in passwords.items():
        assert password_file(secrets, user).read_text() == password


def scrape_targets(config_path: Path) -> dict[str, list[str]]:
    config = yaml.safe_load(config_path.read_text())
    return {
        job["job_name"]: [
            target for static in job["static_configs"] for target in static["targets"]
        ]
        for job in config["scrape_configs"]
    }


def test_prometheus_config_scrapes_the_local_stack_ports():
    gateway_port = GatewaySettings.model_fields["gateway_port"].default
    worker_port = WorkerSettings.model_fields["worker_port"].default
    assert (gateway_port, worker_port) == (local_stack.GATEWAY_PORT, local_stack.WORKER_PORT)
    assert scrape_targets(ROOT / "deploy" / "prometheus.yml") == {
        "faas-gateway": [f"127.0.0.1:{gateway_port}"],
        "faas-queue-worker": [f"127.0.0.1:{worker_port}"],
    }


def test_compose_monitoring_profile():
    """Prometheus scrapes the compose services on the ports they listen on; Grafana gets
    Prometheus as its data source and the dashboard where its provider looks."""
    services = COMPOSE["services"]
    monitoring = {
        name for name, service in services.items() if "monitoring" in service.get("profiles", [])
    }
    assert monitoring == {"prometheus", "grafana"}
    for name in monitoring:
        assert services[name]["profiles"] == ["monitoring"]
    mounts = {
        name: dict(volume.rsplit(":", 2)[:2] for volume in services[name]["volumes"])
        for name in monitoring
    }
    for name in monitoring:
        for source in mounts[name]:
            assert (ROOT / "deploy" / source).exists(), f"{name} mounts missing {source}"

    config_source = next(
        source
        for source, target in mounts["prometheus"].items()
        if target == "/etc/prometheus/prometheus.yml"
    )
    targets = scrape_targets(ROOT / "deploy" / config_source)
    gateway_port = services["gateway"]["environment"]["gateway_port"]
    worker_port = services["queue-worker"]["environment"]["worker_port"]
    assert targets == {
        "faas-gateway": [f"gateway:{gateway_port}"],
        "faas-queue-worker": [f"queue-worker:{worker_port}"],
    }
    assert services["queue-worker"]["environment"]["worker_host"] == "0.0.0.0"

    provisioning = ROOT / "deploy" / "grafana" / "provisioning"
    assert mounts["grafana"]["./grafana/provisioning"] == "/etc/grafana/provisioning"
    [datasource] = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())[
        "datasources"
    ]
    assert datasource["url"] == "http://prometheus:9090"
    assert "127.0.0.1:9090:9090" in services["prometheus"]["ports"]
    [provider] = yaml.safe_load((provisioning / "dashboards" / "faas.yml").read_text())["providers"]
    dashboard_target = mounts["grafana"]["./grafana/dashboard.json"]
    assert Path(dashboard_target).parent == Path(provider["options"]["path"])
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == dashboard_target


def test_compose_functions_file_points_at_compose_services():
    path = COMPOSE["services"]["gateway"]["environment"]["functions_file"]
    assert path.startswith("/app/")
    registry = load_functions_file(ROOT / path.removeprefix("/app/"))
    for function in registry:
        host = function.url.split("//", 1)[1].split(":", 1)[0]
        assert host in COMPOSE["services"], f"{function.name} points at unknown host {host}"


def test_dockerfile_copies_what_exists():
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    [build] = [service["build"] for service in COMPOSE["services"].values() if "build" in service]
    assert (ROOT / "deploy" / Path(build["dockerfile"]).name).exists()
    for line in dockerfile.splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), f"Dockerfile copies missing {source}"


def test_local_functions_file_registers_the_three_samples():
    registry = load_functions_file(ROOT / "deploy" / "functions.yml")
    assert {function.name for function in registry} == {"echo", "sleep", "status"}


async def sample_client(name: str) -> TestClient:
    client = TestClient(TestServer(sample_functions.build_app(name)))
    await client.start_server()
    return client


async def test_sample_echo_returns_body_and_content_type():
    client = await sample_client("echo")
    try:
        response = await client.post(
            "/any/path", data=b"hi there", headers={"Content-Type": "text/x-demo"}
        )
        assert response.status == 200
        assert response.headers["Content-Type"] == "text/x-demo"
        assert await response.read() == b"hi there"
    finally:
        await client.close()


async def test_sample_sleep_and_status():
    sleeper = await sample_client("sleep")
    status = await sample_client("status")
    try:
        response = await sleeper.get("/?seconds=0.05")
        assert response.status == 200
        assert await response.json() == {"slept": 0.05}
        assert (await sleeper.get("/?seconds=-1")).status == 400
        assert (await sleeper.get("/?seconds=soon")).status == 400
        response = await status.get("/?code=418")
        assert response.status == 418
        assert await response.json() == {"status": 418}
        assert (await status.get("/")).status == 200
        assert (await status.get("/?code=204")).status == 204
        assert (await status.get("/?code=99")).status == 400
    finally:
        await sleeper.close()
        await status.close()


def test_local_stack_gives_nats_users_unless_told_not_to(tmp_path, monkeypatch):
    """`make run` starts nats-server with the users' config and gives the gateway and the
    worker their credentials; --no-nats-auth (not --no-auth, which is about Basic auth)
    runs NATS open."""
    monkeypatch.setattr(sys, "argv", ["local_stack.py", "--no-auth"])
    assert local_stack.parse_layout().nats_auth
    monkeypatch.setattr(sys, "argv", ["local_stack.py", "--no-nats-auth"])
    layout = local_stack.parse_layout()
    assert layout.basic_auth and not layout.nats_auth

    stack = {s.name: s for s in local_stack.services(local_stack.Layout(tmp_path / "a", 0))}
    argv = stack["nats"].argv
    config = Path(argv[argv.index("--config") + 1])
    for name, user in (("gateway", GATEWAY_USER), ("worker", WORKER_USER)):
        env = stack[name].env
        assert env["nats_user"] == user
        password = Path(env["nats_password_file"]).read_text().strip()
        assert f'user: "{user}"' in config.read_text()
        assert f'password: "{password}"' in config.read_text()
        assert env["nats_inbox_prefix"] == f"_INBOX.{user}"

    open_stack = {
        s.name: s
        for s in local_stack.services(local_stack.Layout(tmp_path / "b", 0, nats_auth=False))
    }
    assert "--config" not in open_stack["nats"].argv
    for name in ("gateway", "worker"):
        assert not any(key.startswith("nats_user") for key in open_stack[name].env)


def test_a_stack_beside_the_first_keeps_its_own_data(monkeypatch):
    """`make run ARGS="--port-offset 100"` beside `make run`: two nats-servers on one JetStream
    store would corrupt it, so a shifted stack keeps its data apart unless told where."""

    def layout(*args: str) -> local_stack.Layout:
        monkeypatch.setattr(sys, "argv", ["local_stack.py", *args])
        return local_stack.parse_layout()

    data = local_stack.ROOT / ".data"
    assert layout().data_dir == data
    assert layout("--port-offset", "100").data_dir == data / "port-offset-100"
    assert layout("--port-offset", "100").port(local_stack.GATEWAY_PORT) == 8180
    elsewhere = layout("--port-offset", "100", "--data-dir", "/tmp/stack-b")
    assert elsewhere.data_dir == Path("/tmp/stack-b")


@pytest.mark.parametrize(
    ("target", "command"),
    [
        ("run", "deploy/local_stack.py"),
        ("test", "-m pytest"),
        ("api-check", "deploy/api_check.py"),
        ("bench", "-m bench"),
        ("bench-quick", "-m bench --quick"),
    ],
)
def test_make_passes_args_on(target, command):
    """The documented `make run ARGS="--port-offset 100"` (and test, api-check, bench) reaches the
    command with its arguments as given; `make -n` prints the commands without running them."""
    run = subprocess.run(
        ["make", "-n", "--no-print-directory", target, "ARGS=--port-offset 100 --no-auth"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    last = run.stdout.splitlines()[-1]
    assert last.endswith(f"{command} --port-offset 100 --no-auth"), run.stdout


def console_examples() -> list[tuple[str, str]]:
    """(command, first line of output) for every `$` line of the README and docs/, in order."""
    examples = []
    for page in PAGES:
        lines = page.read_text().splitlines()
        for index, line in enumerate(lines):
            if line.startswith("$ "):
                # Every command shown this way is run below, so each must be one it can run.
                assert line.startswith("$ curl "), f"{page.name}: the test cannot run {line}"
                examples.append((line[2:], lines[index + 1]))
    return examples


async def test_make_run_stack_answers_the_curl_lines_of_the_readme_and_docs(tmp_path):
    """The stack `make run` starts (deploy/local_stack.py), on shifted ports, with the curl
    lines of the README and docs/ run as printed but for the port numbers."""
    offset = free_offset()
    stack = await asyncio.create_subprocess_exec(
        sys.executable,
        str(ROOT / "deploy" / "local_stack.py"),
        "--port-offset",
        str(offset),
        "--data-dir",
        str(tmp_path / "data"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output = bytearray()

    async def collect() -> None:
        assert stack.stdout is not None
        while chunk := await stack.stdout.read(4096):
            output.extend(chunk)

    collector = asyncio.create_task(collect())
    try:
        await wait_until(
            lambda: b"stack is up" in output or stack.returncode is not None, 60, "the stack"
        )
        assert b"stack is up" in output, output.decode(errors="replace")
        await wait_until(lambda: b"basic-auth-password in" in output, 10, "where the creds are")
        secrets = tmp_path / "data" / "secrets"
        assert f"in {secrets}".encode() in output
        assert (secrets / "basic-auth-user").read_text().strip() == "admin"
        assert len((secrets / "basic-auth-password").read_text().strip()) >= 24
        await wait_until(lambda: b"NATS needs credentials" in output, 10, "the NATS creds")
        for user in (GATEWAY_USER, WORKER_USER):
            password = password_file(secrets, user)
            assert password.name.encode() in output
            assert password.stat().st_mode & 0o777 == 0o600
        # The stack's NATS lets in its gateway and worker (they answer below) and no one else.
        nats_url = f"nats://127.0.0.1:{local_stack.NATS_PORT + offset}"
        assert "Authorization Violation" in await connect_once(nats_url)

        def shifted(text: str) -> str:
            return re.sub(
                r"127\.0\.0\.1:(\d+)", lambda m: f"127.0.0.1:{int(m.group(1)) + offset}", text
            )

        examples = console_examples()
        assert len(examples) >= 6
        for command, expected_first_line in examples:
            # Through a shell, as a user runs it: the credentials come from $(cat ...), and
            # the output may go through a pipe.
            in_this_stack = shifted(command).replace(".data/", f"{tmp_path / 'data'}/")
            in_this_stack = in_this_stack.replace("curl ", "curl -sS --max-time 20 ", 1)
            process = await asyncio.create_subprocess_shell(
                in_this_stack,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            out, err = await process.communicate()
            assert process.returncode == 0, f"{command}: {err.decode()}"
            assert out.decode().splitlines()[0].strip() == expected_first_line, command

        # The README's async example posts its callback to the echo function: it shows in the log.
        await wait_until(
            lambda: b"X-Function-Name=sleep X-Function-Status=200" in output, 30, "the callback"
        )
    finally:
        if stack.returncode is None:
            stack.send_signal(signal.SIGINT)
        await asyncio.wait_for(stack.wait(), 60)
        await collector
    text = output.decode(errors="replace")
    assert stack.returncode == 0, text[-3000:]
    assert "stopped" in text.splitlines()[-1]
    for name in ("nats", "gateway", "worker", "echo", "sleep", "status"):
        assert re.search(rf"^{name}\s+\| ", text, re.MULTILINE), f"no prefixed lines from {name}"
    assert "calls complete" in text  # the worker drained rather than being killed
