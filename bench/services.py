"""The harness's own HTTP services in one process: fast functions and a callback receiver.

    python -m bench.services --port 9700

Functions (the gateway's functions file points at these paths):
  /            echo: the request body back, Content-Type kept
  /instant     200 "ok" at once
  /sleep       sleeps ?ms= milliseconds (default 100), then 200
  /sink        reads and discards the request body, answers its size
  /big         streams ?bytes= zero bytes
Callback receiver:
  /callback    records X-Call-Id and the time it arrived
  /stats       {"callbacks": n, "unique": n, "first": t, "last": t} (monotonic seconds)
  /reset       forgets every callback so far
"""

import argparse
import asyncio
import time
from collections import Counter

from aiohttp import web

CHUNK = b"\0" * (256 * 1024)


class Callbacks:
    def __init__(self) -> None:
        self.per_call: Counter[str] = Counter()
        self.count = 0
        self.first_s: float | None = None
        self.last_s: float | None = None

    async def receive(self, request: web.Request) -> web.Response:
        await request.read()
        now = time.monotonic()
        self.per_call[request.headers.get("X-Call-Id", "")] += 1
        self.count += 1
        self.first_s = self.first_s or now
        self.last_s = now
        return web.Response(text="ok")

    async def stats(self, request: web.Request) -> web.Response:
        duplicates = sum(n - 1 for n in self.per_call.values() if n > 1)
        return web.json_response(
            {
                "callbacks": self.count,
                "unique": len(self.per_call),
                "duplicates": duplicates,
                "first": self.first_s,
                "last": self.last_s,
            }
        )

    async def reset(self, request: web.Request) -> web.Response:
        self.__init__()  # type: ignore[misc]
        return web.Response(text="reset")


async def echo(request: web.Request) -> web.Response:
    return web.Response(body=await request.read(), content_type=request.content_type)


async def instant(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(text="ok")


async def sleep(request: web.Request) -> web.Response:
    await request.read()
    await asyncio.sleep(float(request.query.get("ms", "100")) / 1000)
    return web.Response(text="slept")


async def sink(request: web.Request) -> web.Response:
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
    return web.Response(text=str(size))


async def big(request: web.Request) -> web.StreamResponse:
    remaining = int(request.query.get("bytes", str(100 * 1024 * 1024)))
    response = web.StreamResponse()
    response.content_length = remaining
    await response.prepare(request)
    while remaining > 0:
        piece = CHUNK[: min(remaining, len(CHUNK))]
        await response.write(piece)
        remaining -= len(piece)
    await response.write_eof()
    return response


def build_app() -> web.Application:
    callbacks = Callbacks()
    app = web.Application(client_max_size=1024**3)
    app.router.add_route("*", "/instant", instant)
    app.router.add_route("*", "/sleep", sleep)
    app.router.add_route("*", "/sink", sink)
    app.router.add_route("*", "/big", big)
    app.router.add_post("/callback", callbacks.receive)
    app.router.add_get("/stats", callbacks.stats)
    app.router.add_post("/reset", callbacks.reset)
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    # Plain aiohttp on asyncio's own loop: the upstream the reference figures used.
    web.run_app(
        build_app(),
        host=args.host,
        port=args.port,
        access_log=None,
        print=None,
    )


if __name__ == "__main__":
    main()
