"""The secrets deploy/docker-compose.yml reads, in deploy/secrets: `make compose-secrets`.

Basic auth credentials for the gateways, passwords of the NATS users gateway and worker and
of the routes between the cluster profile's NATS servers (all made once and kept), and the
nats-server configs with those users and routes (written anew, for the settings in the
environment).

Compose bind-mounts a file secret into /run/secrets with the owner and mode it has on the host
(it ignores uid and mode for file secrets), and the image runs as uid 10001, so a file only its
owner may read (600) cannot be read in the container. Here the directory is the lock: only its
owner may enter it (700), and the files in it are readable by all (644), which inside the
directory means by the owner and, through compose's mounts, by the containers.
"""

import argparse
import os
import secrets
import stat
import sys
from pathlib import Path

from faas_gateway.nats.auth import write_stack_files
from faas_gateway.runtime.settings import CommonSettings

DIRECTORY_MODE = 0o700
FILE_MODE = 0o644
USER_FILE = "basic-auth-user"
PASSWORD_FILE = "basic-auth-password"
ROUTE_PASSWORD_FILE = "nats-route-password"
SERVER_CONFIG = "nats-server.conf"
CLUSTER_CONFIG = "nats-cluster.conf"
# The cluster profile's NATS services, as deploy/docker-compose.yml names them.
CLUSTER_NODES = ("nats-1", "nats-2", "nats-3")
ROUTE_USER = "route"
ROUTE_PORT = 6222


def lock_directory(directory: Path) -> None:
    """The directory, made or kept, that only its owner may enter: before any file is made
    readable in it."""
    directory.mkdir(mode=DIRECTORY_MODE, parents=True, exist_ok=True)
    directory.chmod(DIRECTORY_MODE)


def kept_secret(path: Path, make: str) -> str:
    """The file's content, or ``make`` written to it first when it is missing or empty."""
    existing = path.read_text().strip() if path.exists() else ""
    if existing:
        return existing
    path.write_text(make + "\n")
    return make


def cluster_config(route_password: str) -> str:
    """nats-server config of the cluster profile's servers: the users of nats-server.conf
    (mounted beside it as nats-server-conf), and routes that sign in with their own password.
    Each server is given its name (server_name, which JetStream clustering needs) by --name;
    the route to itself among the routes is one nats-server skips."""
    routes = "\n".join(
        f'    "nats-route://{ROUTE_USER}:{route_password}@{node}:{ROUTE_PORT}"'
        for node in CLUSTER_NODES
    )
    return (
        "# Made by deploy/compose_secrets.py (make compose-secrets), written anew each time.\n"
        "# The NATS servers of docker-compose's cluster profile: the users and permissions of\n"
        "# nats-server.conf, and the routes between the three servers.\n"
        "include ./nats-server-conf\n"
        "cluster {\n"
        "  name: faas\n"
        f"  listen: 0.0.0.0:{ROUTE_PORT}\n"
        f'  authorization {{ user: "{ROUTE_USER}", password: "{route_password}" }}\n'
        "  routes: [\n"
        f"{routes}\n"
        "  ]\n"
        "}\n"
    )


def write_compose_secrets(directory: Path, settings: CommonSettings) -> list[Path]:
    """Every file compose reads; returns them."""
    lock_directory(directory)
    kept_secret(directory / USER_FILE, "admin")
    kept_secret(directory / PASSWORD_FILE, secrets.token_urlsafe(24))
    nats = write_stack_files(settings, directory, directory / SERVER_CONFIG)
    route_password = kept_secret(directory / ROUTE_PASSWORD_FILE, secrets.token_urlsafe(24))
    (directory / CLUSTER_CONFIG).write_text(cluster_config(route_password))
    files = [
        directory / USER_FILE,
        directory / PASSWORD_FILE,
        *nats.password_files.values(),
        nats.config,
        directory / ROUTE_PASSWORD_FILE,
        directory / CLUSTER_CONFIG,
    ]
    for path in files:
        path.chmod(FILE_MODE)
    return files


def problems(directory: Path, files: list[Path]) -> list[str]:
    """What would let another user of this host read the secrets, or the containers not
    (a file system that keeps no modes, say)."""
    found = []
    for path, wanted in ((directory, DIRECTORY_MODE), *((file, FILE_MODE) for file in files)):
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode != wanted:
            found.append(f"{path} has mode {mode:o}, not {wanted:o}")
    return found


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path, help="where the files go (deploy/secrets)")
    args = parser.parse_args(argv)
    files = write_compose_secrets(args.directory, CommonSettings())
    left = problems(args.directory, files)
    if left:
        sys.exit("compose-secrets: " + "; ".join(left))
    user = (args.directory / USER_FILE).read_text().strip()
    print(
        f"gateway credentials: user {user}, password in {args.directory / PASSWORD_FILE}; "
        f"NATS passwords and configs beside them. {args.directory} may be entered by its "
        f"owner only (uid {os.getuid()}); the files in it are readable by the containers."
    )


if __name__ == "__main__":
    main()
