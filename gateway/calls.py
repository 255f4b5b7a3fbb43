"""Identity and timing of one invocation: the call id and the headers every response carries."""

import re
import time
import uuid
from dataclasses import dataclass, field

from aiohttp import web
from multidict import CIMultiDict

from faas_common.headers import CALL_ID, DURATION_SECONDS, START_TIME

# A call id also names a JetStream message (Nats-Msg-Id) and, later, a key-value entry, so it
# is held to characters every one of those accepts.
CALL_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_=.-]{0,127}")
INVOCATION_PREFIXES = ("/function/", "/async-function/")


@dataclass(frozen=True, slots=True)
class CallContext:
    call_id: str
    start_ns: int = field(default_factory=time.time_ns)
    started_monotonic: float = field(default_factory=time.monotonic)

    def elapsed_s(self) -> float:
        return time.monotonic() - self.started_monotonic

    def response_headers(self) -> dict[str, str]:
        return {
            CALL_ID: self.call_id,
            START_TIME: str(self.start_ns),
            DURATION_SECONDS: f"{self.elapsed_s():.6f}",
        }

    def apply_to(self, headers: CIMultiDict[str]) -> None:
        for name, value in self.response_headers().items():
            headers[name] = value


CALL = web.RequestKey("call", CallContext)


class InvalidCallIdError(ValueError):
    pass


def resolve_call_id(requested: str | None) -> str:
    if requested is None or requested == "":
        return str(uuid.uuid4())
    if CALL_ID_PATTERN.fullmatch(requested) is None:
        raise InvalidCallIdError(
            f"invalid {CALL_ID}: use 1-128 characters from A-Z a-z 0-9 _ = . - "
            "starting with a letter or digit"
        )
    return requested
