"""Command lines of both processes: a few flags, every setting listed in --help."""

import argparse
import sys
import textwrap
from collections.abc import Sequence
from typing import TypeVar

from pydantic import ValidationError
from pydantic_settings import BaseSettings

from faas_gateway.runtime.settings import settings_table

SettingsT = TypeVar("SettingsT", bound=BaseSettings)


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
    problems = []
    for error in exc.errors(include_input=False):
        where = ".".join(str(part) for part in error["loc"])
        problems.append(f"{where}: {error['msg']}" if where else error["msg"])
    return "; ".join(problems)
