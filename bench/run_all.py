"""All platform benchmarks side by side, in one run, each next to its raw-broker figure.

  1. pipeline   N families through intake → visits → referrals → reporting, four service
                processes on the real broker; families/s and events/s against plain aiokafka
                produce+consume of the same messages on the same broker (pipeline.py)
  2. latency    a steady offered load on the same stack right after the pipeline: p50/p95/p99
                from intake's HTTP answer to "visit scheduled" and to the key figure that
                counts the family (latency.py)
  3. replay     the reporting projections rebuilt by replay against raw aiokafka consume
                (reporting_replay.py, in a process of its own, on a broker of its own)
  4. memory     peak RSS per service process during pipeline and latency runs

Sizes:        default  2,000 families · 10/s for 60 s · 200,000 replayed events
              --quick    500 families · 10/s for 20 s ·  20,000 replayed events
              --tiny      20 families · 10/s for  1 s ·   2,000 replayed events (smoke test:
                          the replay runs alongside, figures mean nothing)

Usage:  uv run --frozen python bench/run_all.py [--quick | --tiny] [--database postgresql]
Prints a table; writes bench/results/run_all.json, pipeline.json, latency.json and
reporting_replay_run_all.json (or into --results-dir).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import latency
import pipeline
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine
from stack import DEFAULT_POSTGRES, RESULTS_DIR, Stack, machine

HERE = Path(__file__).resolve().parent

SIZES: dict[str, dict[str, Any]] = {
    "full": {"families": 2000, "rate": 10.0, "seconds": 60.0, "warmup": 10, "events": 200_000},
    "quick": {"families": 500, "rate": 10.0, "seconds": 20.0, "warmup": 10, "events": 20_000},
    "tiny": {"families": 20, "rate": 10.0, "seconds": 1.0, "warmup": 3, "events": 2_000},
}


def replay_process(args: argparse.Namespace, events: int, output: Path) -> subprocess.Popen[str]:
    command = [
        sys.executable,
        str(HERE / "reporting_replay.py"),
        "--events",
        str(events),
        "--output",
        str(output),
    ]
    if args.database:
        # The replay needs an empty database of its own.
        command += ["--database", _replay_database(args.database)]
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=HERE.parent
    )


def _replay_database(database: str) -> str:
    """An empty PostgreSQL database for the replay (left behind for inspection)."""
    base = DEFAULT_POSTGRES if database == "postgresql" else database
    name = f"bench_replay_{uuid.uuid4().hex[:8]}"

    async def create() -> None:
        admin = create_async_engine(
            base.replace("postgresql://", "postgresql+asyncpg://", 1), isolation_level="AUTOCOMMIT"
        )
        try:
            async with admin.connect() as conn:
                await conn.execute(text(f'CREATE DATABASE "{name}"'))
        finally:
            await admin.dispose()

    asyncio.run(create())
    return f"{base.rsplit('/', 1)[0]}/{name}"


def finish_replay(process: subprocess.Popen[str], output: Path, timeout_s: float) -> dict[str, Any]:
    try:
        _, stderr = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        return {"benchmark": "reporting_replay", "error": f"no result within {timeout_s:.0f} s"}
    if process.returncode != 0:
        return {"benchmark": "reporting_replay", "error": stderr[-3000:]}
    result: dict[str, Any] = json.loads(output.read_text())
    return result


def table(results: dict[str, Any]) -> str:
    lines = []
    pipe, lat, rep = results["pipeline"], results["latency"], results["reporting_replay"]
    raw = pipe["raw_aiokafka"]
    lines.append(f"{'benchmark':<30} {'platform':>16} {'raw broker':>16} {'ratio':>9}")
    lines.append("-" * 74)
    lines.append(
        f"{'pipeline families/s':<30} {pipe['families_per_s']:>16,.1f} "
        f"{pipe['raw_equivalent_families_per_s']:>16,.1f} "
        f"{pipe['families_per_s'] / pipe['raw_equivalent_families_per_s']:>9.4f}"
    )
    lines.append(
        f"{'pipeline events/s':<30} {pipe['events_per_s']:>16,.1f} "
        f"{raw['messages_per_s']:>16,.1f} {pipe['ratio_events_to_raw']:>9.4f}"
    )
    lines.append(
        f"{'  of which domain events/s':<30} {pipe['domain_events_per_s']:>16,.1f} {'':>16} {'':>9}"
    )
    if "error" in rep:
        state = "skipped" if rep["error"] == "skipped" else "failed"
        lines.append(f"{'replay events/s':<30} {state:>16}")
    else:
        lines.append(
            f"{'replay events/s':<30} {rep['replay']['events_per_s']:>16,.0f} "
            f"{rep['raw_consume']['events_per_s']:>16,} {rep['ratio_replay_to_raw']:>9.4f}"
        )
    lines.append("")
    lines.append(
        f"latency at {lat['rate_per_s']}/s for {lat['seconds']} s (ms)   "
        f"{'p50':>8} {'p95':>8} {'p99':>8} {'max':>8}"
    )
    for name, cut in lat["latency_ms"].items():
        if cut:
            lines.append(
                f"  {name:<36} {cut['p50']:>8.0f} {cut['p95']:>8.0f} {cut['p99']:>8.0f} "
                f"{cut['max']:>8.0f}"
            )
    lines.append("")
    lines.append(f"{'peak RSS (MB)':<22} {'pipeline':>10} {'latency':>10}")
    for name, peak in pipe["memory"]["peak_rss_mb"].items():
        other = lat["memory"]["peak_rss_mb"].get(name, 0.0)
        lines.append(f"  {name:<20} {peak:>10.0f} {other:>10.0f}")
    if "error" not in rep:
        lines.append(f"  {'replay process':<20} {rep['replay']['peak_rss_mb']:>10.0f}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smaller sizes (a few minutes)")
    size.add_argument("--tiny", action="store_true", help="smoke-test sizes (seconds)")
    parser.add_argument(
        "--database", default=None, help="postgresql, or a PostgreSQL URL (default SQLite)"
    )
    parser.add_argument("--families", type=int, default=None, help="override the size")
    parser.add_argument("--rate", type=float, default=None, help="override the latency load")
    parser.add_argument("--seconds", type=float, default=None, help="override its duration")
    parser.add_argument("--replay-events", type=int, default=None, help="override the size")
    parser.add_argument("--skip-replay", action="store_true")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--seed", type=int, default=9)
    parser.add_argument("--keep", action="store_true", help="keep the data dir (logs, DBs)")
    args = parser.parse_args()
    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    sizes = SIZES[mode]
    out = args.results_dir
    out.mkdir(parents=True, exist_ok=True)
    database = DEFAULT_POSTGRES if args.database == "postgresql" else args.database
    about = machine()
    started = time.perf_counter()

    replay = None
    # Not reporting_replay.json: that one holds the standalone (1,000,000-event) run.
    replay_output = out / "reporting_replay_run_all.json"
    events = args.replay_events or sizes["events"]
    if not args.skip_replay and mode == "tiny":
        replay = replay_process(args, events, replay_output)

    pipe_args = argparse.Namespace(
        families=args.families or sizes["families"],
        concurrency=8,
        consent_share=0.9,
        handover_share=0.25,
        timeout=900.0,
        referral_grace=120.0,
        seed=args.seed,
    )
    lat_args = argparse.Namespace(
        rate=args.rate or sizes["rate"],
        seconds=args.seconds or sizes["seconds"],
        warmup=sizes["warmup"],
        handover_share=0.25,
        timeout=300.0,
        seed=args.seed,
    )
    common = {"machine": about, "when": datetime.now(UTC).isoformat(timespec="seconds")}
    tiny = mode == "tiny"
    with Stack(
        database=database,
        keep=args.keep,
        # Faster group joins for the smoke test; real runs keep sessions that survive load.
        session_timeout_ms=2000 if tiny else 6000,
        heartbeat_interval_ms=300 if tiny else 500,
    ) as stack:
        common.update(broker=stack.broker_name, database=stack.database_kind, mode=mode)
        pipe = {"benchmark": "pipeline", **common, **asyncio.run(pipeline.drive(stack, pipe_args))}
        (out / "pipeline.json").write_text(json.dumps(pipe, indent=2) + "\n")
        print(pipeline.summary(pipe), file=sys.stderr)
        lat = {
            "benchmark": "latency",
            **common,
            "stack": "shared: right after the pipeline, on the same services and databases",
            **asyncio.run(latency.measure(stack, lat_args)),
        }
        (out / "latency.json").write_text(json.dumps(lat, indent=2) + "\n")
        print(latency.summary(lat), file=sys.stderr)
        if not (pipe["complete"] and lat["complete"]):
            logs = stack.service_logs_tail()
            pipe["service_logs"] = logs

    if args.skip_replay:
        rep: dict[str, Any] = {"benchmark": "reporting_replay", "error": "skipped"}
    else:
        if replay is None:
            print(f"reporting replay: {events:,} events …", file=sys.stderr)
            replay = replay_process(args, events, replay_output)
        rep = finish_replay(replay, replay_output, timeout_s=1800)

    results = {
        "benchmark": "run_all",
        **common,
        "seconds": round(time.perf_counter() - started, 1),
        "pipeline": pipe,
        "latency": lat,
        "reporting_replay": rep,
    }
    (out / "run_all.json").write_text(json.dumps(results, indent=2) + "\n")
    print()
    print(
        f"Lotse benchmarks ({mode}; {about['cpus']} cores, {about['ram_gb']} GB RAM, "
        f"Python {about['python']}; {common['broker']}; {common['database']}; "
        f"load avg at start {about['load_avg_1m_at_start']})"
    )
    print(table(results))
    print(f"\nresults: {out / 'run_all.json'} (took {results['seconds']} s)")
    replay_ok = "error" not in rep or rep["error"] == "skipped"
    ok = pipe["complete"] and lat["complete"] and replay_ok
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
