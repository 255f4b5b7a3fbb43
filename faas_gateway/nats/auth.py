"""Credentials and TLS for NATS, and what each process may do there.

``connect_options`` turns the ``nats_*`` credential and TLS settings into nats-py's connect
arguments; both processes connect through ``faas_gateway.nats.jetstream.connect``, which uses it.

``server_config`` writes a nats-server config with one user for the gateway, one for the
workers and one for systems that publish events, each allowed to publish and subscribe only on
the subjects its code (or role) uses. The subjects
are derived from the settings that name the streams and buckets, so they cannot drift apart.
``make run`` (deploy/local_stack.py) and ``make compose-secrets`` (``python -m
faas_gateway.nats.auth``) both write theirs with it.

What each user may do, and why (the streams are named after the settings: queue =
nats_stream, records = KV_<activation_bucket>, results = OBJ_<activation_bucket>-results,
index = activation_index_stream, dead letters = dead_letter_stream, functions =
KV_<functions_bucket>, cancellations = KV_<cancellation_bucket>, triggers, rules and feeds =
KV_<triggers_bucket>, KV_<rules_bucket>, KV_<feeds_bucket>, fires = fire_stream):

- gateway and worker: look up and create all the streams, since whichever process starts
  first creates them; write and read activation records and the results' object store (and
  purge its stream: nats-py does, replacing an object); subscribe to their own inboxes only
  (nats_inbox_prefix). Neither may delete a stream or purge any other.
- gateway only: publish async calls to the queue's subjects (no other user can forge a
  queued call) and to the index; write the functions bucket (deploy, update, delete) and
  the cancellations bucket; read dead letters; watch records' subjects (a caller waiting
  for a result); update every stream (a changed retention is applied at start). It has no
  consumer on the queue and may not fetch, acknowledge or drop queued calls. For events:
  write and watch the triggers, rules and feeds buckets; publish fires and take them from
  the fire stream's one consumer (the fan-out), acknowledging them; subscribe to
  event_subjects (subject feeds, topic annotations).
- worker only: create, look up and fetch from the queue's consumers and acknowledge their
  messages; write dead letters; watch the functions and cancellations buckets; update the
  streams it writes to and the queue's. It may create those two buckets (if it is first)
  but not write to them or change them: a worker cannot deploy a function or cancel a call.
- events only: publish to event_subjects (and subscribe to its own inbox): a system given
  these credentials can fire what listens there, and read or change nothing else.
"""

import argparse
import os
import re
import secrets
import ssl
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from faas_gateway.core.events import subject_spaces
from faas_gateway.nats.names import Names

if TYPE_CHECKING:
    from faas_gateway.runtime.settings import CommonSettings

GATEWAY_USER = "gateway"
WORKER_USER = "worker"
# Publishes events to the subjects the gateway's subject feeds listen on (event_subjects),
# and may do nothing else: what a system that speaks NATS is given to fire triggers.
EVENTS_USER = "events"
USERS = (GATEWAY_USER, WORKER_USER, EVENTS_USER)
# One subject token or more, no wildcards: the start of every reply subject of a process.
INBOX_PREFIX_PATTERN = re.compile(r"[A-Za-z0-9_$-]+(\.[A-Za-z0-9_$-]+)*")


class NatsCredentialsError(RuntimeError):
    """A credential or TLS file in the settings cannot be used; the message says which."""


def inbox_prefix(user: str) -> str:
    return f"_INBOX.{user}"


def client_env(user: str, password_file: Path) -> dict[str, str]:
    """The settings (environment) that sign a process in as one of the stack's users."""
    return {
        "nats_user": user,
        "nats_password_file": str(password_file),
        "nats_inbox_prefix": inbox_prefix(user),
    }


# settings


