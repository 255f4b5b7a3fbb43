"""ActivationStore against a real nats-server: a record is created once, and every later write
is conditional on the revision the writer read."""

import time
from typing import Any

import pytest

from faas_gateway.core.call import QueuedCall
from faas_gateway.nats.activations import (
    Activation,
    ActivationChangedError,
    ActivationExistsError,
    ActivationStore,
)
from faas_gateway.nats.names import Names
from faas_gateway.runtime.settings import CommonSettings
from tests.harness import NatsServer


async def test_a_record_is_created_once_and_written_only_over_the_revision_read(
    nats_server: NatsServer, connected_link: Any
) -> None:
    """No writer overwrites a record it did not see: create is create-if-absent, and every
    later write is conditional on the revision the writer last read or wrote."""
    settings = CommonSettings(nats_url=nats_server.url)
    link = await connected_link(settings)
    store = ActivationStore(link, Names.of(settings), settings.activation_max_result_bytes, 3600.0)
    call = QueuedCall(
        call_id="taken-1",
        function="echo",
        method="POST",
        path="",
        query="",
        headers=[],
        body=b"x",
        callback_url=None,
        accepted_at_ns=time.time_ns(),
    )
    first = Activation.queued(call)
    await store.create(first)
    assert first.revision > 0

    with pytest.raises(ActivationExistsError) as taken:
        await store.create(Activation.queued(call))
    assert taken.value.stored is not None
    assert taken.value.stored.record["requestDigest"] == call.request_digest()

    # A second writer that read the record, and the first writer, both change it: the one
    # whose revision is stale loses, and the record keeps what the other wrote.
    stored = await store.get("taken-1")
    assert stored is not None and stored.revision == first.revision
    cancelling = Activation.from_stored(stored)
    cancelling.cancel()
    await store.put(cancelling)
    first.start(attempts=1)
    with pytest.raises(ActivationChangedError):
        await store.put(first)
    after = await store.get("taken-1")
    assert after is not None and after.record["status"] == "cancelled"

    # A record deleted (a call that could not be queued) frees its id for a new create.
    await store.delete(cancelling)
    assert await store.get("taken-1") is None
    again = Activation.queued(call)
    await store.create(again)
    records = await store.get_many(["taken-1", "never-accepted"])
    assert list(records) == ["taken-1"] and records["taken-1"].revision == again.revision
    assert await store.get("never-accepted") is None
