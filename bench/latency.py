"""Latency at a steady offered load: from intake's HTTP answer to the family's "visit
scheduled" on lotse.visits, and to the key figure on lotse.reporting.kpis that counts it.

  stack     as in pipeline.py (broker, four service processes, own databases, tokens)
  warm-up   a few families first, until reporting counts them (consumer groups joined,
            caches warm, the city-wide count out of the suppressed range)
  load      --rate families per second for --seconds, open loop: each registration starts
            at its planned time whether or not the ones before have returned (all consent
            to a welcome visit; --handover-share of them hand over to a Träger, who answers)
  (a)       per family: time from the HTTP 201 of its registration to its "visit
            scheduled" event arriving on lotse.visits (read with a 10 ms fetch wait)
  (b)       per family: time from its HTTP 201 to the first city-wide ``families_registered``
            figure of this year on lotse.reporting.kpis that is at least its rank (the
            number of registrations returned up to and including it): the figure counting it
  also      the HTTP call itself; p50/p95/p99/max of each, in milliseconds

Usage:  uv run --frozen python bench/latency.py [--rate 10] [--seconds 60] [--database postgresql]
Prints a summary and writes bench/results/latency.json (or --output).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lotse_contracts import topics as topic_names
from lotse_contracts.events.intake import FamilyRegistered
from lotse_contracts.events.visits import VisitScheduled
from lotse_runtime.db import Database
from sqlalchemy import text
from stack import (
    RESULTS_DIR,
    MemorySampler,
    Stack,
    add_settings_option,
    percentiles,
    run_on_own_stack,
)
from workload import Intake, Partners, Sent, Stopwatch, open_traeger_capacity, plan_families


async def measure(stack: Stack, args: argparse.Namespace) -> dict[str, Any]:
    """The latency run on a running stack (fresh, or after the pipeline: counts go on)."""
    total = args.warmup + round(args.rate * args.seconds)
    families = plan_families(
        stack.city,
        total,
        seed=args.seed + 1,
        consent_share=1.0,
        handover_share=args.handover_share,
        first=1_000_000,
    )
    await open_traeger_capacity(stack)
    watch = Stopwatch(stack)
    partners = Partners(stack)
    await watch.start()
    await partners.start()
    intake = Intake(stack)
    try:
        # Whatever is on the topics already, and the warm-up.
        await asyncio.sleep(1.0)
        before = watch.latest("families_registered")
        warm = await asyncio.gather(*(intake.send(f) for f in families[: args.warmup]))
        ok = await watch.wait_for(
            {"families_registered": before + args.warmup},
            {s.case_id for s in warm},
            timeout_s=120,
        )
        if not ok:
            raise RuntimeError("warm-up families were not counted within 120 s")
        base = watch.latest("families_registered") - intake.returned
        print(
            f"latency: {args.rate}/s for {args.seconds} s ({total - args.warmup} families) …",
            file=sys.stderr,
        )
        load = families[args.warmup :]
        with MemorySampler(stack.pids()) as memory:
            started = time.perf_counter()

            async def planned(i: int, family: Any) -> Sent:
                delay = started + i / args.rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                return await intake.send(family)

            sent = await asyncio.gather(*(planned(i, f) for i, f in enumerate(load)))
            offered_s = time.perf_counter() - started
            last_rank = max(s.rank for s in sent)
            complete = await watch.wait_for(
                {"families_registered": base + last_rank},
                {s.case_id for s in sent},
                timeout_s=args.timeout,
            )
    finally:
        await partners.stop()
        await watch.stop()
        await intake.close()
    to_visit = [
        (watch.visit_scheduled[s.case_id] - s.returned) * 1000
        for s in sent
        if s.case_id in watch.visit_scheduled
    ]
    to_kpi = []
    for s in sent:
        seen = watch.first_reaching("families_registered", base + s.rank)
        if seen is not None:
            to_kpi.append((seen - s.returned) * 1000)
    http = [(s.returned - s.started) * 1000 for s in sent]
    hops = await hop_breakdown(stack, {s.case_id for s in sent}, watch)
    return {
        "hops_ms": hops,
        "complete": complete,
        "rate_per_s": args.rate,
        "seconds": args.seconds,
        "families": len(sent),
        "warmup_families": args.warmup,
        "handovers": sum(s.family.handover is not None for s in sent),
        "offered_over_s": round(offered_s, 2),
        "achieved_rate_per_s": round(len(sent) / offered_s, 2) if offered_s else None,
        "latency_ms": {
            "http_to_visit_scheduled": percentiles(to_visit),
            "http_to_kpi_updated": percentiles(to_kpi),
            "http_call": percentiles(http),
        },
        "negative_to_visit": sum(v < 0 for v in to_visit),
        "kpi_messages_seen": watch.kpi_messages,
        "referrals_answered": partners.answered,
        "partner_client_restarts": partners.crashes,
        "http_retries": intake.retries,
        "http_server_errors": {str(k): v for k, v in intake.server_errors.items()},
        "memory": memory.report(),
    }


def _utc(value: Any) -> datetime:
    moment = datetime.fromisoformat(value) if isinstance(value, str) else value
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


async def _rows(stack: Stack, service: str, sql: str, **params: Any) -> list[Any]:
    db = Database(stack.services[service].database_url)
    try:
        async with db.engine.connect() as conn:
            return list(await conn.execute(text(sql), params))
    finally:
        await db.dispose()


async def hop_breakdown(stack: Stack, cases: set[str], watch: Stopwatch) -> dict[str, Any]:
    """Where the time from intake to "visit scheduled" goes, per family, from the services'
    own timestamps (one machine, one wall clock): intake's outbox row written → published
    (relay), → visits' inbox entry (broker and consumer fetch), → visits' outbox row
    (handler), → published (relay), → seen by the stopwatch (its own fetch)."""
    registered = {
        key: (event_id, _utc(created), _utc(sent))
        for key, event_id, created, sent in await _rows(
            stack,
            "intake",
            "SELECT record_key, event_id, created_at, sent_at FROM outbox "
            "WHERE event_type = :t AND topic = :topic AND sent_at IS NOT NULL",
            t=FamilyRegistered.event_type,
            topic=stack.topic(topic_names.INTAKE),
        )
        if key in cases
    }
    applied = {
        event_id: _utc(at)
        for event_id, at in await _rows(
            stack,
            "visits",
            "SELECT event_id, processed_at FROM inbox WHERE event_type = :t",
            t=FamilyRegistered.event_type,
        )
    }
    scheduled = {
        key: (_utc(created), _utc(sent))
        for key, created, sent in await _rows(
            stack,
            "visits",
            "SELECT record_key, created_at, sent_at FROM outbox "
            "WHERE event_type = :t AND topic = :topic AND sent_at IS NOT NULL",
            t=VisitScheduled.event_type,
            topic=stack.topic(topic_names.VISITS),
        )
    }
    # The stopwatch reads the monotonic clock: moved onto the wall clock once.
    offset = time.time() - time.perf_counter()
    names = ("intake_relay", "broker_to_visits_handler", "visits_handler", "visits_relay",
             "broker_to_stopwatch")  # fmt: skip
    hops: dict[str, list[float]] = {name: [] for name in names}
    for case_id, (event_id, written, published) in registered.items():
        if event_id not in applied or case_id not in scheduled:
            continue
        handled = applied[event_id]
        created, sent = scheduled[case_id]
        marks = [written, published, handled, created, sent]
        if case_id in watch.visit_scheduled:
            seen = datetime.fromtimestamp(watch.visit_scheduled[case_id] + offset, UTC)
            marks.append(seen)
        for name, start, end in zip(names, marks, marks[1:], strict=False):
            hops[name].append((end - start).total_seconds() * 1000)
    return {name: percentiles(values) for name, values in hops.items()}


def run(args: argparse.Namespace) -> dict[str, Any]:
    return run_on_own_stack("latency", measure, args, stack="own")


def summary(result: dict[str, Any]) -> str:
    lines = [
        f"latency ({result['database']}, {result['rate_per_s']}/s for {result['seconds']} s, "
        f"{result['families']} families, complete={result['complete']}):"
    ]
    for name, cut in result["latency_ms"].items():
        if cut is None:
            lines.append(f"  {name:<26} no samples")
        else:
            lines.append(
                f"  {name:<26} p50 {cut['p50']:>8.1f}  p95 {cut['p95']:>8.1f}  "
                f"p99 {cut['p99']:>8.1f}  max {cut['max']:>8.1f} ms"
            )
    lines.append("  hops from intake's outbox row to the stopwatch (services' timestamps):")
    for name, cut in result.get("hops_ms", {}).items():
        if cut is not None:
            lines.append(
                f"    {name:<24} p50 {cut['p50']:>8.1f}  p95 {cut['p95']:>8.1f}  "
                f"p99 {cut['p99']:>8.1f}  max {cut['max']:>8.1f} ms"
            )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rate", type=float, default=10.0, help="families per second")
    parser.add_argument("--seconds", type=float, default=60.0, help="how long the load lasts")
    parser.add_argument("--warmup", type=int, default=10, help="families before measuring")
    parser.add_argument("--latency-handover-share", dest="handover_share", type=float, default=0.25)
    parser.add_argument("--latency-timeout", dest="timeout", type=float, default=300)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    parser.add_argument("--seed", type=int, default=9)
    parser.add_argument(
        "--database", default=None, help="postgresql, or a PostgreSQL URL (default SQLite)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the data dir (logs, DBs)")
    parser.add_argument(
        "--fetch-max-wait-ms", type=int, default=None, help="the services' consumer fetch wait"
    )
    add_settings_option(parser)
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "latency.json")
    args = parser.parse_args()
    result = run(args)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(summary(result), file=sys.stderr)
    return 0 if result["complete"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