def setting_problems(settings: "CommonSettings") -> list[str]:
    """What is wrong with the combination of credential and TLS settings (empty: nothing)."""
    password_set = bool(settings.nats_password.get_secret_value() or settings.nats_password_file)
    token_set = bool(settings.nats_token.get_secret_value() or settings.nats_token_file)
    ways = [
        name
        for name, used in (
            ("nats_user/nats_password", bool(settings.nats_user) or password_set),
            ("nats_token", token_set),
            ("nats_nkey_seed_file", bool(settings.nats_nkey_seed_file)),
            ("nats_creds_file", bool(settings.nats_creds_file)),
        )
        if used
    ]
    problems = []
    if len(ways) > 1:
        problems.append(f"sign in to NATS one way, not with {' and '.join(ways)}")
    if settings.nats_password.get_secret_value() and settings.nats_password_file:
        problems.append("set nats_password or nats_password_file, not both")
    if settings.nats_token.get_secret_value() and settings.nats_token_file:
        problems.append("set nats_token or nats_token_file, not both")
    if settings.nats_user and not password_set:
        problems.append("nats_user needs nats_password or nats_password_file")
    if password_set and not settings.nats_user:
        problems.append("a NATS password needs nats_user")
    if bool(settings.nats_tls_cert_file) != bool(settings.nats_tls_key_file):
        problems.append(
            "nats_tls_cert_file and nats_tls_key_file go together (a client certificate "
            "and its key)"
        )
    if ways and any(_has_userinfo(url) for url in server_urls(settings)):
        problems.append("nats_url carries credentials too; keep them in one place")
    if not INBOX_PREFIX_PATTERN.fullmatch(settings.nats_inbox_prefix):
        problems.append("nats_inbox_prefix must be subject tokens without wildcards")
    return problems


def server_urls(settings: "CommonSettings") -> list[str]:
    return [url.strip() for url in settings.nats_url.split(",") if url.strip()]


def _has_userinfo(url: str) -> bool:
    parts = urlsplit(url if "://" in url else f"nats://{url}")
    return bool(parts.username or parts.password)


def redact_url(urls: str) -> str:
    """A server URL (or a comma-separated list) with any user, password or token in it
    replaced, for logs."""
    return ",".join(_redact_one(url) for url in urls.split(","))


def _redact_one(url: str) -> str:
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]))


def tls_configured(settings: "CommonSettings") -> bool:
    return bool(settings.nats_tls_ca_file or settings.nats_tls_cert_file)


def connect_options(settings: "CommonSettings") -> dict[str, Any]:
    """nats-py ``connect()`` keyword arguments for the credential and TLS settings.

    Files are read here, each time a process connects, so a rotated secret is picked up by
    the next start. NatsCredentialsError when one cannot be read.
    """
    options: dict[str, Any] = {"inbox_prefix": settings.nats_inbox_prefix}
    if settings.nats_user:
        options["user"] = settings.nats_user
        options["password"] = _secret(
            settings.nats_password.get_secret_value(),
            settings.nats_password_file,
            "nats_password_file",
        )
    token = _secret(
        settings.nats_token.get_secret_value(), settings.nats_token_file, "nats_token_file"
    )
    if token:
        options["token"] = token
    if settings.nats_nkey_seed_file:
        # nats-py reads it at each connect; read once here to fail early and clearly.
        _read_file(settings.nats_nkey_seed_file, "nats_nkey_seed_file")
        options["nkeys_seed"] = settings.nats_nkey_seed_file
    if settings.nats_creds_file:
        _read_file(settings.nats_creds_file, "nats_creds_file")
        options["user_credentials"] = settings.nats_creds_file
    if tls_configured(settings):
        options["tls"] = tls_context(settings)
    return options


def check_credential_files(settings: "CommonSettings") -> None:
    """Read every credential and TLS file the settings name, so that a process stops at start
    with a clear message instead of retrying a connection that cannot succeed."""
    connect_options(settings)


def tls_context(settings: "CommonSettings") -> ssl.SSLContext:
    """Server certificates checked against nats_tls_ca_file (else the system's CAs) and the
    host name; a client certificate when nats_tls_cert_file is set (mutual TLS)."""
    ca_file = settings.nats_tls_ca_file or None
    if ca_file is not None:
        _read_file(ca_file, "nats_tls_ca_file")
    try:
        context = ssl.create_default_context(cafile=ca_file)
        if settings.nats_tls_cert_file:
            context.load_cert_chain(settings.nats_tls_cert_file, settings.nats_tls_key_file)
    except (ssl.SSLError, OSError) as exc:
        raise NatsCredentialsError(f"NATS TLS files cannot be used: {exc}") from exc
    return context


def _secret(value: str, file: str, setting_name: str) -> str:
    if file:
        return _read_file(file, setting_name).strip()
    return value


def _read_file(path: str, setting_name: str) -> str:
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise NatsCredentialsError(f"{setting_name}: cannot read {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise NatsCredentialsError(f"{setting_name}: {path} is not text") from exc


# permissions


@dataclass(frozen=True)
class Permissions:
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]


