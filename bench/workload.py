"""Families as the benchmarks send them through the real HTTP API, the Träger answering over
their partner topics, and the stopwatches on the topics (visit scheduled, key figures).

Used by ``pipeline.py`` and ``latency.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import logging
import random
import sys
import time
import uuid
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp
import httpx
from aiokafka import AIOKafkaConsumer
from lotse_contracts import topics as topic_names
from lotse_contracts.city import Municipality
from lotse_contracts.events.reporting import CITY_TOTAL, KpiUpdated
from lotse_contracts.events.visits import VisitScheduled
from stack import Stack, assigned_reader

CLINICS = ["klinikum-nord", "st-josefs-hospital-hoerde", "klinikum-mitte", "knappschaft-brackel"]
#: Reporting's default k: city-wide counts below it are published without a value.
K_ANONYMITY = 5
#: Attempts per HTTP call before the benchmark gives up on a family.
MAX_ATTEMPTS = 6
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@dataclass(frozen=True)
class Family:
    """One family the benchmark registers, and what it asks for."""

    number: int
    bezirk: str
    postcode: str
    clinic: str | None  # None: a move-in notice from the citizens' office
    welcome_visit: bool
    handover: tuple[str, str] | None  # (Träger, module) of a warm handover

    def registration(self, today: date) -> dict[str, Any]:
        consents: list[dict[str, Any]] = []
        if self.welcome_visit:
            consents.append({"scope": "welcome_visit"})
        if self.handover is not None:
            traeger, module = self.handover
            consents.append({"scope": "traeger_contact", "traeger": traeger, "purpose": module})
        born = today - timedelta(days=2 if self.clinic else 400 + self.number % 1000)
        return {
            "channel": "clinic" if self.clinic else "move_in",
            "family": {
                # Unique per run, so the duplicate guard lets every family in.
                "family_name": f"Benchfamilie {self.number}",
                "parent_given_names": ["Elif", "Jonas"],
                "phone": "+49 231 555 0100",
            },
            "children": [{"given_name": "Mira", "birth_date": born.isoformat()}],
            "address": {
                "street": "Musterweg",
                "house_number": str(1 + self.number % 250),
                "postcode": self.postcode,
            },
            "preferred_language": "de",
            "consents": consents,
        }


def plan_families(
    city: Municipality,
    n: int,
    *,
    seed: int,
    consent_share: float,
    handover_share: float,
    first: int = 0,
) -> list[Family]:
    """``n`` families spread over the Stadtbezirke by population; exactly round(n * share)
    of them consent to a welcome visit / ask for a warm handover (a clinic family whose
    Babylotse hands over to a Träger serving its Bezirk)."""
    rng = random.Random(seed)
    bezirke = city.stadtbezirke
    weights = [b.population_share for b in bezirke]
    offers = {
        b.slug: [(t.slug, m) for t in city.traeger for m in t.modules if t.serves(b.slug)]
        for b in bezirke
    }
    visit_numbers = set(rng.sample(range(n), round(n * consent_share)))
    clinic_numbers = set(rng.sample(range(n), round(n * 0.78)))
    wanted = round(n * handover_share)
    handover_numbers = set(rng.sample(sorted(clinic_numbers), min(wanted, len(clinic_numbers))))
    families = []
    for number in range(n):
        bezirk = rng.choices(bezirke, weights)[0]
        postcode = rng.choice(bezirk.postcodes or bezirk.shared_postcodes)
        handover = None
        if number in handover_numbers and offers[bezirk.slug]:
            handover = rng.choice(offers[bezirk.slug])
        families.append(
            Family(
                # Numbers name the families: a later run on the same stack starts higher.
                number=first + number,
                bezirk=bezirk.slug,
                postcode=postcode,
                clinic=rng.choice(CLINICS) if number in clinic_numbers else None,
                welcome_visit=number in visit_numbers,
                handover=handover,
            )
        )
    return families


@dataclass
class Sent:
    """What happened to one family on the HTTP side."""

    family: Family
    case_id: str = ""
    started: float = 0.0
    returned: float = 0.0
    handover_returned: float | None = None
    rank: int = 0  # order in which the registrations returned (1-based)


@dataclass(frozen=True)
class Answer:
    """An HTTP answer as the benchmarks read it."""

    status_code: int
    text: str

    def json(self) -> Any:
        return json.loads(self.text)


class Intake:
    """Registers families (and asks for their handovers) through intake's HTTP API.

    With aiohttp rather than httpx: the benchmark's own client shares the machine's two
    cores with the services it measures, and per request httpx cost several times the CPU.
    """

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.base_url = stack.url("intake")
        self._client: aiohttp.ClientSession | None = None
        self.citizens_office = stack.bearer("service", subject="buergerbuero")
        self._babylotsen: dict[str, dict[str, str]] = {}
        self.returned = 0
        self.retries = 0
        self.server_errors: dict[int, int] = {}
        # Idempotency keys are unique per run, so a second run on the stack is new work.
        self.run = uuid.uuid4().hex[:8]
        self.today = datetime.now(ZoneInfo("Europe/Berlin")).date()

    @property
    def client(self) -> aiohttp.ClientSession:
        # Made in the event loop that uses it, at first use.
        if self._client is None:
            self._client = aiohttp.ClientSession(
                base_url=self.base_url,
                timeout=aiohttp.ClientTimeout(total=120),
                connector=aiohttp.TCPConnector(limit=64),
            )
        return self._client

    def babylotse(self, clinic: str) -> dict[str, str]:
        if clinic not in self._babylotsen:
            self._babylotsen[clinic] = self.stack.bearer(
                "babylotse", subject=f"bl-{clinic[:12]}", clinic=clinic
            )
        return self._babylotsen[clinic]

    async def send(self, family: Family) -> Sent:
        sent = Sent(family)
        headers = self.babylotse(family.clinic) if family.clinic else self.citizens_office
        sent.started = time.perf_counter()
        answer = await self._post(
            "/cases", family.registration(self.today), headers, f"{self.run}-{family.number}"
        )
        sent.returned = time.perf_counter()
        if answer.status_code != 201:
            raise RuntimeError(f"registration refused: {answer.status_code} {answer.text[:500]}")
        self.returned += 1
        sent.rank = self.returned
        sent.case_id = answer.json()["case_id"]
        if family.handover is not None:
            traeger, module = family.handover
            handover = await self._post(
                f"/cases/{sent.case_id}/handovers",
                {"module": module, "traeger": traeger},
                headers,
                f"{self.run}-{family.number}-handover",
            )
            if handover.status_code != 201:
                raise RuntimeError(
                    f"handover refused: {handover.status_code} {handover.text[:500]}"
                )
            sent.handover_returned = time.perf_counter()
        return sent

    async def _post(
        self, path: str, body: dict[str, Any], headers: dict[str, str], key: str
    ) -> Answer:
        """POST as a careful client does: with an Idempotency-Key, retried after a server
        error (the retry is answered from the first attempt if that one went through)."""
        delay = 0.2
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                async with self.client.post(
                    path, json=body, headers={**headers, "Idempotency-Key": key}
                ) as response:
                    answer = Answer(response.status, await response.text())
            except (aiohttp.ClientError, TimeoutError):
                if attempt == MAX_ATTEMPTS:
                    raise
            else:
                if answer.status_code < 500 or attempt == MAX_ATTEMPTS:
                    return answer
                self.server_errors[answer.status_code] = (
                    self.server_errors.get(answer.status_code, 0) + 1
                )
            self.retries += 1
            await asyncio.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()


async def open_traeger_capacity(stack: Stack) -> None:
    """A benchmark compresses months of referrals into a minute: lift every Träger's monthly
    capacity so that none waits for next month's places (as city-wide coordination may)."""
    headers = stack.bearer("koordination", subject="bench-koordination")
    async with httpx.AsyncClient(base_url=stack.url("referrals"), timeout=30) as client:
        for traeger in stack.city.traeger:
            answer = await client.patch(
                f"/catalogue/traeger/{traeger.slug}",
                json={"capacity_per_month": 100_000},
                headers=headers,
            )
            answer.raise_for_status()


