"""make bench: start a stack of our own, run the scenarios, print and save the figures.

python -m bench                 # the full run (about 8 minutes); writes bench/SUMMARY.md
python -m bench --quick         # about a minute: shorter runs, one round
python -m bench --peer http://127.0.0.1:8080   # also measure another gateway
python -m bench --scenarios 1,2 --peer http://127.0.0.1:8080 --peer-pid 1234
                                # ... and its CPU per request (or --peer-cgroup PATH)
"""

import argparse
import asyncio
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

from bench.load import load_tool
from bench.scenarios import SCENARIOS, Context, Result, peer_name, sync_comparison_table
from bench.stack import ROOT, BenchStack, CgroupCpu, CpuSource, PidCpu, Ports

RESULTS_DIR = ROOT / "bench" / "results"
SUMMARY = ROOT / "bench" / "SUMMARY.md"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="the one-minute version")
    parser.add_argument(
        "--seconds", type=float, help="length of one measurement (default 10, quick 2)"
    )
    parser.add_argument(
        "--rounds", type=int, help="rounds per comparison, median taken (default 5, quick 1)"
    )
    parser.add_argument(
        "--scenarios",
        default=",".join(str(number) for number in SCENARIOS),
        help="comma-separated scenario numbers (default all)",
    )
    parser.add_argument(
        "--peer",
        action="append",
        default=[],
        metavar="URL",
        help="another gateway to measure beside ours; it must route /function/echo to the "
        "harness's upstream (printed at start)",
    )
    parser.add_argument(
        "--peer-pid",
        action="append",
        default=[],
        type=int,
        metavar="PID",
        help="the process of the peer given in the same position (its children counted too), "
        "for its CPU per request",
    )
    parser.add_argument(
        "--peer-cgroup",
        action="append",
        default=[],
        type=Path,
        metavar="PATH",
        help="the cgroup directory of the peer given in the same position (a container's, "
        "say), for its CPU per request; instead of --peer-pid",
    )
    parser.add_argument(
        "--base-port", type=int, default=9700, help="first of six ports the harness uses"
    )
    parser.add_argument(
        "--gateway-workers",
        type=int,
        default=os.cpu_count() or 2,
        help="processes of the multi-process gateway measured beside the single one "
        "(default: CPUs)",
    )
    parser.add_argument(
        "--load", choices=["auto", "wrk", "builtin"], default="auto", help="load generator"
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the run folder (logs, NATS store)"
    )
    parser.add_argument(
        "--results-dir", type=Path, default=RESULTS_DIR, help="where the JSON and markdown go"
    )
    args = parser.parse_args(argv)
    try:
        peer_cpu(args)
    except (ValueError, RuntimeError) as exc:
        parser.error(str(exc))
    return args


def peer_cpu(args: argparse.Namespace) -> dict[str, CpuSource]:
    """Where each peer's CPU time is read, by its target name: the n-th --peer-pid or
    --peer-cgroup goes with the n-th --peer."""
    if args.peer_pid and args.peer_cgroup:
        raise ValueError("give either --peer-pid or --peer-cgroup, not both")
    sources: list[CpuSource] = [PidCpu(pid) for pid in args.peer_pid]
    sources += [CgroupCpu(path) for path in args.peer_cgroup]
    if len(sources) > len(args.peer):
        raise ValueError("more --peer-pid/--peer-cgroup than --peer")
    for source in sources:
        source.cpu_seconds()  # a wrong pid or path is found now, not after minutes of load
    return {peer_name(peer): source for peer, source in zip(args.peer, sources, strict=False)}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    sys.exit(asyncio.run(run(args)))


