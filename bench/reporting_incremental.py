"""Does the cost of an event depend on the history? The same 10,000 events applied to an
empty year and to a year already holding the families of 500,000 events.

For each start, in one process, against a fresh database (SQLite file by default):

  prefill   the first --history events of bench/reporting_replay.py's city, applied by the
            replay path (batches of 5,000 in one transaction each) and published once
  measure   --events further events (new families, same months), each in its own
            transaction as the live consumer applies it (``operations.apply_event``), then
            one publication pass (``operations.publish_figures``)
  live      --live-events more, a publication pass after every --per-pass of them (as the
            service publishes a burst after its debounce): CPU per pass

Prints CPU seconds (``time.process_time``) per applied event, per published cell and per
live pass for both starts side by side, and writes bench/results/reporting_incremental.json.

Usage:  uv run --frozen python bench/reporting_incremental.py [--history N] [--events N]
        [--database postgresql | --database postgresql://USER@HOST:PORT/ADMIN_DB]
With --database each start gets a fresh PostgreSQL database of its own, dropped afterwards
(the server's own CPU is not counted, as in bench/pipeline.py). No broker: the events go
straight into the projections; the outbox rows are written, not sent.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import reporting_replay
import stack
from lotse_contracts.events.base import EventModel
from lotse_reporting import domain, operations  # noqa: TID251 - a bench of reporting itself
from lotse_reporting.operations import Reporting  # noqa: TID251
from lotse_reporting.settings import ReportingSettings  # noqa: TID251
from lotse_reporting.tables import TABLES  # noqa: TID251
from lotse_runtime.app import build_runtime
from lotse_runtime.migrations import create_schema
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

RESULTS = Path(__file__).parent / "results" / "reporting_incremental.json"


def handled(events: list[EventModel]) -> list[EventModel]:
    return [e for e in events if isinstance(e, domain.HANDLED)]


async def _admin(server: str, statement: str) -> None:
    engine = create_async_engine(
        server.replace("postgresql://", "postgresql+asyncpg://", 1), isolation_level="AUTOCOMMIT"
    )
    try:
        async with engine.connect() as conn:
            await conn.execute(text(statement))
    finally:
        await engine.dispose()


async def one_start(
    history: list[EventModel],
    measured: list[EventModel],
    live: list[EventModel],
    per_pass: int,
    server: str | None = None,
) -> dict[str, Any]:
    if server is None:
        folder = tempfile.mkdtemp(prefix="lotse-incremental-")
        url = f"sqlite+aiosqlite:///{folder}/reporting.db"
    else:
        name = f"lotse_incremental_{os.getpid()}_{len(history)}"
        await _admin(server, f'DROP DATABASE IF EXISTS "{name}"')
        await _admin(server, f'CREATE DATABASE "{name}"')
        url = f"{server.rsplit('/', 1)[0]}/{name}"
    settings = ReportingSettings(
        database_url=url,
        kafka_bootstrap="127.0.0.1:9",  # never contacted: nothing is sent
    )
    runtime = build_runtime(settings)
    try:
        await create_schema(runtime.db, TABLES, service=settings.service_name)
        reporting = Reporting.of(runtime)
        for start in range(0, len(history), 5000):
            async with runtime.db.transaction() as session:
                await operations.replay_events(
                    session, history[start : start + 5000], reporting.rules
                )
        await operations.publish_figures(reporting, all_years=True)
        cpu = time.process_time()
        wall = time.perf_counter()
        for event in measured:
            async with runtime.db.transaction() as session:
                try:
                    await operations.apply_event(session, event, reporting.rules)
                except domain.ImpossibleEvent:
                    raise
        apply_cpu = time.process_time() - cpu
        apply_wall = time.perf_counter() - wall
        cpu = time.process_time()
        published = await operations.publish_figures(reporting)
        publish_cpu = time.process_time() - cpu
        idle_cpu = time.process_time()
        again = await operations.publish_figures(reporting)
        idle_cpu = time.process_time() - idle_cpu
        live_apply = live_publish = 0.0
        passes = live_cells = 0
        for start in range(0, len(live), per_pass):
            cpu = time.process_time()
            for event in live[start : start + per_pass]:
                async with runtime.db.transaction() as session:
                    await operations.apply_event(session, event, reporting.rules)
            live_apply += time.process_time() - cpu
            cpu = time.process_time()
            live_cells += await operations.publish_figures(reporting)
            live_publish += time.process_time() - cpu
            passes += 1
        return {
            "history_events": len(history),
            "measured_events": len(measured),
            "apply_cpu_s": round(apply_cpu, 3),
            "apply_wall_s": round(apply_wall, 3),
            "cpu_ms_per_event": round(1000 * apply_cpu / len(measured), 4),
            "cells_published": published,
            "publish_cpu_s": round(publish_cpu, 3),
            "cpu_ms_per_published_cell": round(1000 * publish_cpu / max(published, 1), 4),
            "idle_pass_cells": again,
            "idle_pass_cpu_ms": round(1000 * idle_cpu, 2),
            "live_events": len(live),
            "live_cpu_ms_per_event": round(1000 * live_apply / max(len(live), 1), 4),
            "live_passes": passes,
            "live_cells_published": live_cells,
            "live_cpu_ms_per_pass": round(1000 * live_publish / max(passes, 1), 2),
        }
    finally:
        await runtime.db.dispose()
        runtime.telemetry.shutdown()
        if server is not None:
            await _admin(server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--history", type=int, default=500_000)
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--live-events", type=int, default=1000)
    parser.add_argument("--per-pass", type=int, default=5)
    parser.add_argument("--seed", type=int, default=2025)
    parser.add_argument(
        "--database", default=None, help="postgresql, or a PostgreSQL URL (default SQLite)"
    )
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    server = None
    if args.database:
        server = stack.DEFAULT_POSTGRES if args.database == "postgresql" else args.database
    load = [round(x, 2) for x in os.getloadavg()]
    stream = reporting_replay.events(args.history + args.events + args.live_events, args.seed)
    history = handled(list(itertools.islice(stream, args.history)))
    measured = handled(list(itertools.islice(stream, args.events)))
    live = handled(list(stream))
    print(f"empty year: {len(measured):,} events …", file=sys.stderr)
    empty = asyncio.run(one_start([], measured, live, args.per_pass, server))
    print(f"full year: {len(history):,} events of history, then the same …", file=sys.stderr)
    full = asyncio.run(one_start(history, measured, live, args.per_pass, server))
    result = {
        "benchmark": "reporting_incremental",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "database": "sqlite" if server is None else "postgresql",
        "load_average_at_start": load,
        "empty_year": empty,
        "full_year": full,
        "ratio_cpu_per_event_full_to_empty": round(
            full["cpu_ms_per_event"] / empty["cpu_ms_per_event"], 3
        ),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(
        f"\nCPU per applied event: empty {empty['cpu_ms_per_event']} ms · "
        f"after {args.history:,} events {full['cpu_ms_per_event']} ms\n"
        f"CPU per published cell: empty {empty['cpu_ms_per_published_cell']} ms "
        f"({empty['cells_published']} cells) · full {full['cpu_ms_per_published_cell']} ms "
        f"({full['cells_published']} cells)\n"
        f"CPU per live pass (every {args.per_pass} events): empty "
        f"{empty['live_cpu_ms_per_pass']} ms · full {full['live_cpu_ms_per_pass']} ms",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
