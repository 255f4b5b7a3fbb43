"""Response bodies too large for a record, in a NATS object store, written and read as streams.

The bucket is ``<activation_bucket>-results`` (a JetStream object store: chunks on
``$O.<bucket>.C.<nuid>``, one metadata message on ``$O.<bucket>.M.<base64 name>``), in the same
format nats-py and the ``nats`` CLI read. nats-py's own ``put``/``get`` hold an object whole in
memory; these never hold more than a few chunks, so a 200 MiB response costs what 1 MiB does.
"""

import asyncio
import base64
import contextlib
import hashlib
from collections.abc import AsyncIterable, AsyncIterator
from datetime import UTC, datetime
from typing import Any

import nats.errors
import orjson

from faas_gateway.core.outcome import SpoolError
from faas_gateway.nats.jetstream import (
    PublishRejectedError,
    direct_get_batch,
    is_storage_full,
    message_sequence,
)
from faas_gateway.nats.link import NatsLink, NatsUnavailableError
from faas_gateway.nats.names import Names

CHUNK_BYTES = 128 * 1024  # nats-py's and the CLI's default chunk size
# Chunks published before the first of them must be acked: enough to keep the link busy,
# few enough that memory stays flat.
CHUNKS_IN_FLIGHT = 8
CHUNKS_PER_READ = 8
TIMEOUT_S = 5.0


class ResultStoreError(SpoolError):
    """A body could not be stored or read: NATS is away, the store is full, or it is gone."""

    def __init__(self, message: str, storage_full: bool = False) -> None:
        super().__init__(message)
        self.storage_full = storage_full  # the store is at its limit (it frees up as bodies expire)


class ResultStore:
    def __init__(self, link: NatsLink, names: Names) -> None:
        self._link = link
        self._bucket = names.results_bucket
        self._stream = names.results_stream

    def _meta_subject(self, name: str) -> str:
        encoded = base64.urlsafe_b64encode(name.encode()).decode()
        return f"$O.{self._bucket}.M.{encoded}"

    async def put(self, name: str, data: bytes) -> int:
        return await self.put_stream(name, _one(data))

    async def put_stream(self, name: str, body: AsyncIterable[bytes]) -> int:
        """Store ``body`` under ``name`` (replacing what was there); its size.

        Raises what the body's source raises (an upstream error, say) after removing the
        chunks written so far, and ResultStoreError when NATS refuses or does not answer.
        """
        nuid = self._link.nc._nuid.next().decode()  # the subject of this version's chunks
        chunk_subject = f"$O.{self._bucket}.C.{nuid}"
        digest = hashlib.sha256()
        size = chunks = 0
        in_flight: set[asyncio.Task[bytes]] = set()
        try:
            async for piece in _rechunk(body, CHUNK_BYTES):
                digest.update(piece)
                size += len(piece)
                chunks += 1
                in_flight.add(
                    asyncio.create_task(self._link.acks.publish(chunk_subject, piece, TIMEOUT_S))
                )
                if len(in_flight) >= CHUNKS_IN_FLIGHT:
                    done, in_flight = await asyncio.wait(
                        in_flight, return_when=asyncio.FIRST_COMPLETED
                    )
                    for task in done:
                        task.result()
            for acked in asyncio.as_completed(in_flight):
                await acked
            in_flight = set()
            previous = await self._info(name)
            info = {
                "name": name,
                "bucket": self._bucket,
                "nuid": nuid,
                "size": size,
                "chunks": chunks,
                "mtime": datetime.now(UTC).isoformat(),
                "digest": "SHA-256=" + base64.urlsafe_b64encode(digest.digest()).decode(),
                "options": {"max_chunk_size": CHUNK_BYTES},
            }
            await self._link.acks.publish(
                self._meta_subject(name),
                orjson.dumps(info),
                TIMEOUT_S,
                headers={"Nats-Rollup": "sub"},
            )
        except BaseException as exc:
            for task in in_flight:
                task.cancel()
            with contextlib.suppress(Exception):
                await self._link.js.purge_stream(self._stream, subject=chunk_subject)
            if isinstance(exc, TimeoutError | NatsUnavailableError | nats.errors.Error):
                full = isinstance(exc, PublishRejectedError) and is_storage_full(exc.err_code)
                raise ResultStoreError(f"storing the body failed: {exc!r}", full) from exc
            raise
        if previous is not None and previous.get("nuid"):
            with contextlib.suppress(TimeoutError, nats.errors.Error):
                await self._link.js.purge_stream(
                    self._stream, subject=f"$O.{self._bucket}.C.{previous['nuid']}"
                )
        return size

    async def read(self, name: str, limit: int | None = None) -> bytes:
        """The first ``limit`` bytes (all without one), for bodies known to be small."""
        return b"".join([chunk async for chunk in self.chunks(name, limit)])

    async def chunks(self, name: str, limit: int | None = None) -> AsyncIterator[bytes]:
        """The body in order, a few chunks read at a time; at most ``limit`` bytes."""
        info = await self._info(name)
        if info is None:
            raise ResultStoreError(f"no stored body {name!r}")
        remaining = int(info.get("size") or 0) if limit is None else limit
        chunk_subject = f"$O.{self._bucket}.C.{info['nuid']}"
        sequence = 1
        left = int(info.get("chunks") or 0)
        while left > 0 and remaining > 0:
            try:
                messages = await direct_get_batch(
                    self._link.nc,
                    self._stream,
                    {
                        "seq": sequence,
                        "batch": min(CHUNKS_PER_READ, left),
                        "next_by_subj": chunk_subject,
                    },
                    TIMEOUT_S,
                )
            except (TimeoutError, NatsUnavailableError, nats.errors.Error) as exc:
                raise ResultStoreError(f"reading the body failed: {exc!r}") from exc
            if not messages:
                raise ResultStoreError(f"stored body {name!r} is incomplete")
            for msg in messages:
                piece = msg.data[:remaining]
                remaining -= len(piece)
                left -= 1
                yield piece
                if remaining <= 0:
                    return
            sequence = message_sequence(messages[-1]) + 1

    async def size(self, name: str) -> int | None:
        info = await self._info(name)
        return None if info is None else int(info.get("size") or 0)

    async def _info(self, name: str) -> dict[str, Any] | None:
        try:
            msg = await self._link.nc.request(
                f"$JS.API.DIRECT.GET.{self._stream}.{self._meta_subject(name)}",
                b"",
                timeout=TIMEOUT_S,
            )
        except (TimeoutError, NatsUnavailableError, nats.errors.Error) as exc:
            raise ResultStoreError(f"reading the body's metadata failed: {exc!r}") from exc
        if not msg.data:
            return None
        info = orjson.loads(msg.data)
        if not isinstance(info, dict) or info.get("deleted"):
            return None
        return info


async def _one(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def _rechunk(body: AsyncIterable[bytes], size: int) -> AsyncIterator[bytes]:
    """Pieces of exactly ``size`` bytes (the last one shorter), whatever the source gives."""
    pending = bytearray()
    async for piece in body:
        pending += piece
        while len(pending) >= size:
            yield bytes(pending[:size])
            del pending[:size]
    if pending:
        yield bytes(pending)
