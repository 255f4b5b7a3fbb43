"""faas_gateway/runtime/loops.py ``stop_task``: a background loop stops even when a
cancellation is lost, as asyncio.wait_for loses one on Python 3.11 when what it waits for
completes at the same moment (nats-py's fetches and key-value watches wait that way)."""

import asyncio

from faas_gateway.runtime.loops import stop_task


async def test_a_task_that_lost_its_cancellation_is_stopped_all_the_same() -> None:
    lost = asyncio.Event()

    async def loop_that_loses_one_cancellation() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            lost.set()  # swallowed, as wait_for's race swallows it: the loop goes on
        await asyncio.Event().wait()  # and waits on, for ever unless cancelled again

    task = asyncio.create_task(loop_that_loses_one_cancellation())
    await asyncio.sleep(0)
    await asyncio.wait_for(stop_task(task, every_s=0.01), 5.0)
    assert lost.is_set()
    assert task.cancelled()


async def test_a_task_that_ended_on_its_own_is_left_as_it_is() -> None:
    task = asyncio.create_task(asyncio.sleep(0))
    await task
    await stop_task(task)
    assert task.done() and not task.cancelled()
