"""Records for the replay's equivalence tests: the benchmark's own generator (at a small
size), the test city, and the hardening tests' poison corpus."""

from __future__ import annotations

import importlib
import random
import sys
from collections import Counter
from datetime import timedelta
from pathlib import Path

from aiokafka import ConsumerRecord
from lotse_contracts.city import load_city
from lotse_contracts.cloudevents import to_kafka_binary
from lotse_contracts.events.base import EventModel
from lotse_contracts.events.intake import Channel, ErasureReason
from lotse_reporting import domain
from lotse_reporting.domain import Rules
from lotse_reporting.replay_input import Decoder
from lotse_reporting.replay_rebuild import Rebuild

from tests.reporting.builders import Family, at, new_id, random_city

BENCH = Path(__file__).resolve().parents[2] / "bench"


def new_rebuild(counts: Counter[str] | None = None) -> Rebuild:
    """A rebuild of the test city's projections under the live consumer's inbox name."""
    return Rebuild(
        Decoder(domain.HANDLED, max_bytes=256 * 1024),
        dortmund_rules(),
        inbox_consumer="reporting.main",
        counts=Counter() if counts is None else counts,
    )


def consumer_record(event: EventModel, offset: int) -> ConsumerRecord[bytes, bytes]:
    """``event`` as the replay reads it from its topic: partition 0, at ``offset``."""
    record = to_kafka_binary(event.to_cloudevent())
    return ConsumerRecord(
        type(event).topic,
        0,
        offset,
        0,
        0,
        record.key,
        record.value,
        None,
        len(record.key or b""),
        len(record.value or b""),
        record.headers,
    )


def bench_events(n: int, seed: int) -> list[EventModel]:
    """The first ``n`` events of ``bench/reporting_replay.py``'s generator."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    generator = importlib.import_module("reporting_replay")
    return list(generator.events(n, seed))


def dortmund_rules() -> Rules:
    city = load_city("dortmund")
    return Rules(
        bezirke=frozenset(city.bezirk_slugs),
        modules=frozenset(city.module_slugs),
        zone=city.zone(),
    )


def odd_families(rng: random.Random) -> list[EventModel]:
    """Families the generators rarely make: several visits in one month and across months
    (a median counts each family's first), duplicates erased, erasures, escalations that
    close in a later month, impossible events."""
    events: list[EventModel] = []
    for n in range(12):
        family = Family(
            bezirk="hoerde" if n % 2 else "eving",
            channel=Channel.CLINIC if n % 3 else Channel.MOVE_IN,
            case_id=new_id(rng),
        )
        registered = at("2025-01-06")
        events.append(family.registered(registered, traeger_consent=True, days_since_birth=3))
        for visit, day in enumerate((8, 9, 40)):
            visit_id = new_id(rng)
            starts = at(registered.date() + timedelta(days=day), 11)
            events.append(family.scheduled(visit_id, registered, starts))
            events.append(family.completed(visit_id, starts, starts, day + visit * n))
        referral = family.referral(new_id(rng))
        events.append(referral.requested(registered + timedelta(hours=1)))
        events.append(referral.escalated(registered + timedelta(days=20 + n)))
        events.append(referral.accepted(registered + timedelta(days=45)))
        events.append(referral.first_contact(registered + timedelta(days=50), 50 - n))
        if n % 4 == 1:
            events.append(family.erased(registered + timedelta(days=60), ErasureReason.DUPLICATE))
        elif n % 4 == 2:
            events.append(family.erased(registered + timedelta(days=60), ErasureReason.REQUEST))
    ghost = Family(bezirk="atlantis")
    events.append(ghost.registered(at("2025-01-03")))
    return events


def mixed_events(seed: int = 3) -> list[EventModel]:
    """Bench-shaped families, the test city's and the odd ones, in one list."""
    rng = random.Random(seed)
    bezirke = ["hoerde", "eving", "brackel", "innenstadt-nord", "mengede"]
    return [
        *bench_events(4000, seed),
        *random_city(rng, 300, bezirke, at("2024-11-04").date()),
        *odd_families(rng),
    ]
