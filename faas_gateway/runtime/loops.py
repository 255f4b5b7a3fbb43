"""The event loop: uvloop where it is installed (its transports and loop are C, and socket
I/O is most of what a gateway does), else asyncio's own."""

import asyncio
import logging
from typing import Literal

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
