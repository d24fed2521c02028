"""Families for the fault tests, what the test did to them (its ground truth), and the check
that the platform's final state agrees: every consenting family has exactly one welcome visit,
every handover exactly one referral, reporting counts every family once, and no effect was
published twice under different event ids."""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition
from lotse_contracts import topics
from lotse_contracts.events.intake import FamilyRegistered
from lotse_contracts.events.referrals import ReferralRequested
from lotse_contracts.events.reporting import KpiFigure
from lotse_contracts.events.visits import VisitScheduled
from lotse_reporting.domain import STADT

from tests.faults.processes import fetch
from tests.support import Record, bearer

CLINIC = "klinikum-dortmund-mitte"
HANDOVER_TRAEGER = "hebammenzentrum-dortmund"  # offers its module in every Stadtbezirk
HANDOVER_MODULE = "familienhebamme"
POSTCODES = ["44135", "44145", "44141", "44339", "44328", "44309", "44287", "44263", "44225"]
FAMILY_NAMES = ["Schulte", "Yılmaz", "Nowak", "Hoffmann", "Haddad", "Kowalski", "Becker"]


def babylotse() -> dict[str, str]:
    return bearer("babylotse", subject="bl-fault", clinic=CLINIC)


@dataclass
class Family:
    """One family the test registers: its wishes, and what intake answered."""

    number: int
    body: dict[str, Any]
    consents_to_visit: bool
    wants_handover: bool
    case_id: str | None = None
    handover_id: str | None = None


def make_families(rng: random.Random, count: int, *, handovers_at_least: int = 0) -> list[Family]:
    """``count`` distinct families; about 80 % consent to a welcome visit, about half want a
    warm handover to a Familienhebamme (at least ``handovers_at_least``)."""
    wants = [rng.random() < 0.5 for _ in range(count)]
    for index in rng.sample(range(count), min(handovers_at_least, count)):
        wants[index] = True
    families = []
    today = datetime.now(UTC).date()
    for number in range(count):
        consents_to_visit = rng.random() < 0.8
        consents: list[dict[str, Any]] = []
        if consents_to_visit:
            consents.append({"scope": "welcome_visit"})
        if wants[number]:
            consents.append(
                {
                    "scope": "traeger_contact",
                    "traeger": HANDOVER_TRAEGER,
                    "purpose": HANDOVER_MODULE,
                }
            )
        body = {
            "channel": "clinic",
            "family": {
                "family_name": f"{rng.choice(FAMILY_NAMES)}-{number}",
                "parent_given_names": ["Alex"],
            },
            "children": [{"birth_date": (today - timedelta(days=rng.randint(0, 5))).isoformat()}],
            "address": {
                "street": "Teststraße",
                "house_number": str(number + 1),
                "postcode": rng.choice(POSTCODES),
            },
            "consents": consents,
        }
        families.append(Family(number, body, consents_to_visit, wants[number]))
    return families


async def call_until_answered(
    client: httpx.AsyncClient,
    url: str,
    body: Mapping[str, Any],
    *,
    idempotency_key: str,
    timeout_s: float = 60.0,
) -> dict[str, Any]:
    """POST until the service answers 2xx; the same idempotency key makes a retry after a
    lost answer (the service was killed after committing) return the first result."""
    headers = {**babylotse(), "Idempotency-Key": idempotency_key}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    last = ""
    while loop.time() < deadline:
        try:
            response = await client.post(url, json=dict(body), headers=headers, timeout=10.0)
        except httpx.HTTPError as exc:
            last = type(exc).__name__
        else:
            if response.status_code in (200, 201):
                answer: dict[str, Any] = response.json()
                return answer
            if response.status_code < 500:
                raise AssertionError(f"{url} refused: {response.status_code} {response.text}")
            last = f"HTTP {response.status_code}"
        await asyncio.sleep(0.2)
    raise AssertionError(f"{url} not answered within {timeout_s} s (last: {last})")


async def register(client: httpx.AsyncClient, intake_url: str, family: Family) -> None:
    """Register the family, and ask for its warm handover if it wants one."""
    answer = await call_until_answered(
        client, f"{intake_url}/cases", family.body, idempotency_key=f"reg-{uuid.uuid4()}"
    )
    family.case_id = answer["case_id"]
    if family.wants_handover:
        handover = await call_until_answered(
            client,
            f"{intake_url}/cases/{family.case_id}/handovers",
            {"module": HANDOVER_MODULE, "traeger": HANDOVER_TRAEGER},
            idempotency_key=f"handover-{uuid.uuid4()}",
        )
        family.handover_id = handover["handover_id"]


# -- the check -----------------------------------------------------------------------------------


@dataclass
class Findings:
    """Where the platform's state disagrees with what the test did; empty when it agrees."""

    problems: list[str] = field(default_factory=list)

    def expect(self, condition: bool, problem: str) -> None:
        if not condition:
            self.problems.append(problem)

    def __bool__(self) -> bool:
        return not self.problems


def _ids_per_subject(records: list[Record], event_type: str) -> dict[str, set[str]]:
    """Distinct CloudEvent ids per case (subject) of one type; a relay re-publishing the same
    event after a crash repeats its id, a second effect would have a new one."""
    found: dict[str, set[str]] = defaultdict(set)
    for record in records:
        if record.header("ce_type") == event_type:
            subject = record.header("ce_subject") or ""
            found[subject].add(record.header("ce_id") or "")
    return found


