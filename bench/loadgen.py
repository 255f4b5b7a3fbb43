"""The built-in load generator, for machines without wrk: N keep-alive connections, each
sending requests back to back for a fixed time. Prints a LoadResult as JSON.

    python -m bench.loadgen --url http://127.0.0.1:8080/function/echo --connections 50 --seconds 10
"""

import argparse
import asyncio
import json
import statistics
import time

import aiohttp

from faas_gateway.runtime.loops import new_event_loop


async def generate(
    url: str, connections: int, seconds: float, method: str, body: bytes, headers: dict[str, str]
) -> dict[str, object]:
    latencies_s: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
        started = time.perf_counter()
        deadline = started + seconds

        async def one_connection() -> None:
            nonlocal errors
            while (sent := time.perf_counter()) < deadline:
                try:
                    async with session.request(method, url, data=body, headers=headers) as response:
                        await response.read()
                        if response.status >= 400:
                            errors += 1
                except aiohttp.ClientError:
                    errors += 1
                    continue
                latencies_s.append(time.perf_counter() - sent)

        await asyncio.gather(*(one_connection() for _ in range(connections)))
        elapsed_s = time.perf_counter() - started
    cuts = statistics.quantiles(latencies_s, n=100) if len(latencies_s) > 1 else [0.0] * 99
    return {
        "tool": "builtin",
        "requests": len(latencies_s),
        "seconds": elapsed_s,
        "requests_per_s": len(latencies_s) / elapsed_s,
        "p50_ms": cuts[49] * 1000,
        "p90_ms": cuts[89] * 1000,
        "p99_ms": cuts[98] * 1000,
        "errors": errors,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", required=True)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--method", default="POST")
    parser.add_argument("--body-bytes", type=int, default=1024)
    parser.add_argument("--body", help="the request body as text, instead of --body-bytes of x")
    parser.add_argument("--headers", default="{}", help="JSON object of extra headers")
    args = parser.parse_args()
    loop = new_event_loop("auto")
    result = loop.run_until_complete(
        generate(
            args.url,
            args.connections,
            args.seconds,
            args.method,
            b"x" * args.body_bytes if args.body is None else args.body.encode(),
            json.loads(args.headers),
        )
    )
    loop.close()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
