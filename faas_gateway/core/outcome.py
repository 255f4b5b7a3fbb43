"""How one function call ended, as the worker (and the gateway, for a demoted sync call) saw it."""

import json
from collections.abc import AsyncIterable
from dataclasses import dataclass
from typing import Protocol

from faas_gateway.core.headers import header

# Who ended a call that failed (Outcome.failed_by, kept in its record as failedBy).
FAILED_BY_FUNCTION = "function"
FAILED_BY_TIMEOUT = "timeout"
FAILED_BY_GATEWAY = "gateway"


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
    # The function ran over its timeout (a 504 the gateway or worker made, not the function).
    timed_out: bool = False

    @property
    def body_size(self) -> int:
        return len(self.body) if self.spooled_size is None else self.spooled_size

    # For the log only: what ``error`` leaves out for callers (the function's address).
    detail: str | None = None

    @property
    def succeeded(self) -> bool:
        return 200 <= self.status_code < 300

    @property
    def failed_by(self) -> str | None:
        """Who ended a call that failed: None if it succeeded, FAILED_BY_FUNCTION when the
        function answered with a failure status, FAILED_BY_TIMEOUT when it ran over its
        timeout, FAILED_BY_GATEWAY when it could not be reached or the gateway or worker
        failed (only outcomes made by ``failure`` carry an ``error``)."""
        if self.succeeded:
            return None
        if self.error is None:
            return FAILED_BY_FUNCTION
        return FAILED_BY_TIMEOUT if self.timed_out else FAILED_BY_GATEWAY

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
    timed_out: bool = False,
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
        timed_out=timed_out,
    )


class SpoolError(Exception):
    """A body too large to hold could not be put where it goes instead."""


class BodySpool(Protocol):
    """Where a response too large to hold goes as it arrives (the results object store)."""

    async def put_stream(self, name: str, body: AsyncIterable[bytes]) -> int: ...