def _stream_api(operations: Sequence[str], streams: Sequence[str]) -> list[str]:
    return [f"$JS.API.STREAM.{op}.{stream}" for op in operations for stream in streams]


def _reads(streams: Sequence[str]) -> list[str]:
    """Direct gets (by subject, and batched) and stream message gets."""
    subjects = []
    for stream in streams:
        subjects += [
            f"$JS.API.DIRECT.GET.{stream}",
            f"$JS.API.DIRECT.GET.{stream}.>",
            f"$JS.API.STREAM.MSG.GET.{stream}",
        ]
    return subjects


def _watches(streams: Sequence[str]) -> list[str]:
    """What nats-py's ordered consumers (key-value watches, object-store reads) send:
    consumer create and info, and flow-control replies. They are ephemeral: nats-py never
    deletes them, the server does once they are idle."""
    subjects = []
    for stream in streams:
        subjects += [
            f"$JS.API.CONSUMER.CREATE.{stream}",
            f"$JS.API.CONSUMER.CREATE.{stream}.>",
            f"$JS.API.CONSUMER.INFO.{stream}.>",
            f"$JS.FC.{stream}.>",
        ]
    return subjects


def _common_publish(settings: "CommonSettings", names: Names) -> list[str]:
    return [
        # Account limits, which nats-py reads for some bucket options.
        "$JS.API.INFO",
        # An object-store read looks its stream up by subject.
        "$JS.API.STREAM.NAMES",
        *_stream_api(["INFO", "CREATE"], names.all_streams),
        # An object-store write removes the chunks of the object it replaces.
        f"$JS.API.STREAM.PURGE.{names.results_stream}",
        f"$KV.{settings.activation_bucket}.>",
        f"$O.{names.results_bucket}.>",
    ]


def gateway_permissions(settings: "CommonSettings") -> Permissions:
    names = Names.of(settings)
    publish = [
        *_common_publish(settings, names),
        *_stream_api(["UPDATE"], names.all_streams),
        *_reads(
            [
                names.activation_stream,
                names.results_stream,
                names.index_stream,
                names.dead_letter_stream,
                names.functions_stream,
            ]
        ),
        *_reads(names.event_streams),
        *_watches([names.functions_stream, names.results_stream, *names.event_streams]),
        # Whether a worker serves a queue (gateway_queue_unserved): reading its consumer's
        # state, which changes nothing.
        f"$JS.API.CONSUMER.INFO.{names.stream}.>",
        settings.subjects_wildcard,
        f"{settings.activation_index_stream}.>",
        f"$KV.{settings.functions_bucket}.>",
        f"$KV.{settings.cancellation_bucket}.>",
        f"$KV.{settings.triggers_bucket}.>",
        f"$KV.{settings.rules_bucket}.>",
        f"$KV.{settings.feeds_bucket}.>",
        # Fires: published (a fire, an alarm tick, a message on a subject), then taken from
        # the one durable consumer the gateways share and acknowledged (the fan-out).
        names.fire_subjects,
        f"$JS.API.CONSUMER.INFO.{names.fire_stream}.>",
        f"$JS.API.CONSUMER.CREATE.{names.fire_stream}.>",
        f"$JS.API.CONSUMER.DURABLE.CREATE.{names.fire_stream}.>",
        f"$JS.API.CONSUMER.MSG.NEXT.{names.fire_stream}.>",
        f"$JS.ACK.{names.fire_stream}.>",
    ]
    subscribe = [
        f"{inbox_prefix(GATEWAY_USER)}.>",
        # A caller waiting for its result watches its record's subject.
        f"$KV.{settings.activation_bucket}.>",
        # Subject feeds and functions' topic annotations.
        *subject_spaces(settings.event_subjects),
    ]
    return Permissions(tuple(publish), tuple(subscribe))


def worker_permissions(settings: "CommonSettings") -> Permissions:
    names = Names.of(settings)
    queue = names.stream
    publish = [
        *_common_publish(settings, names),
        *_stream_api(
            ["UPDATE"],
            [
                names.stream,
                names.activation_stream,
                names.results_stream,
                names.index_stream,
                names.dead_letter_stream,
            ],
        ),
        *_reads([names.activation_stream, names.results_stream]),
        *_watches([names.functions_stream, names.cancellation_stream, names.results_stream]),
        # Its durable consumer, one per queue (nats_consumer[-<queue>]).
        f"$JS.API.CONSUMER.INFO.{queue}.>",
        f"$JS.API.CONSUMER.CREATE.{queue}.>",
        f"$JS.API.CONSUMER.DURABLE.CREATE.{queue}.>",
        f"$JS.API.CONSUMER.MSG.NEXT.{queue}.>",
        f"$JS.ACK.{queue}.>",
        f"{settings.dead_letter_stream}.>",
    ]
    subscribe = [f"{inbox_prefix(WORKER_USER)}.>"]
    return Permissions(tuple(publish), tuple(subscribe))


