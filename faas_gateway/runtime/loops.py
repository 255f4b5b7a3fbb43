"""The event loop: uvloop where it is installed (its transports and loop are C, and socket
I/O is most of what a gateway does), else asyncio's own."""

import asyncio
import contextlib
import logging
from typing import Any, Literal

log = logging.getLogger("faas")

EventLoopChoice = Literal["auto", "uvloop", "asyncio"]


def new_event_loop(choice: EventLoopChoice) -> asyncio.AbstractEventLoop:
    if choice != "asyncio":
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise
            log.info("uvloop is not installed; using asyncio's event loop")
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()


async def stop_task(task: "asyncio.Task[Any]", every_s: float = 1.0) -> None:
    """Cancel ``task`` and wait until it has ended, cancelling it again every ``every_s``.

    On Python 3.11, asyncio.wait_for loses a cancellation that arrives just as what it waits
    for completes (nats-py's fetches and key-value watches wait that way), and a loop whose
    cancellation was lost goes on: cancelled once, it could keep a process from stopping.
    """
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=every_s)
    with contextlib.suppress(asyncio.CancelledError):
        await task
