"""N families through intake → visits → referrals → reporting, end to end, next to raw aiokafka.

One run, one broker:

  stack       the embedded broker (Tansu) unless LOTSE_KAFKA_BOOTSTRAP is set; the four
              services as processes of their own (uvicorn, as ``lotse up`` starts them), each
              with its own SQLite file in a temporary data dir (--database: PostgreSQL
              databases created for the run and dropped after); tokens from the development
              issuer the services trust
  families    N families registered over intake's HTTP API (--concurrency requests in
              flight; Babylotsen in clinics and move-in notices), a share consenting to a
              welcome visit, a share with a warm handover to a Träger serving its Bezirk
  Träger      every Träger of the city answers its referrals over its partner topic, as
              examples/partner_client.py does (received, accepted, first contact, in
              progress, completed; disclosure key fetched from the referrals API)
  done        when reporting has published, city-wide for this year, all N families
              registered and a visit offered to every consenting family, and every "visit
              scheduled" is on the topic (families/s); then up to --referral-grace seconds
              more until it counts every handover as referral requested and accepted
              (referrals_complete; events/s counts until then)
  raw         every record the services published (read back from their outboxes: the same
              number and size of messages) produced and consumed with plain aiokafka on the
              same broker, three times on fresh topics; ratio = pipeline events/s over the
              median round's raw messages/s
  memory      peak RSS of each service process (and of the broker), sampled with psutil

Usage:  uv run --frozen python bench/pipeline.py [--families 2000] [--database postgresql]
Prints a summary and writes bench/results/pipeline.json (or --output).
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

from lotse_contracts import topics as topic_names
from lotse_runtime.kafka import TopicSpec, ensure_topics
from stack import (
    BROKER,
    RESULTS_DIR,
    CpuMeter,
    DatabaseServerCpu,
    MemorySampler,
    Stack,
    add_settings_option,
    dead_letter_reasons,
    raw_produce_consume,
    run_on_own_stack,
)
from workload import K_ANONYMITY, Intake, Partners, Stopwatch, open_traeger_capacity, plan_families

#: The benchmark's own process, in the CPU readings.
CLIENT = "benchmark client"
#: Rounds of the raw produce+consume; the median is the ratio's denominator.
RAW_ROUNDS = 3


async def drive(stack: Stack, args: argparse.Namespace) -> dict[str, Any]:
    families = plan_families(
        stack.city,
        args.families,
        seed=args.seed,
        consent_share=args.consent_share,
        handover_share=args.handover_share,
    )
    n = len(families)
    n_visits = sum(f.welcome_visit for f in families)
    n_handovers = sum(f.handover is not None for f in families)
    await open_traeger_capacity(stack)
    watch = Stopwatch(stack)
    partners = Partners(stack)
    await watch.start()
    await partners.start()
    intake = Intake(stack)
    gate = asyncio.Semaphore(args.concurrency)

    async def one(family: Any) -> Any:
        async with gate:
            return await intake.send(family)

    print(
        f"pipeline: {n:,} families ({n_visits:,} welcome visits, {n_handovers:,} handovers) …",
        file=sys.stderr,
    )
    try:
        with MemorySampler(stack.pids()) as memory:
            # The benchmark's own client (HTTP, the Träger, the stopwatches) shares the
            # cores with the services: measured beside them, counted apart.
            cpu = CpuMeter({**stack.pids(), CLIENT: os.getpid()})
            server = DatabaseServerCpu(stack.service_databases()).start()
            started = time.perf_counter()
            sent = await asyncio.gather(*(one(f) for f in families))
            http_done = time.perf_counter()
            # The end: reporting counted every family and every offered visit, and every
            # "visit scheduled" is on the topic.
            targets = {"families_registered": n, "visits_offered": n_visits}
            visit_cases = {s.case_id for s in sent if s.family.welcome_visit}
            complete = await watch.wait_for(targets, visit_cases, timeout_s=args.timeout)
            finished = time.perf_counter()
            # Referrals: requested and accepted as reporting counts them (a count below k
            # is published without a value: nothing to wait for). They are not part of the
            # clock: a referral lost on the way must not stop it, it shows as incomplete.
            referral_targets = {
                f: n_handovers
                for f in ("referrals_requested", "referrals_accepted")
                if n_handovers >= K_ANONYMITY
            }
            referrals_complete = await watch.wait_for(
                referral_targets, set(), timeout_s=args.referral_grace
            )
            referrals_done = time.perf_counter()
            cpu_times = cpu.user_and_system()
            server_seconds = server.seconds()
            await partners.wait_answered(n_handovers, timeout_s=10)
    finally:
        await partners.stop()
        await watch.stop()
        await intake.close()
    wall = finished - started
    # Let the relays drain what the last effects wrote.
    await asyncio.sleep(1.0)
    counts = await stack.table_counts()
    answers = partners.answers_sent
    published = sum(c["published"] for c in counts.values())
    events = published + answers
    kafka = stack.kafka()
    reasons = await dead_letter_reasons(
        kafka, [stack.topic(topic_names.dead_letter(s)) for s in topic_names.SERVICES], idle_s=1.0
    )
    dead_letters = sum(reasons.values())
    print(f"raw aiokafka: {events:,} messages …", file=sys.stderr)
    records = await stack.outbox_records()
    while len(records) < events:  # the Träger's answers: sized like the rest, for the count
        records.extend(records[: events - len(records)])
    # The raw rate swings by a third between runs minutes apart on these shared machines:
    # three rounds on fresh topics, and the median round is the ratio's denominator.
    rounds = []
    for round_number in range(1, RAW_ROUNDS + 1):
        raw_topic = stack.topic(f"bench.raw.{round_number}")
        await ensure_topics(kafka, [TopicSpec(raw_topic, 3)])
        rounds.append(await raw_produce_consume(kafka, raw_topic, records))
    raw = {
        **sorted(rounds, key=lambda r: r["messages_per_s"] or 0.0)[len(rounds) // 2],
        "rounds_messages_per_s": [r["messages_per_s"] for r in rounds],
    }
    families_per_s = n / wall
    # Events go on after the families are counted (the Träger answer, referrals and
    # reporting follow): they are counted until reporting had every referral accepted.
    events_window = referrals_done - started
    events_per_s = events / events_window
    raw_rate = raw["messages_per_s"] or 0.0
    # Service CPU from the first registration until reporting counted every referral (the
    # events window), per family: what one family costs the platform, broker apart.
    cpu_seconds = {name: user + system for name, (user, system) in cpu_times.items()}
    cpu_ms = {
        k: round(v * 1000 / n, 2) for k, v in cpu_seconds.items() if k not in (BROKER, CLIENT)
    }
    return {
        "cpu_ms_per_family": cpu_ms,
        "cpu_ms_per_family_total": round(sum(cpu_ms.values()), 2),
        # The kernel's share: on PostgreSQL over loopback TCP the sender's system calls also
        # run the receiving side's network stack, which a database on another host would not.
        "system_cpu_ms_per_family": {
            k: round(system * 1000 / n, 2)
            for k, (_user, system) in cpu_times.items()
            if k not in (BROKER, CLIENT)
        },
        "broker_cpu_ms_per_family": round(cpu_seconds.get(BROKER, 0.0) * 1000 / n, 2),
        # PostgreSQL's server processes for each service's database (SQLite's work is in
        # the services' own figures): not service CPU, but the platform's cost beside it.
        "database_server_cpu_ms_per_family": {
            k: round(v * 1000 / n, 2) for k, v in server_seconds.items()
        },
        "database_server_cpu_ms_per_family_total": round(
            sum(server_seconds.values()) * 1000 / n, 2
        ),
        "bench_client_cpu_ms_per_family": round(cpu_seconds.get(CLIENT, 0.0) * 1000 / n, 2),
        "complete": complete,
        "referrals_complete": referrals_complete,
        "referrals_seconds": round(referrals_done - started, 2),
        "families": n,
        "welcome_visits": n_visits,
        "handovers": n_handovers,
        "concurrency": args.concurrency,
        "seconds": round(wall, 2),
        "http_seconds": round(http_done - started, 2),
        "families_per_s": round(families_per_s, 2),
        "events": events,
        "events_per_family": round(events / n, 2),
        "events_seconds": round(events_window, 2),
        "events_per_s": round(events_per_s, 1),
        # Without reporting's key-figure updates: what intake, visits, referrals and the
        # Träger wrote (audience copies included).
        "domain_events": events - counts["reporting"]["published"],
        "domain_events_per_s": round(
            (events - counts["reporting"]["published"]) / events_window, 1
        ),
        "published_by_service": {k: v["published"] for k, v in counts.items()},
        "applied_by_service": {k: v["applied"] for k, v in counts.items()},
        "unsent_in_outboxes": sum(c["unsent"] for c in counts.values()),
        "partner_answers": answers,
        "referrals_answered": partners.answered,
        "disclosures_opened": partners.disclosures_opened,
        "disclosures_unopened": partners.disclosures_unopened,
        "dead_letters": dead_letters,
        "dead_letter_reasons": reasons,
        "reporting_seen": {f: watch.latest(f) for f in watch.FIGURES},
        "visits_scheduled_seen": len(watch.visit_scheduled),
        "raw_aiokafka": raw,
        "ratio_events_to_raw": round(events_per_s / raw_rate, 5) if raw_rate else None,
        "raw_equivalent_families_per_s": round(raw_rate / (events / n), 1) if events else None,
        "partner_client_restarts": partners.crashes,
        "http_retries": intake.retries,
        "http_server_errors": {str(k): v for k, v in intake.server_errors.items()},
        "memory": memory.report(),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    return run_on_own_stack("pipeline", drive, args)


def summary(result: dict[str, Any]) -> str:
    raw = result["raw_aiokafka"]
    peaks = ", ".join(f"{k} {v:.0f}" for k, v in result["memory"]["peak_rss_mb"].items())
    cpu = ", ".join(f"{k} {v:.1f}" for k, v in result["cpu_ms_per_family"].items())
    system = ", ".join(f"{k} {v:.1f}" for k, v in result["system_cpu_ms_per_family"].items())
    server = ""
    if result["database_server_cpu_ms_per_family"]:
        by_service = result["database_server_cpu_ms_per_family"].items()
        server = (
            f"; database server {result['database_server_cpu_ms_per_family_total']} ms ("
            + ", ".join(f"{k} {v:.1f}" for k, v in by_service)
            + ")"
        )
    return (
        f"pipeline ({result['database']}, load {result['machine']['load_avg_1m_at_start']} at "
        f"start): {result['families']:,} families in "
        f"{result['seconds']} s = {result['families_per_s']} families/s, "
        f"{result['events_per_s']:,} events/s ({result['events_per_family']} events/family); "
        f"raw aiokafka {raw['messages_per_s']:,} msg/s → ratio {result['ratio_events_to_raw']}"
        f"; complete={result['complete']}, referrals_complete={result['referrals_complete']}\n"
        f"service CPU per family: {result['cpu_ms_per_family_total']} ms ({cpu}); broker "
        f"{result['broker_cpu_ms_per_family']} ms; the benchmark's own client "
        f"{result['bench_client_cpu_ms_per_family']} ms{server}\n"
        f"of which in the kernel: {system} ms\n"
        f"dead letters {result['dead_letters']}, HTTP retries {result['http_retries']}, "
        f"disclosures opened {result['disclosures_opened']} of {result['handovers']} handovers "
        f"(unopened: {result['disclosures_unopened'] or 'none'})\npeak RSS MB: {peaks}"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--families", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=8, help="HTTP requests in flight")
    parser.add_argument("--consent-share", type=float, default=0.9)
    parser.add_argument("--handover-share", type=float, default=0.25)
    parser.add_argument("--timeout", type=float, default=900, help="seconds to wait for the end")
    parser.add_argument(
        "--referral-grace",
        type=float,
        default=120,
        help="seconds to wait after the end for reporting to count every referral accepted",
    )
    parser.add_argument("--seed", type=int, default=9)
    parser.add_argument(
        "--database", default=None, help="postgresql, or a PostgreSQL URL (default SQLite)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the data dir (logs, DBs)")
    parser.add_argument(
        "--fetch-max-wait-ms", type=int, default=None, help="the services' consumer fetch wait"
    )
    add_settings_option(parser)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "pipeline.json")
    args = parser.parse_args()
    result = run(args)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(summary(result), file=sys.stderr)
    return 0 if result["complete"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
