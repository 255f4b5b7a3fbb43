"""Reading request bodies from clients: within an idle timeout, and telling a client that left
or stalled from a function that failed.

aiohttp's server waits for body bytes for ever: a client that sends its headers and part of
its body and then nothing would hold a handler (and, on the sync route, a connection to the
function) until the client's TCP connection dies. ``request_body_timeout`` bounds each wait
for the next bytes, not the whole body, so a large upload that keeps moving is never cut.
"""

import asyncio
from collections.abc import AsyncIterator

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from gateway.errors import (
    ClientGoneError,
    GatewayError,
    InvalidRequestError,
    PayloadTooLargeError,
    RequestTimeoutError,
)


def client_failure(error: BaseException, timeout_s: float) -> GatewayError:
    """What a failed read of the body means for the call."""
    if isinstance(error, TimeoutError):
        return RequestTimeoutError(
            f"the request body stopped arriving: no bytes for {timeout_s:g}s (request_body_timeout)"
        )
    if isinstance(error, HttpProcessingError):
        # Framing aiohttp cannot parse, such as a chunk size that is not hex.
        return InvalidRequestError(f"the request body is malformed: {error.message}")
    return ClientGoneError(f"the client went away during the request body: {error}")


async def read_body(
    request: web.Request,
    timeout_s: float,
    limit_bytes: int | None = None,
    too_large: PayloadTooLargeError | None = None,
) -> bytes:
    """The whole body, each wait for more bytes within ``timeout_s``. A body larger than
    ``limit_bytes`` raises ``too_large`` (or a plain 413) as soon as it is known to be."""
    if limit_bytes is not None and too_large is None:
        too_large = PayloadTooLargeError(f"the request body is larger than {limit_bytes} bytes")
    content = request.content
    if content.is_eof():
        # All of it is here already (the common case for small bodies): no wait to bound.
        try:
            body = await request.read()
        except (ConnectionError, HttpProcessingError) as exc:
            raise client_failure(exc, timeout_s) from exc
        if too_large is not None and limit_bytes is not None and len(body) > limit_bytes:
            raise too_large
        return body
    chunks: list[bytes] = []
    received = 0
    try:
        while True:
            async with asyncio.timeout(timeout_s):
                chunk = await content.readany()
            if not chunk:
                return b"".join(chunks)
            received += len(chunk)
            if too_large is not None and limit_bytes is not None and received > limit_bytes:
                raise too_large
            chunks.append(chunk)
    except (TimeoutError, ConnectionError, HttpProcessingError) as exc:
        raise client_failure(exc, timeout_s) from exc


class StreamedBody:
    """A body streamed through to the function as it arrives, each wait within the timeout.

    The upstream client reads it in a task of its own and only sees that the body broke off;
    ``failure`` keeps why, so the call ends with a 408, or as a client that left, rather than
    a 502 that blames the function.
    """

    __slots__ = ("_content", "_timeout_s", "failure")

    def __init__(self, request: web.Request, timeout_s: float) -> None:
        self._content = request.content
        self._timeout_s = timeout_s
        self.failure: GatewayError | None = None

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[bytes]:
        content = self._content
        while True:
            try:
                async with asyncio.timeout(self._timeout_s):
                    chunk = await content.readany()
            except (TimeoutError, ConnectionError, HttpProcessingError) as exc:
                self.failure = client_failure(exc, self._timeout_s)
                raise self.failure from exc
            if not chunk:
                return
            yield chunk


def failure_of(body: object) -> GatewayError | None:
    """Why the client's side of a call failed, if it did: a stalled or abandoned body."""
    return body.failure if isinstance(body, StreamedBody) else None