# -- the Träger, as examples/partner_client.py answers ----------------------------------------


def partner_module() -> ModuleType:
    """The example partner client (it is a script, not a package): loaded from its file."""
    path = EXAMPLES / "partner_client.py"
    spec = importlib.util.spec_from_file_location("lotse_example_partner_client", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@dataclass
class Partners:
    """One partner client per Träger of the city, answering until stopped."""

    stack: Stack
    clients: list[Any] = field(default_factory=list)
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    crashes: dict[str, int] = field(default_factory=dict)

    async def start(self) -> None:
        partner = partner_module()
        # Its warnings (a disclosure key refused, say) show in the results as counts.
        logging.getLogger("partner-client").setLevel(logging.ERROR)
        for traeger in self.stack.city.traeger:
            self.tasks.append(asyncio.create_task(self._answer(partner, traeger.slug)))

    async def _answer(self, partner: ModuleType, traeger: str) -> None:
        """Run a Träger's client; when it dies (the example lets a timed-out key fetch
        through), start a new one, which resumes at the group's committed offset."""
        headers = self.stack.bearer("traeger", subject=f"tr-{traeger[:12]}", traeger=traeger)
        # Shared by the restarted clients: a referral they see again gets identical answers.
        answered_at: dict[str, Any] = {}
        while True:
            client = partner.PartnerClient(
                bootstrap=self.stack.bootstrap,
                traeger=traeger,
                topic_prefix=self.stack.prefix,
                key_fetcher=partner.http_key_fetcher(self.stack.url("referrals"), headers),
                kafka_options={
                    "session_timeout_ms": 6000,
                    "heartbeat_interval_ms": 500,
                    "fetch_max_wait_ms": 50,
                },
                answered_at=answered_at,
            )
            self.clients.append(client)
            try:
                await client.run()
            except Exception as exc:
                self.crashes[type(exc).__name__] = self.crashes.get(type(exc).__name__, 0) + 1
                await asyncio.sleep(0.5)

    async def wait_answered(self, referrals: int, timeout_s: float) -> bool:
        """Until the Träger have answered ``referrals`` referrals in all (False on timeout)."""
        deadline = time.perf_counter() + timeout_s
        while self.answered < referrals:
            if time.perf_counter() > deadline:
                return False
            await asyncio.sleep(0.2)
        return True

    @property
    def answered(self) -> int:
        """Referrals answered (a referral answered again after a restart counts once)."""
        return len({r for c in self.clients for r in c.summary.answered})

    @property
    def answers_sent(self) -> int:
        return sum(len(a) for c in self.clients for a in c.summary.answered.values())

    @property
    def disclosures_opened(self) -> int:
        return len({r for c in self.clients for r in c.summary.disclosed_fields})

    @property
    def disclosures_unopened(self) -> dict[str, int]:
        """Why sealed contact data stayed closed, by reason (a referral counted once)."""
        opened = {r for c in self.clients for r in c.summary.disclosed_fields}
        reasons: dict[str, str] = {}
        for client in self.clients:
            for referral, reason in client.summary.undisclosed.items():
                if referral not in opened:
                    reasons[referral] = reason
        return dict(Counter(reasons.values()))

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


# -- stopwatches on topics ---------------------------------------------------------------------


class Stopwatch:
    """Reads lotse.visits and lotse.reporting.kpis: when each family's "visit scheduled"
    arrived, and every published value of the city-wide key figures of this year."""

    FIGURES = ("families_registered", "visits_offered", "referrals_requested", "referrals_accepted")

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.year = str(datetime.now(ZoneInfo("Europe/Berlin")).year)
        self.visit_scheduled: dict[str, float] = {}
        # figure -> [(seen at, value)], in arrival order
        self.kpis: dict[str, list[tuple[float, float]]] = {f: [] for f in self.FIGURES}
        self.kpi_messages = 0
        self.changed = asyncio.Event()
        self._reader: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._reader = await assigned_reader(
            self.stack.kafka(),
            [self.stack.topic(topic_names.VISITS), self.stack.topic(topic_names.REPORTING_KPIS)],
        )
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self._reader is not None
        visits_type = VisitScheduled.event_type.encode()
        kpi_type = KpiUpdated.event_type.encode()
        cells = {f"{CITY_TOTAL}/{self.year}/{f}".encode(): f for f in self.FIGURES}
        while True:
            batch = await self._reader.getmany(timeout_ms=100, max_records=5000)
            now = time.perf_counter()
            for records in batch.values():
                for record in records:
                    headers = dict(record.headers or ())
                    kind = headers.get("ce_type")
                    if kind == visits_type and record.key is not None:
                        self.visit_scheduled.setdefault(record.key.decode(), now)
                    elif kind == kpi_type:
                        self.kpi_messages += 1
                        figure = cells.get(headers.get("ce_subject", b""))
                        if figure is not None and record.value:
                            value = json.loads(record.value).get("value")
                            if value is not None:
                                self.kpis[figure].append((now, float(value)))
            if batch:
                self.changed.set()

    def latest(self, figure: str) -> float:
        series = self.kpis[figure]
        return max((v for _, v in series), default=0.0)

    def first_reaching(self, figure: str, value: float) -> float | None:
        """When the figure was first published at ``value`` or more."""
        for seen, published in self.kpis[figure]:
            if published >= value:
                return seen
        return None

    async def wait_for(
        self, targets: Mapping[str, float], visits: set[str], timeout_s: float
    ) -> bool:
        """Until every figure reached its target and every case in ``visits`` has its visit
        scheduled; False on timeout."""
        deadline = time.perf_counter() + timeout_s
        while True:
            if all(self.latest(f) >= v for f, v in targets.items()) and visits <= set(
                self.visit_scheduled
            ):
                return True
            left = deadline - time.perf_counter()
            if left <= 0:
                return False
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), timeout=min(left, 1.0))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._reader is not None:
            await self._reader.stop()
