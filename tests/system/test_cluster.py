"""A three-node NATS cluster on loopback (nats-server from the wheel), two gateways and two
workers on it with nats_stream_replicas=3, a burst of async calls, and one node SIGKILLed in
the middle of it: every call the gateways accepted runs and is called back, its record reads
through either gateway, and the node, started again, catches up. The figures it prints are
the ones docs/operations.md quotes ("A NATS cluster")."""

import asyncio
import time
import uuid
from collections import Counter

import aiohttp
import nats
from nats.js.api import StreamInfo

from tests.conftest import ready_gateway
from tests.harness import NatsCluster, registry_of, wait_until

CALLS = 500
CONCURRENCY = 50
WAIT_S = 60.0
REPLICAS = 3
QUEUE = "faas-async"
# Every stream, bucket and object store faas_gateway/nats/provision.py makes.
STREAMS = (
    QUEUE,
    "KV_faas-activations",
    "OBJ_faas-activations-results",
    "faas-activations-index",
    "faas-dead-letters",
    "KV_faas-cancellations",
    "KV_faas-functions",
)


async def stream_infos(client: nats.NATS) -> dict[str, StreamInfo]:
    js = client.jetstream(timeout=2)
    return {name: await js.stream_info(name) for name in STREAMS}


async def test_a_burst_through_a_three_node_cluster_survives_the_loss_of_a_node(
    tmp_path, recorder, start_gateway, start_worker, http
):
    cluster = NatsCluster(tmp_path / "cluster")
    await cluster.start()
    client = await nats.connect(
        servers=cluster.urls, max_reconnect_attempts=-1, reconnect_time_wait=0.1
    )
    try:
        function = await recorder()
        receiver = await recorder()
        registry = registry_of(echo=function.url)
        on_cluster = {"nats_url": cluster.url, "nats_stream_replicas": REPLICAS}
        gateways = [await ready_gateway(start_gateway, http, registry, **on_cluster) for _ in "ab"]
        for _ in "ab":
            # ack_wait as by default (30 s): a worker retries a record write for up to
            # ack_wait, which must outlast the election of a new leader (up to 9 s in
            # nats-server), or the call goes back to the queue and runs again.
            await start_worker(registry, **on_cluster)

        infos = await stream_infos(client)
        for name, info in infos.items():
            assert info.config.num_replicas == REPLICAS, name
            assert info.cluster is not None and len(info.cluster.replicas or []) == REPLICAS - 1
        # The node that leads the queue's stream: its loss costs the most.
        victim = infos[QUEUE].cluster.leader
        assert victim in cluster.nodes

        accepted: dict[str, float] = {}  # call id: when it got its 202
        answers: Counter[int] = Counter()
        refused: list[tuple[float, str]] = []  # (when, call id) of each 503
        killed_at: list[float] = []
        gate = asyncio.Semaphore(CONCURRENCY)

        async def post(index: int) -> None:
            """A client as docs/delivery.md advises: a 503 is "unknown", posted again with
            the same X-Call-Id until it is accepted."""
            call_id = str(uuid.uuid4())
            headers = {"X-Call-Id": call_id, "X-Callback-Url": f"{receiver.url}/done"}
            attempt = 0
            async with gate:
                first_try = time.monotonic()
                while True:
                    gateway = gateways[(index + attempt) % len(gateways)]
                    async with http.post(
                        gateway.url("/async-function/echo"), data=b"burst", headers=headers
                    ) as response:
                        answers[response.status] += 1
                        if response.status == 202:
                            accepted[call_id] = time.monotonic()
                            return
                        assert response.status == 503, await response.text()
                        refused.append((time.monotonic(), call_id))
                        assert (await response.json())["callId"] == call_id
                    attempt += 1
                    assert time.monotonic() - first_try < WAIT_S, f"{call_id} never accepted"
                    await asyncio.sleep(0.1)

        async def kill_in_the_middle() -> None:
            await wait_until(lambda: len(accepted) >= CALLS // 2, WAIT_S, "half the burst")
            cluster.nodes[victim].kill()
            killed_at.append(time.monotonic())

        started = time.monotonic()
        killer = asyncio.create_task(kill_in_the_middle())
        await asyncio.gather(*(post(index) for index in range(CALLS)))
        burst_s = time.monotonic() - started
        await killer
        assert len(accepted) == CALLS

        # Every accepted call runs and is called back; the queue empties (every call acked).
        await wait_until(
            lambda: set(receiver.by_call_id()) >= set(accepted), WAIT_S, "every callback"
        )
        done_s = time.monotonic() - started

        async def queue_empty() -> bool:
            try:
                return (await client.jetstream(timeout=2).stream_info(QUEUE)).state.messages == 0
            except (nats.errors.Error, TimeoutError):
                return False

        await wait_until(queue_empty, WAIT_S, "the queue to empty")
        runs = {call_id: len(calls) for call_id, calls in function.by_call_id().items()}
        callbacks = {call_id: len(calls) for call_id, calls in receiver.by_call_id().items()}
        assert set(runs) == set(accepted) == set(callbacks)
        run_twice = sum(count - 1 for count in runs.values())
        called_back_twice = sum(count - 1 for count in callbacks.values())
        # No worker died or paused: each call ran once and was called back once
        # (docs/delivery.md: duplicates only after a worker dies).
        assert (run_twice, called_back_twice) == (0, 0), (run_twice, called_back_twice)

        # Every record reads through either gateway, succeeded after one attempt.
        async def read(index: int, call_id: str) -> None:
            gateway = gateways[index % len(gateways)]
            async with gate, http.get(gateway.url(f"/system/activations/{call_id}")) as response:
                assert response.status == 200, call_id
                record = await response.json()
            assert (record["status"], record["attempts"]) == ("succeeded", 1), record

        await asyncio.gather(*(read(index, call_id) for index, call_id in enumerate(accepted)))

        # The node comes back on its store and catches up: the leaders see it current, and
        # its own view of each stream ends where the leader's does.
        back = time.monotonic()
        await cluster.nodes[victim].start()

        async def caught_up() -> bool:
            try:
                infos = await stream_infos(client)
                async with http.get(
                    cluster.monitoring_url(victim, "/jsz?accounts=true&streams=true")
                ) as response:
                    own = await response.json()
            except (nats.errors.Error, TimeoutError, aiohttp.ClientError):
                return False
            local = {
                stream["name"]: stream["state"]
                for account in own.get("account_details", [])
                for stream in account.get("stream_detail", [])
            }
            for name, info in infos.items():
                peers = {peer.name: peer for peer in info.cluster.replicas or []}
                if info.cluster.leader != victim and not (
                    victim in peers and peers[victim].current and not peers[victim].lag
                ):
                    return False
                if name not in local or local[name]["last_seq"] != info.state.last_seq:
                    return False
                if local[name]["messages"] != info.state.messages:
                    return False
            return True

        await wait_until(caught_up, WAIT_S, f"{victim} to catch up", interval_s=0.2)
        catch_up_s = time.monotonic() - back

        [kill] = killed_at
        refused_s = [at - kill for at, _ in refused] or [0.0]
        # From a call's 202 to its callback: the calls whose delivery went down with the
        # node wait for their lease (ack_wait) to run out before another delivery.
        waits = sorted(
            calls[0].received_monotonic - accepted[call_id]
            for call_id, calls in receiver.by_call_id().items()
        )
        print(
            f"\ncluster: {CALLS} async calls, {CONCURRENCY} at a time, through 2 gateways, "
            f"2 workers, 3 NATS nodes (replicas {REPLICAS}); node {victim} (leader of {QUEUE}) "
            f"SIGKILLed after {CALLS // 2} 202s. Burst {burst_s:.1f}s; answers "
            f"{dict(sorted(answers.items()))}: {len({call for _, call in refused})} calls got "
            f"503s (each posted again with its X-Call-Id every 0.1s) from "
            f"{min(refused_s):.1f}s to {max(refused_s):.1f}s after the kill; 202 to callback: "
            f"median {waits[len(waits) // 2]:.2f}s, max {waits[-1]:.1f}s, "
            f"{sum(wait > 10 for wait in waits)} over 10s; all called back {done_s:.1f}s after "
            f"the burst began; run twice {run_twice}, called back twice {called_back_twice}; "
            f"{victim} caught up {catch_up_s:.1f}s after its restart"
        )
    finally:
        await client.close()
        cluster.kill_all()