async def _count_by_case(url: str, table: str) -> dict[str, int]:
    rows = await fetch(url, f"SELECT case_id, count(*) AS n FROM {table} GROUP BY case_id")
    return {row["case_id"]: row["n"] for row in rows}


async def check_databases(families: list[Family], databases: Mapping[str, str]) -> Findings:
    """The services' final state against the ground truth, read from their databases."""
    findings = Findings()
    registered = {f.case_id for f in families}
    intake_cases = {
        r["case_id"] for r in await fetch(databases["intake"], "SELECT case_id FROM intake_case")
    }
    findings.expect(
        intake_cases == registered, f"intake cases {len(intake_cases)} != {len(registered)}"
    )
    visits = await _count_by_case(databases["visits"], "visits_visit")
    referrals = await _count_by_case(databases["referrals"], "referrals_referral")
    for family in families:
        want = 1 if family.consents_to_visit else 0
        got = visits.get(family.case_id or "", 0)
        findings.expect(got == want, f"family {family.number}: {got} visits, expected {want}")
        want = 1 if family.wants_handover else 0
        got = referrals.get(family.case_id or "", 0)
        findings.expect(got == want, f"family {family.number}: {got} referrals, expected {want}")
    reporting_cases = await fetch(databases["reporting"], "SELECT case_id FROM reporting_case")
    findings.expect(
        {r["case_id"] for r in reporting_cases} == registered,
        f"reporting knows {len(reporting_cases)} families, {len(registered)} registered",
    )
    year = str(datetime.now(UTC).year)
    expected = {
        KpiFigure.FAMILIES_REGISTERED: len(families),
        KpiFigure.REFERRALS_REQUESTED: sum(f.wants_handover for f in families),
    }
    for figure, count in expected.items():
        rows = await fetch(
            databases["reporting"],
            "SELECT value FROM reporting_kpi WHERE bezirk = $1 AND period = $2 AND figure = $3"
            " AND dimension = ''",
            STADT,
            year,
            figure.value,
        )
        values = [row["value"] for row in rows]
        findings.expect(values == [count], f"reporting {figure.value} = {values}, expected {count}")
    return findings


async def check_topics(families: list[Family], bootstrap: str, prefix: str) -> Findings:
    """Every effect published once: one id per case for registration, visit, referral."""
    findings = Findings()
    expectations = [
        (topics.INTAKE, FamilyRegistered.event_type, {f.case_id for f in families}),
        (
            topics.VISITS,
            VisitScheduled.event_type,
            {f.case_id for f in families if f.consents_to_visit},
        ),
        (
            topics.REFERRALS,
            ReferralRequested.event_type,
            {f.case_id for f in families if f.wants_handover},
        ),
    ]
    for topic, event_type, cases in expectations:

        def complete(
            records: list[Record], want: set[str | None] = cases, kind: str = event_type
        ) -> bool:
            return set(_ids_per_subject(records, kind)) >= want

        records = await asyncio.to_thread(read_everything, bootstrap, prefix + topic, complete)
        ids = _ids_per_subject(records, event_type)
        findings.expect(set(ids) == cases, f"{event_type}: cases {len(ids)} != {len(cases)}")
        doubled = {case: len(found) for case, found in ids.items() if len(found) > 1}
        findings.expect(not doubled, f"{event_type} published with distinct ids: {doubled}")
    return findings


def _header_pairs(raw: Any) -> list[tuple[str, bytes]]:
    pairs = raw.items() if isinstance(raw, dict) else (raw or [])
    return [(str(k), v) for k, v in pairs if isinstance(v, bytes)]


def read_everything(
    bootstrap: str,
    topic: str,
    complete: Callable[[list[Record]], bool],
    *,
    quiet_s: float = 1.0,
    timeout_s: float = 30.0,
) -> list[Record]:
    """Every record of ``topic``: read from the start of each partition (assigned, no group
    to join) until each partition was read to its end, ``complete`` holds and nothing new
    came for ``quiet_s`` (so that a late duplicate is still seen)."""
    reader = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"fault-check-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
        }
    )
    records: list[Record] = []
    at_end: set[int] = set()
    try:
        partitions = reader.list_topics(topic, timeout=10).topics[topic].partitions
        reader.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        deadline = time.monotonic() + timeout_s
        last_new = time.monotonic()
        while time.monotonic() < deadline:
            message = reader.poll(0.1)
            error = message.error() if message is not None else None
            if message is None:
                pass
            elif error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    at_end.add(message.partition() or 0)
            else:
                last_new = time.monotonic()
                records.append(
                    Record(
                        topic=topic,
                        partition=message.partition() or 0,
                        offset=message.offset() or 0,
                        key=message.key(),
                        value=message.value(),
                        headers=_header_pairs(message.headers()),
                    )
                )
            if (
                at_end >= set(partitions)
                and time.monotonic() - last_new > quiet_s
                and complete(records)
            ):
                break
    finally:
        reader.close()
    return records


def describe(findings: Findings, seed: int) -> str:
    return json.dumps({"seed": seed, "problems": findings.problems[:20]}, indent=1)
