"""Worker CPU per call, this checkout's queue-worker against another checkout's, in turns.

python -m bench.worker_ab --before ../wt-base              # 8,000 calls, 3 rounds
python -m bench.worker_ab --before ../wt-base --calls 20000 --rounds 5

One stack (nats-server, the harness's functions and one gateway, all from this checkout);
each drain queues the calls to the instant function, then starts one worker (max_inflight
100) from one checkout or the other with its own .venv, and counts the worker's CPU time per
call until every callback has come, as scenario 6 does. Rounds alternate which worker goes
first, records off and then on; medians are printed. Only the worker differs between the two,
so on a shared machine this is the steadiest before/after figure of the worker (issue 16).
"""

import argparse
import asyncio
import os
import shutil
import statistics
import tempfile
from pathlib import Path
from typing import Any

from bench.scenarios import MIB, Context, callback_stats, enqueue, reset_callbacks
from bench.stack import ROOT, BenchStack, Ports, Proc, wait_for_http


async def drain(ctx: Context, checkout: Path, calls: int, records: bool) -> dict[str, Any]:
    stack = ctx.stack
    await reset_callbacks(ctx)
    await enqueue(ctx, "/async-function/instant", calls)
    env = {
        **os.environ,
        "nats_url": stack.nats_url,
        "functions_file": str(stack.functions_file),
        "log_level": "warning",
        "worker_port": str(stack.ports.worker),
        "max_inflight": "100",
        "record_activations": "true" if records else "false",
    }
    log_path = stack.run_dir / f"worker-{checkout.name}.log"
    with log_path.open("ab") as log:
        process = await asyncio.create_subprocess_exec(
            str(checkout / ".venv" / "bin" / "python"),
            "-m",
            "queue_worker",
            cwd=checkout,  # python -m puts the checkout first on the path: its own code runs
            env=env,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
    worker = Proc(checkout.name, process, log_path)
    try:
        await wait_for_http(f"http://127.0.0.1:{stack.ports.worker}/healthz", worker)
        worker.reset_peak()
        cpu_before = worker.cpu_seconds()  # after start-up, as in scenario 6
        while True:
            stats = await callback_stats(ctx)
            if stats["unique"] >= calls:
                break
            await asyncio.sleep(0.2)
        cpu_s = worker.cpu_seconds() - cpu_before
        peak_mib = worker.peak_rss_bytes() / MIB
    finally:
        await worker.stop()
    span_s = (stats["last"] or 0) - (stats["first"] or 0)
    return {
        "cpu_us_per_call": cpu_s * 1e6 / stats["unique"],
        "completed_per_s": (stats["unique"] - 1) / span_s if span_s > 0 else 0.0,
        "duplicate_callbacks": stats["duplicates"],
        "peak_rss_mib": peak_mib,
    }


async def run(before: Path, calls: int, rounds: int, base_port: int) -> None:
    checkouts = {"before": before, "after": ROOT}
    run_dir = Path(tempfile.mkdtemp(prefix="faas-bench-ab-"))
    stack = BenchStack(run_dir, Ports(base_port))
    stack.write_functions_file()
    runs: dict[tuple[bool, str], list[dict[str, Any]]] = {}
    try:
        await stack.start_nats()
        services = await stack.start_services()
        gateway = await stack.start_gateway("gateway", stack.ports.gateway, workers=1)
        ctx = Context(
            stack=stack,
            tool="n/a",
            seconds=0,
            rounds=rounds,
            quick=False,
            gateway_workers=1,
            services=services,
            gateway=gateway,
            gateway_multi=gateway,
            peers=[],
            log=print,
        )
        for records in (False, True):
            for round_number in range(rounds):
                order = ("before", "after") if round_number % 2 == 0 else ("after", "before")
                for name in order:
                    result = await drain(ctx, checkouts[name], calls, records)
                    runs.setdefault((records, name), []).append(result)
                    print(
                        f"records {'on' if records else 'off'}, round {round_number + 1}, "
                        f"{name}: {result['cpu_us_per_call']:.0f} µs CPU per call, "
                        f"{result['completed_per_s']:,.0f} completions/s, "
                        f"{result['duplicate_callbacks']} duplicate callbacks, "
                        f"peak RSS {result['peak_rss_mib']:.0f} MiB",
                        flush=True,
                    )
    finally:
        await stack.stop_all()
        shutil.rmtree(run_dir, ignore_errors=True)
    print(f"\nmedians of {rounds} rounds of {calls:,} calls ({checkouts['before']} as before):")
    for records in (False, True):
        cpu = {
            name: statistics.median(r["cpu_us_per_call"] for r in runs[records, name])
            for name in checkouts
        }
        rate = {
            name: statistics.median(r["completed_per_s"] for r in runs[records, name])
            for name in checkouts
        }
        print(
            f"  records {'on' if records else 'off'}: CPU per call before {cpu['before']:.0f} µs, "
            f"after {cpu['after']:.0f} µs ({cpu['after'] / cpu['before'] - 1:+.0%}); "
            f"completions/s before {rate['before']:,.0f}, after {rate['after']:,.0f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.worker_ab",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--before", type=Path, required=True, help="the other checkout (with its own .venv)"
    )
    parser.add_argument("--calls", type=int, default=8000, help="calls per drain")
    parser.add_argument("--rounds", type=int, default=3, help="drains per worker and setting")
    parser.add_argument("--base-port", type=int, default=9880, help="first of six ports")
    args = parser.parse_args()
    asyncio.run(run(args.before.resolve(), args.calls, args.rounds, args.base_port))


if __name__ == "__main__":
    main()
