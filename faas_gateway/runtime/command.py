"""Command lines of both processes: a few flags, every setting listed in --help."""

import argparse
import sys
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import prometheus_client
from pydantic import ValidationError
from pydantic_settings import BaseSettings

from faas_gateway import __version__
from faas_gateway.core.functions import FunctionsFileError, Registry, load_functions_file
from faas_gateway.core.validation import one_line
from faas_gateway.nats.auth import NatsCredentialsError, check_credential_files
from faas_gateway.runtime.logs import configure_logging
from faas_gateway.runtime.settings import CommonSettings, settings_table

SettingsT = TypeVar("SettingsT", bound=CommonSettings)


@dataclass(frozen=True, slots=True)
class Flag:
    """A command-line flag for a setting (``field``); the environment sets the rest."""

    name: str
    field: str
    help: str
    type: Callable[[str], Any] | None = None
    choices: Sequence[str] | None = None


# Flags both commands take.
COMMON_FLAGS = (
    Flag("--functions-file", "functions_file", "YAML functions file", Path),
    Flag("--nats-url", "nats_url", "NATS server URL"),
    Flag("--log-level", "log_level", "log level", choices=("debug", "info", "warning", "error")),
)


def start_command(
    prog: str,
    description: str,
    settings_cls: type[SettingsT],
    flags: Sequence[Flag],
    argv: list[str] | None,
) -> tuple[SettingsT, Registry]:
    """What both commands do first: flags and settings, logging, the functions file, and the
    files the NATS credentials name; a problem with any of them exits with its message."""
    parser = new_parser(prog, description, settings_cls)
    every_flag = (*flags, *COMMON_FLAGS)
    for flag in every_flag:
        options: dict[str, Any] = {"dest": flag.field, "help": flag.help}
        if flag.type is not None:
            options["type"] = flag.type
        if flag.choices is not None:
            options["choices"] = flag.choices
        parser.add_argument(flag.name, **options)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    args = parser.parse_args(argv)
    # Only the counters' values, not a *_created series beside each one.
    prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped upstream
    settings = load_settings(settings_cls, args, [flag.field for flag in every_flag])
    configure_logging(settings)
    try:
        registry = load_functions_file(settings.functions_file, settings.function_namespace)
        check_credential_files(settings)  # here, to stop with a clear message before starting
    except (FunctionsFileError, NatsCredentialsError) as exc:
        sys.exit(f"{prog}: {exc}")
    return settings, registry


def settings_epilog(settings_cls: type[BaseSettings]) -> str:
    lines = ["settings (environment variables, case-insensitive; flags above win):"]
    for env, default, description in settings_table(settings_cls):
        lines.append(f"  {env} (default {default})")
        lines.extend(
            textwrap.wrap(
                description, width=76, initial_indent="      ", subsequent_indent="      "
            )
        )
    lines.append("durations take seconds (60, 2.5) or Go strings (65s, 1m5s, 500ms)")
    return "\n".join(lines)


def new_parser(
    prog: str, description: str, settings_cls: type[BaseSettings]
) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=settings_epilog(settings_cls),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def load_settings(
    settings_cls: type[SettingsT], args: argparse.Namespace, flag_fields: Sequence[str]
) -> SettingsT:
    """Settings from the environment, overridden by the flags that were given."""
    overrides = {
        field: getattr(args, field) for field in flag_fields if getattr(args, field) is not None
    }
    try:
        return settings_cls(**overrides)
    except ValidationError as exc:
        sys.exit(f"invalid settings: {validation_problems(exc)}")


def validation_problems(exc: ValidationError) -> str:
    """One line: each field and what is wrong with it (no values: some are secrets)."""
    return one_line(exc)
