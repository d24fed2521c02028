"""Idle is idle: what the four services burn with nothing flowing, and that a family
registered after the quiet still gets its visit scheduled promptly.

  stack     as in pipeline.py (broker, four service processes, own databases, tokens), but
            with the services' default consumer sessions, heartbeats and job intervals
  warm-up   a few families, until each has its "visit scheduled" (consumer groups joined,
            caches warm), then --settle seconds of quiet
  idle      CPU time (user + system, psutil) of each service process over --seconds with
            nothing sent: printed per service and in total, as a share of one core
  probe     --probes families, one at a time after --probe-gap seconds of quiet each: time
            from the HTTP 201 of the registration to its "visit scheduled" on lotse.visits

The Tansu broker's CPU is printed beside the services' (it is not one of them).

Usage:  uv run --frozen python bench/idle.py [--seconds 60] [--database postgresql]
Prints a summary and writes bench/results/idle.json (or --output).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]
from stack import BROKER, RESULTS_DIR, Stack, add_settings_option, percentiles, run_on_own_stack
from workload import Intake, Stopwatch, plan_families

#: Idle is measured as deployed: the services' own consumer session, heartbeat and job
#: intervals, not the benchmarks' faster ones.
PRODUCTION_DEFAULTS: dict[str, Any] = {
    "session_timeout_ms": 10_000,
    "heartbeat_interval_ms": 3_000,
    "placement_interval_s": None,
}
#: The issue's ceiling for the four services together, in % of one core.
IDLE_CEILING_PERCENT = 2.0


def _cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


async def measure(stack: Stack, args: argparse.Namespace) -> dict[str, Any]:
    families = plan_families(
        stack.city, args.warmup + args.probes, seed=7, consent_share=1.0, handover_share=0.0
    )
    watch = Stopwatch(stack)
    await watch.start()
    intake = Intake(stack)
    try:
        warm = await asyncio.gather(*(intake.send(f) for f in families[: args.warmup]))
        if not await watch.wait_for({}, {s.case_id for s in warm}, timeout_s=120):
            raise RuntimeError("warm-up families got no visit scheduled within 120 s")
        print(f"idle: settling {args.settle:.0f} s, then measuring {args.seconds:.0f} s …",
              file=sys.stderr)  # fmt: skip
        await asyncio.sleep(args.settle)
        processes = {name: psutil.Process(pid) for name, pid in stack.pids().items()}
        load_at_start = os.getloadavg()[0]
        before = {name: _cpu_seconds(p) for name, p in processes.items()}
        started = time.perf_counter()
        await asyncio.sleep(args.seconds)
        elapsed = time.perf_counter() - started
        after = {name: _cpu_seconds(p) for name, p in processes.items()}
        percent = {
            name: round(100 * (after[name] - before[name]) / elapsed, 3) for name in processes
        }
        services = {name: v for name, v in percent.items() if name != BROKER}
        probes = []
        for family in families[args.warmup :]:
            await asyncio.sleep(args.probe_gap)
            sent = await intake.send(family)
            await watch.wait_for({}, {sent.case_id}, timeout_s=30)
            if sent.case_id in watch.visit_scheduled:
                probes.append((watch.visit_scheduled[sent.case_id] - sent.returned) * 1000)
    finally:
        await watch.stop()
        await intake.close()
    total = round(sum(services.values()), 3)
    return {
        "complete": len(probes) == args.probes,
        "idle_seconds": round(elapsed, 1),
        "load_avg_1m_at_measurement": round(load_at_start, 2),
        "cpu_percent_of_one_core": services,
        "cpu_percent_total": total,
        "ceiling_percent": IDLE_CEILING_PERCENT,
        "within_ceiling": total < IDLE_CEILING_PERCENT,
        "broker_cpu_percent": percent.get(BROKER),
        "probe_gap_s": args.probe_gap,
        "probe_http_to_visit_scheduled_ms": [round(p, 1) for p in probes],
        "probe_percentiles_ms": percentiles(probes),
    }


def summary(result: dict[str, Any]) -> str:
    lines = [
        f"idle ({result['database']}, {result['idle_seconds']} s, load "
        f"{result['load_avg_1m_at_measurement']} at start):"
    ]
    for name, value in result["cpu_percent_of_one_core"].items():
        lines.append(f"  {name:<10} {value:>7.3f} % of one core")
    lines.append(
        f"  {'total':<10} {result['cpu_percent_total']:>7.3f} %  (ceiling "
        f"{result['ceiling_percent']} %: {'met' if result['within_ceiling'] else 'NOT met'})"
    )
    if result.get("broker_cpu_percent") is not None:
        lines.append(f"  {'broker':<10} {result['broker_cpu_percent']:>7.3f} % (not a service)")
    lines.append(f"  probes after {result['probe_gap_s']} s quiet, HTTP 201 -> visit scheduled: "
                 f"{result['probe_http_to_visit_scheduled_ms']} ms")  # fmt: skip
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=60.0, help="how long to measure idle")
    parser.add_argument("--settle", type=float, default=15.0, help="quiet before measuring")
    parser.add_argument("--warmup", type=int, default=5, help="families before the quiet")
    parser.add_argument("--probes", type=int, default=5, help="families after the quiet")
    parser.add_argument("--probe-gap", type=float, default=5.0, help="quiet before each probe")
    parser.add_argument(
        "--database", default=None, help="postgresql, or a PostgreSQL URL (default SQLite)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the data dir (logs, DBs)")
    parser.add_argument(
        "--fetch-max-wait-ms", type=int, default=None, help="the services' consumer fetch wait"
    )
    add_settings_option(parser)
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "idle.json")
    args = parser.parse_args()
    result = run_on_own_stack("idle", measure, args, stack_options=PRODUCTION_DEFAULTS)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(summary(result), file=sys.stderr)
    return 0 if result["complete"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
