"""Sample functions for the local stack and docker-compose: echo, sleep and status.

python deploy/sample_functions.py echo --port 9001
"""

import argparse
import asyncio
import contextlib
import json
import math
import time
from collections.abc import Awaitable, Callable

from aiohttp import web


async def echo(request: web.Request) -> web.StreamResponse:
    """200 with the request body and Content-Type unchanged, streamed."""
    response = web.StreamResponse(status=200)
    if request.content_type and "Content-Type" in request.headers:
        response.headers["Content-Type"] = request.headers["Content-Type"]
    if request.content_length is not None:
        response.content_length = request.content_length
    await response.prepare(request)
    async for chunk in request.content.iter_any():
        await response.write(chunk)
    await response.write_eof()
    return response


STOPPING: web.AppKey[asyncio.Event] = web.AppKey("stopping", asyncio.Event)


async def sleep(request: web.Request) -> web.Response:
    """Sleeps ?seconds= (default 1, fractions allowed), then 200 {"slept": seconds}. A stop
    (SIGTERM) ends every sleep at once with 503 and how long it slept, rather than holding the
    process for the rest: the caller may try again (the worker retries a 503)."""
    raw = request.query.get("seconds", "1")
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds < 0:
        return web.json_response(
            {"error": f"seconds must be a number >= 0, got {raw!r}"}, status=400
        )
    await request.read()
    print(f"sleeping {seconds:g}s", flush=True)  # the request's own line comes at its end
    started = time.monotonic()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(request.app[STOPPING].wait(), seconds)
        slept = round(time.monotonic() - started, 3)
        return web.json_response(
            {"error": f"stopping: slept {slept} of {seconds} seconds", "slept": slept},
            status=503,
        )
    return web.json_response({"slept": seconds})


async def status(request: web.Request) -> web.Response:
    """Answers with the status in ?code= (default 200) and a short JSON body."""
    raw = request.query.get("code", "200")
    if not raw.isdigit() or not 200 <= int(raw) <= 599:
        return web.json_response({"error": f"code must be 200-599, got {raw!r}"}, status=400)
    code = int(raw)
    await request.read()
    body = None if code in (204, 304) else json.dumps({"status": code}).encode()
    return web.Response(status=code, body=body, content_type="application/json" if body else None)


FUNCTIONS = {"echo": echo, "sleep": sleep, "status": status}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def log_requests(request: web.Request, handler: Handler) -> web.StreamResponse:
    """One line per request, so a callback posted to a sample function shows in `make run`."""
    response = await handler(request)
    details = [f"{request.method} {request.rel_url} -> {response.status}"]
    for header in ("X-Call-Id", "X-Function-Name", "X-Function-Status"):
        if header in request.headers:
            details.append(f"{header}={request.headers[header]}")
    print(" ".join(details), flush=True)
    return response


def build_app(name: str) -> web.Application:
    # Large uploads are streamed by echo; the others accept up to 64 MiB.
    app = web.Application(client_max_size=64 * 1024 * 1024, middlewares=[log_requests])
    app.router.add_route("*", "/{tail:(?s:.*)}", FUNCTIONS[name])  # any path, %0A too
    app[STOPPING] = asyncio.Event()
    app.on_shutdown.append(stop_sleeping)
    return app


async def stop_sleeping(app: web.Application) -> None:
    """On SIGTERM aiohttp stops listening, runs this, then waits for running handlers."""
    app[STOPPING].set()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("function", choices=sorted(FUNCTIONS))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    listening = f"{args.function} listening on http://{args.host}:{args.port}"
    web.run_app(
        build_app(args.function),
        host=args.host,
        port=args.port,
        # Once the port is bound, so that whoever waits for the line can call at once.
        print=lambda _: print(listening, flush=True),
        access_log=None,
    )


if __name__ == "__main__":
    main()
