"""FunctionStore against a real nats-server: a change based on a stale read is refused, not
lost."""

from typing import Any

from nats.aio.client import Client as NatsClient

from faas_gateway.nats.function_store import (
    ConcurrentChangeError,
    FunctionDeployment,
    FunctionStore,
)
from faas_gateway.nats.names import Names
from tests.conftest import gateway_settings
from tests.harness import NatsServer


async def test_a_change_based_on_a_stale_read_is_refused_not_lost(
    nats_server: NatsServer, nats_client: NatsClient, connected_link: Any
) -> None:
    settings = gateway_settings(nats_server.url)
    link = await connected_link(settings)
    store = FunctionStore(link, Names.of(settings))
    first = FunctionDeployment(service="raced", url="http://127.0.0.1:1")
    await store.create(first)
    bucket = await nats_client.jetstream().key_value("faas-functions")
    stale = await bucket.get("raced")
    await store.update(first.model_copy(update={"image": "newer"}))

    class StaleStore(FunctionStore):
        async def _current(self, bucket: Any, name: str) -> Any:
            return stale

    for change in (
        StaleStore(link, Names.of(settings)).update(first),
        StaleStore(link, Names.of(settings)).delete("raced"),
    ):
        try:
            await change
        except ConcurrentChangeError:
            continue
        raise AssertionError("a write based on a stale revision went through")
    entry = await bucket.get("raced")
    assert b'"image":"newer"' in (entry.value or b"")