def events_permissions(settings: "CommonSettings") -> Permissions:
    return Permissions(
        tuple(subject_spaces(settings.event_subjects)), (f"{inbox_prefix(EVENTS_USER)}.>",)
    )


def server_config(settings: "CommonSettings", passwords: Mapping[str, str]) -> str:
    """A nats-server config (its authorization block) for the users ``gateway``, ``worker``
    and ``events`` with ``passwords``; listen address, port and JetStream come from flags."""
    users = [
        (GATEWAY_USER, gateway_permissions(settings)),
        (WORKER_USER, worker_permissions(settings)),
        (EVENTS_USER, events_permissions(settings)),
    ]
    lines = [
        "# Made by faas_gateway.nats.auth from the faas-gateway settings; written anew at each",
        "# start. Users: gateway and worker (see faas_gateway/nats/auth.py for what each may do).",
        "authorization {",
        "  users = [",
    ]
    for user, permissions in users:
        lines += [
            "    {",
            f"      user: {_quoted(user)}",
            f"      password: {_quoted(passwords[user])}",
            "      permissions: {",
            f"        publish: {{ allow: {_list(permissions.publish)} }}",
            f"        subscribe: {{ allow: {_list(permissions.subscribe)} }}",
            "      }",
            "    }",
        ]
    lines += ["  ]", "}", ""]
    return "\n".join(lines)


def _quoted(text: str) -> str:
    # Quoted, so that "$..." is a subject and not a config variable.
    if '"' in text or "\\" in text or "\n" in text:
        raise ValueError(f"cannot put {text!r} into a nats-server config")
    return f'"{text}"'


def _list(items: Sequence[str]) -> str:
    return "[" + ", ".join(_quoted(item) for item in items) + "]"


# the stack's files


@dataclass(frozen=True)
class StackFiles:
    config: Path
    password_files: dict[str, Path]


def password_file(secrets_dir: Path, user: str) -> Path:
    return secrets_dir / f"nats-{user}-password"


def write_stack_files(settings: "CommonSettings", secrets_dir: Path, config: Path) -> StackFiles:
    """A password for each user, made once and kept (mode 600) in ``secrets_dir``, and the
    nats-server config naming them, written anew (mode 600) so it follows the settings."""
    secrets_dir.mkdir(parents=True, exist_ok=True)
    files = {user: password_file(secrets_dir, user) for user in USERS}
    passwords = {}
    for user, path in files.items():
        existing = path.read_text().strip() if path.exists() else ""
        if not existing:
            existing = secrets.token_urlsafe(24)
            _write_private(path, existing + "\n")
        passwords[user] = existing
    _write_private(config, server_config(settings, passwords))
    return StackFiles(config, files)


def _write_private(path: Path, text: str) -> None:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as file:
        os.fchmod(file.fileno(), 0o600)  # an existing file keeps its mode through O_CREAT
        file.write(text)


def main(argv: list[str] | None = None) -> None:
    """``python -m faas_gateway.nats.auth DIR``: NATS passwords and nats-server.conf in DIR
    (``make compose-secrets``), for the settings in this environment (the defaults)."""
    from pydantic import ValidationError

    from faas_gateway.runtime.command import validation_problems
    from faas_gateway.runtime.settings import CommonSettings

    parser = argparse.ArgumentParser(
        prog="python -m faas_gateway.nats.auth",
        description="Write NATS passwords for the users gateway, worker and events (kept if "
        "they exist) and a nats-server config giving each the permissions it needs.",
    )
    parser.add_argument("secrets_dir", type=Path, help="where the files go")
    args = parser.parse_args(argv)
    try:
        settings = CommonSettings()
    except ValidationError as exc:
        sys.exit(f"invalid settings: {validation_problems(exc)}")
    files = write_stack_files(settings, args.secrets_dir, args.secrets_dir / "nats-server.conf")
    print(
        f"NATS users {', '.join(USERS)}: passwords in "
        + ", ".join(str(path) for path in files.password_files.values())
        + f"; nats-server config {files.config}"
    )


if __name__ == "__main__":
    main()