async def run(args: argparse.Namespace) -> int:
    seconds = args.seconds or (2.0 if args.quick else 10.0)
    rounds = args.rounds or (1 if args.quick else 5)
    numbers = [int(part) for part in args.scenarios.split(",") if part.strip()]
    tool = load_tool(args.load)
    ports = Ports(args.base_port)
    run_dir = Path(tempfile.mkdtemp(prefix="faas-bench-"))
    started = time.time()

    def log(line: str) -> None:
        print(line, flush=True)

    log(
        f"load generator: {tool}" + ("" if tool == "wrk" else " (install wrk for steadier figures)")
    )
    log(
        f"upstream for --peer gateways: http://127.0.0.1:{ports.services} "
        "(route their /function/echo to it)"
    )
    log(f"run folder: {run_dir}")
    stack = BenchStack(run_dir, ports)
    stack.write_functions_file()
    results: dict[int, Result] = {}
    try:
        await stack.start_nats()
        services = await stack.start_services()
        gateway = await stack.start_gateway("gateway", ports.gateway, workers=1)
        gateway_multi = await stack.start_gateway(
            "gateway-multi", ports.gateway_multi, workers=args.gateway_workers
        )
        await stack.start_baseline()
        ctx = Context(
            stack=stack,
            tool=tool,
            seconds=seconds,
            rounds=rounds,
            quick=args.quick,
            gateway_workers=args.gateway_workers,
            services=services,
            gateway=gateway,
            gateway_multi=gateway_multi,
            peers=args.peer,
            log=log,
            results=results,
            peer_cpu=peer_cpu(args),
        )
        for number in numbers:
            scenario = SCENARIOS[number]
            log(f"scenario {number}: {scenario.__name__.replace('_', ' ')}")
            try:
                results[number] = await scenario(ctx)
            except Exception as exc:  # one broken scenario must not hide the others' figures
                traceback.print_exc()
                results[number] = Result(
                    number, scenario.__name__, f"failed: {exc}", None, "", False
                )
            log(f"  -> {results[number].figure}")
    finally:
        await stack.stop_all()
        if not args.keep:
            shutil.rmtree(run_dir, ignore_errors=True)
    meta = {
        "started": datetime.fromtimestamp(started, UTC).isoformat(timespec="seconds"),
        "duration_s": round(time.time() - started),
        "quick": args.quick,
        "seconds": seconds,
        "rounds": rounds,
        "load_tool": tool,
        "gateway_workers": args.gateway_workers,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "commit": git_commit(),
        "command": "python -m bench " + " ".join(sys.argv[1:] if argv_is_cli() else []),
    }
    ordered = [results[number] for number in sorted(results)]
    table = markdown_table(ordered)
    comparison = sync_comparison_table(results)
    if comparison is not None:
        table += "\n\nScenarios 1 and 2 side by side:\n\n" + comparison
    print("\n" + table)
    save(
        meta,
        ordered,
        table,
        args.results_dir,
        write_summary=not args.quick and set(numbers) == set(SCENARIOS),
    )
    return 0


def argv_is_cli() -> bool:
    return Path(sys.argv[0]).name in ("__main__.py", "bench")


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def verdict(met: bool | None) -> str:
    return {True: "yes", False: "NO", None: "n/a"}[met]


def markdown_table(results: list[Result]) -> str:
    lines = ["| # | scenario | measured | target | met |", "|---|---|---|---|---|"]
    for result in results:
        cells = [str(result.number), result.title, result.figure, result.target]
        lines.append("| " + " | ".join([*cells, verdict(result.met)]) + " |")
    return "\n".join(lines)


def save(
    meta: dict[str, object],
    results: list[Result],
    table: str,
    results_dir: Path,
    write_summary: bool,
) -> None:
    results_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    (results_dir / f"{stamp}.json").write_text(
        json.dumps({"meta": meta, "results": [asdict(result) for result in results]}, indent=2)
    )
    summary = "\n".join(
        [
            "# Benchmark summary",
            "",
            f"Run {meta['started']} on commit {meta['commit']}: {meta['cpus']} CPUs, Python "
            f"{meta['python']}, load by {meta['load_tool']}, {meta['rounds']} round(s) of "
            f"{meta['seconds']} s per figure (medians), {meta['duration_s']} s in all. "
            f"Command: `{meta['command'].strip()}`.",
            "",
            table,
            "",
        ]
    )
    (results_dir / f"{stamp}.md").write_text(summary)
    (results_dir / "latest.md").write_text(summary)
    print(f"\nwrote {results_dir / (stamp + '.json')} and {results_dir / (stamp + '.md')}")
    if write_summary:
        SUMMARY.write_text(summary)
        print(f"wrote {SUMMARY}")
