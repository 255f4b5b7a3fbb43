"""Fixtures for the whole-stack and fault tests: functions that hold calls, and workers whose
``main()`` task the test can watch."""

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from faas_gateway.core.functions import Registry
from queue_worker.worker import Worker
from tests.conftest import worker_settings
from tests.harness import NatsServer, Recorder, wait_until
from tests.system.helpers import WAIT_S, HeldFunction, HeldStarter, WorkerStarter


@pytest.fixture
async def held(recorder: Callable[..., Awaitable[Recorder]]) -> AsyncIterator[HeldStarter]:
    """``await held(hold_s=..., hold_repeats=...)``: a function server and its hold control.

    Every hold is released at teardown, before the servers close (which waits for handlers).
    """
    made: list[HeldFunction] = []

    async def start(
        hold_s: float = 60.0, hold_repeats: bool = True
    ) -> tuple[Recorder, HeldFunction]:
        function = HeldFunction(hold_s, hold_repeats)
        made.append(function)
        return await recorder(function), function

    yield start
    for function in made:
        function.released.set()


@pytest.fixture
async def run_worker(nats_server: NatsServer) -> AsyncIterator[WorkerStarter]:
    """Like ``start_worker`` but also hands back the ``main()`` task, and can skip the wait."""
    running: list[tuple[Worker, asyncio.Task[None]]] = []

    async def start(
        registry: Registry, *, wait_ready: bool = True, **overrides: Any
    ) -> tuple[Worker, asyncio.Task[None]]:
        worker = Worker(worker_settings(nats_server.url, **overrides), registry)
        task = asyncio.create_task(worker.main())
        running.append((worker, task))
        if wait_ready:
            await wait_until(
                lambda: worker.ready.is_set() or task.done(), WAIT_S, "the worker to consume"
            )
            if task.done():
                task.result()
        return worker, task

    yield start
    for worker, _ in running:
        worker.request_stop()
        worker.request_stop()  # tests end at once: running calls go back to the queue
    for _, task in running:
        if task.done() and not task.cancelled() and task.exception() is not None:
            continue  # a failure the test looked at already
        await asyncio.wait_for(task, WAIT_S)
