"""faas_gateway/nats/jetstream.py against a real nats-server: what a publish ack says."""

from nats.aio.client import Client as NatsClient

from faas_gateway.nats.jetstream import AckedPublisher, ack_is_duplicate


async def test_a_message_id_published_again_is_told_apart_as_a_duplicate(
    nats_client: NatsClient,
) -> None:
    """nats-server writes the ack of a duplicate as ``"duplicate": true`` (with a space): the
    scheduler's exactly-once per alarm tick counts on reading it."""
    await nats_client.jetstream().add_stream(name="dedup", subjects=["dedup.>"])
    publisher = AckedPublisher(nats_client)
    first = await publisher.publish("dedup.x", b"one", 5.0, headers={"Nats-Msg-Id": "tick-1"})
    again = await publisher.publish("dedup.x", b"one", 5.0, headers={"Nats-Msg-Id": "tick-1"})
    other = await publisher.publish("dedup.x", b"two", 5.0, headers={"Nats-Msg-Id": "tick-2"})
    assert [ack_is_duplicate(ack) for ack in (first, again, other)] == [False, True, False]
