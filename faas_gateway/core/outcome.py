"""How one function call ended, as the worker (and the gateway, for a demoted sync call) saw it."""

import json
from collections.abc import AsyncIterable
from dataclasses import dataclass
from typing import Protocol

from faas_gateway.core.headers import header


@dataclass(frozen=True, slots=True)
class Outcome:
    status_code: int
    headers: list[tuple[str, str]]
    body: bytes
    duration_s: float
    error: str | None = None
    # The function could not be reached or ran over its timeout: worth another try whatever
    # the status code says.
    unreachable_or_timed_out: bool = False
    # A body too large to hold (max_held_response_bytes) is not in ``body``: it went into the
    # results store under the call id as it arrived, and this is its size.
    spooled_size: int | None = None

    @property
    def body_size(self) -> int:
        return len(self.body) if self.spooled_size is None else self.spooled_size

    # For the log only: what ``error`` leaves out for callers (the function's address).
    detail: str | None = None

    @property
    def succeeded(self) -> bool:
        return 200 <= self.status_code < 300

    def content_type(self) -> str | None:
        return self.header("content-type")

    def header(self, name: str) -> str | None:
        return header(self.headers, name)


def failure(
    status_code: int,
    error: str,
    duration_s: float,
    unreachable_or_timed_out: bool = False,
    detail: str | None = None,
) -> Outcome:
    body = (json.dumps({"error": error}) + "\n").encode()
    return Outcome(
        status_code=status_code,
        headers=[("Content-Type", "application/json")],
        body=body,
        duration_s=duration_s,
        error=error,
        unreachable_or_timed_out=unreachable_or_timed_out,
        detail=detail,
    )


class SpoolError(Exception):
    """A body too large to hold could not be put where it goes instead."""


class BodySpool(Protocol):
    """Where a response too large to hold goes as it arrives (the results object store)."""

    async def put_stream(self, name: str, body: AsyncIterable[bytes]) -> int: ...
