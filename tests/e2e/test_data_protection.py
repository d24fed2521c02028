"""Data protection end to end: the four services together, on the real broker and real
databases (one per service; all on PostgreSQL, then all on SQLite), driven through their HTTP
APIs and the Träger's topics.

* Consent enforcement: a family withdraws its consents; within one event hop its welcome
  visit and its accepted referral are cancelled and the Träger is told on its feed.
* Erasure (crypto-shredding): a family's plaintext values are nowhere in clear, in no topic
  (domain, audience feeds, dead letters) and no database row, before its erasure and after
  it; after it the sealed blocks that are still on the topics cannot be opened any more,
  since no service can obtain the family's key.

All services share one event loop; the tests call their APIs through in-process ASGI
transports, and referrals reaches intake's keyring over real HTTP (intake served by uvicorn
on a port of this host, in the same loop), as it does over the network.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from fastapi import FastAPI
from lotse_contracts import topics as topic_names
from lotse_contracts.cloudevents import from_kafka
from lotse_contracts.events.intake import FamilyRegistered, NeedsAssessed
from lotse_contracts.events.partner import PartnerAnswer
from lotse_contracts.events.referrals import ReferralCancelled, ReferralRequested
from lotse_contracts.personal import (
    BlockUnreadable,
    EncryptedBlock,
    decode_data_key,
    jwe_header,
    kid_purpose,
    open_block,
    open_jwe,
)
from lotse_intake.app import create_app as create_intake
from lotse_intake.settings import IntakeSettings
from lotse_referrals.app import create_app as create_referrals
from lotse_referrals.keyring import DisclosureFor, HttpKeyring, KeyGone
from lotse_referrals.operations import Context as ReferralsContext
from lotse_referrals.settings import ReferralsSettings
from lotse_reporting.app import create_app as create_reporting
from lotse_reporting.settings import ReportingSettings
from lotse_runtime.app import ServiceRuntime
from lotse_tooling.embedded import free_port
from lotse_visits.app import create_app as create_visits
from lotse_visits.settings import VisitsSettings
from sqlalchemy import inspect, text
from sqlalchemy.engine import make_url

from examples.partner_client import build_answer
from tests.conftest import Broker, PostgresServer, _admin_execute
from tests.support import bearer, eventually, produce

pytestmark = pytest.mark.timeout(150)

SERVICES = ("intake", "visits", "referrals", "reporting")
TRAEGER = "hebammenzentrum-dortmund"
MODULE = "familienhebamme"
CLINIC = "st-josefs-hospital-hoerde"
# Monday 3 March 2025, 09:15 in Dortmund.
START = datetime(2025, 3, 3, 8, 15, tzinfo=UTC)

BABYLOTSE = bearer("babylotse", subject="bl-7", clinic=CLINIC)
FAMILIENBUERO = bearer("familienbuero", subject="fb-3", bezirk="hoerde")
TRAEGER_STAFF = bearer("traeger", subject="tr-1", traeger=TRAEGER)
DPO = bearer("dpo", subject="dsb-1")
SECOND_DPO = bearer("dpo", subject="dsb-2")
KEYRING_CLIENT = bearer("service", subject="referrals")

#: Family of the erasure test: values distinctive enough that any hit is a leak.
ERASED_FAMILY = {
    "family_name": "Quastenberg-Yıldırım",
    "parents": ["Eleonore-Şükran", "Bartholomäus"],
    "child": "Zephyrine",
    "street": "Zwetschgenallee am Phönixsee",
    "phone": "+49 231 98765 4321",
    "email": "zephyrine.quastenberg@example.org",
}
ERASED_BIRTH_DATE = "2025-02-26"
#: Family of the consent test.
CONSENT_FAMILY = {
    "family_name": "Wolkenstein-Oğuz",
    "parents": ["Liselotte"],
    "child": "Theodorich",
    "street": "Kirschblütenweg",
    "phone": "+49 231 11223 3445",
    "email": "liselotte.wolkenstein@example.org",
}


def plaintexts(family: dict[str, Any]) -> list[str]:
    values: list[str] = []
    for value in family.values():
        values.extend(value if isinstance(value, list) else [value])
    return values


def registration(family: dict[str, Any], birth_date: str) -> dict[str, Any]:
    return {
        "channel": "clinic",
        "family": {
            "family_name": family["family_name"],
            "parent_given_names": family["parents"],
            "phone": family["phone"],
            "email": family["email"],
        },
        "children": [{"given_name": family["child"], "birth_date": birth_date}],
        "address": {"street": family["street"], "house_number": "7b", "postcode": "44263"},
        "preferred_language": "de",
        "consents": [
            {"scope": "welcome_visit"},
            {"scope": "screening_data_use"},
            {"scope": "traeger_contact", "traeger": TRAEGER, "purpose": MODULE},
        ],
    }


# -- the platform ------------------------------------------------------------------------------


class Clock:
    """One clock for all four services; the test moves it."""

    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


def _secret() -> str:
    return base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()


#: Backend of each service's database, per parameter.
BACKENDS: dict[str, dict[str, str]] = {
    "postgresql": dict.fromkeys(SERVICES, "postgresql"),
    "sqlite": dict.fromkeys(SERVICES, "sqlite"),
}


@pytest.fixture(params=list(BACKENDS))
def databases(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict[str, str]]:
    """One fresh database per service, on the backends the parameter names."""
    backends = BACKENDS[request.param]
    urls = {
        name: f"sqlite+aiosqlite:///{tmp_path / name}.db"
        for name in SERVICES
        if backends[name] == "sqlite"
    }
    on_postgres = [name for name in SERVICES if backends[name] == "postgresql"]
    server: PostgresServer | None = request.getfixturevalue("postgres_server")
    if on_postgres and server is None:
        pytest.skip("no PostgreSQL: set DATABASE_URL or run one on 127.0.0.1:5432")
    tag = uuid.uuid4().hex[:8]
    created = {service: f"lotse_e2e_{service}_{tag}" for service in on_postgres}
    try:
        if server is not None:
            base = make_url(server.admin_url).set(drivername="postgresql+asyncpg")
            for service, name in created.items():
                _admin_execute(server.admin_url, f'CREATE DATABASE "{name}"')
                urls[service] = base.set(database=name).render_as_string(False)
        yield urls
    finally:
        if server is not None:
            for name in created.values():
                _admin_execute(server.admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@dataclass
class Platform:
    clock: Clock
    apps: dict[str, FastAPI]
    clients: dict[str, httpx.AsyncClient]
    bootstrap: str
    prefix: str
    databases: dict[str, str]

    def runtime(self, service: str) -> ServiceRuntime[Any]:
        runtime: ServiceRuntime[Any] = self.apps[service].state.runtime
        return runtime

    @property
    def intake(self) -> httpx.AsyncClient:
        return self.clients["intake"]

    @property
    def visits(self) -> httpx.AsyncClient:
        return self.clients["visits"]

    @property
    def referrals(self) -> httpx.AsyncClient:
        return self.clients["referrals"]

    def topic(self, name: str) -> str:
        return self.prefix + name

    async def quiet(self) -> None:
        """Every outbox relayed (what is committed is on the topics)."""
        for service in SERVICES:
            await self.runtime(service).relay.drain(timeout_s=20)


def _common(broker: Broker, prefix: str, database_url: str) -> dict[str, Any]:
    return {
        "kafka_bootstrap": broker.bootstrap,
        "database_url": database_url,
        "topic_prefix": prefix,
        "create_topics": False,
        "consumer_session_timeout_ms": 2000,
        "consumer_heartbeat_interval_ms": 300,
        "consumer_backoff_s": 0.05,
        "relay_poll_interval_s": 0.05,
    }


@asynccontextmanager
async def served(app: FastAPI, port: int) -> AsyncIterator[None]:
    """``app`` over HTTP on ``port`` of this host, in this event loop (its lifespan is run by
    the platform, not by the server)."""
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="off", log_level="warning")
    )
    serving = asyncio.create_task(server.serve())
    try:
        await eventually(lambda: server.started, timeout_s=10)
        yield
    finally:
        server.should_exit = True
        await serving


@asynccontextmanager
async def platform(
    broker: Broker, prefix: str, databases: dict[str, str]
) -> AsyncIterator[Platform]:
    clock = Clock()
    keyring_port = free_port()
    intake = create_intake(
        IntakeSettings(
            **_common(broker, prefix, databases["intake"]),
            key_encryption_key=_secret(),
            match_key_secret=_secret(),
        ),
        clock=clock,
    )
    keyring = HttpKeyring(f"http://127.0.0.1:{keyring_port}", headers=KEYRING_CLIENT)
    apps: dict[str, FastAPI] = {
        "intake": intake,
        "visits": create_visits(
            VisitsSettings(**_common(broker, prefix, databases["visits"])), clock=clock
        ),
        "referrals": create_referrals(
            ReferralsSettings(
                **_common(broker, prefix, databases["referrals"]),
                escalation_interval_s=3600,
                placement_interval_s=3600,
            ),
            clock=clock,
            keyring=keyring,
        ),
        "reporting": create_reporting(
            ReportingSettings(
                **_common(broker, prefix, databases["reporting"]),
                publish_interval_s=0.2,
                dashboard_poll_s=0.2,
            ),
            clock=clock,
        ),
    }
    async with AsyncExitStack() as stack:
        clients: dict[str, httpx.AsyncClient] = {}
        for app in apps.values():
            await stack.enter_async_context(app.router.lifespan_context(app))
        await stack.enter_async_context(served(intake, keyring_port))
        for name, app in apps.items():
            clients[name] = await stack.enter_async_context(
                httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=f"http://{name}")
            )
        found = Platform(clock, apps, clients, broker.bootstrap, prefix, databases)
        for name in SERVICES:

            async def ready(client: httpx.AsyncClient = clients[name]) -> bool:
                return (await client.get("/readyz")).status_code == 200

            await eventually(ready, timeout_s=30)
            for consumer in found.runtime(name).consumers:
                await consumer.wait_assigned(30)
        yield found


# -- reading every topic -----------------------------------------------------------------------


@dataclass
class RawRecord:
    topic: str
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]

    @property
    def raw(self) -> bytes:
        parts = [self.key or b"", self.value or b""]
        parts.extend(v for _, v in self.headers)
        return b"\n".join(parts)


def _read_all(
    bootstrap: str,
    prefix: str,
    *,
    at_least: int = 0,
    until: Callable[[RawRecord], bool] | None = None,
    settle_s: float = 0.5,
    timeout_s: float = 30.0,
) -> tuple[list[str], list[RawRecord]]:
    """Records of every topic whose name starts with ``prefix``, from the beginning: until
    ``until`` matches one, or else until ``at_least`` arrived and ``settle_s`` passed without
    more (end offsets of the embedded broker cannot be trusted to say where the end is)."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"e2e-scan-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    try:
        metadata = consumer.list_topics(timeout=10)
        names = sorted(t for t in metadata.topics if t.startswith(prefix))
        consumer.assign(
            [
                TopicPartition(name, partition, OFFSET_BEGINNING)
                for name in names
                for partition in metadata.topics[name].partitions
            ]
        )
        records: list[RawRecord] = []
        deadline = time.monotonic() + timeout_s
        last = time.monotonic()
        while time.monotonic() < deadline:
            message = consumer.poll(0.1)
            if message is None or message.error():
                if (
                    until is None
                    and len(records) >= at_least
                    and time.monotonic() - last > settle_s
                ):
                    break
                continue
            last = time.monotonic()
            headers = [
                (str(h[0]), h[1]) for h in message.headers() or [] if isinstance(h[1], bytes)
            ]
            record = RawRecord(message.topic() or "", message.key(), message.value(), headers)
            records.append(record)
            if until is not None and until(record):
                break
        return names, records
    finally:
        consumer.close()


async def outbox_rows(platform: Platform) -> int:
    """Records the services have published (every outbox row is sent: see ``quiet``)."""
    total = 0
    for service in SERVICES:
        async with platform.runtime(service).db.engine.connect() as conn:
            total += int((await conn.execute(text("SELECT COUNT(*) FROM outbox"))).scalar_one())
    return total


async def every_record(platform: Platform, at_least: int) -> list[RawRecord]:
    """Every record of every topic under the test's prefix (domain topics, audience feeds,
    reporting stream, dead letters), read from the start with an independent client."""
    names, records = await asyncio.to_thread(
        _read_all, platform.bootstrap, platform.prefix, at_least=at_least
    )
    assert platform.topic(topic_names.dead_letter("visits")) in names
    assert platform.topic(topic_names.partner_referrals(TRAEGER)) in names
    assert len(records) >= at_least, f"only {len(records)} of {at_least} records read"
    return records


def spellings(value: str) -> list[bytes]:
    """How a value may appear in bytes: UTF-8, and JSON-escaped (\\u0131 for ı)."""
    escaped = json.dumps(value)[1:-1]
    return sorted({value.encode(), escaped.encode(), value.lower().encode()})


def found_in(blob: bytes, values: list[str]) -> list[str]:
    return [v for v in values if any(s in blob for s in spellings(v))]


def leaks_in_topics(records: list[RawRecord], values: list[str]) -> dict[str, list[str]]:
    leaks: dict[str, list[str]] = {}
    for record in records:
        hits = found_in(record.raw, values)
        if hits:
            leaks.setdefault(record.topic, []).extend(hits)
    return leaks


def events_of(records: list[RawRecord], topic: str, event_type: str) -> list[dict[str, Any]]:
    found = []
    for record in records:
        if record.topic != topic:
            continue
        event = from_kafka(record.value, record.headers)
        if event.type == event_type:
            found.append(dict(event.data or {}))
    return found


# -- reading every row -------------------------------------------------------------------------


async def dump_database(runtime: ServiceRuntime[Any]) -> dict[str, str]:
    """Every row of every table of a service database, as text, per table."""
    async with runtime.db.engine.connect() as conn:
        names = await conn.run_sync(lambda sync: inspect(sync).get_table_names())
        tables: dict[str, str] = {}
        for name in names:
            rows = await conn.execute(text(f'SELECT * FROM "{name}"'))
            cells: list[str] = []
            for row in rows:
                for value in row:
                    if isinstance(value, bytes | memoryview):
                        cells.append(bytes(value).decode("utf-8", "replace"))
                    else:
                        cells.append(json.dumps(value, default=str, ensure_ascii=False))
            tables[name] = "\n".join(cells)
        return tables


def sqlite_files(database_url: str) -> list[Path]:
    if not database_url.startswith("sqlite"):
        return []
    main = Path(database_url.split("///", 1)[1])
    return [p for p in (main, Path(f"{main}-wal"), Path(f"{main}-journal")) if p.exists()]


async def leaks_in_databases(platform: Platform, values: list[str]) -> dict[str, list[str]]:
    """Plaintext found per ``service.table`` (rows read with SQL; for SQLite also the raw
    bytes of the database file and its write-ahead log)."""
    leaks: dict[str, list[str]] = {}
    for service in SERVICES:
        for table, dumped in (await dump_database(platform.runtime(service))).items():
            hits = found_in(dumped.encode(), values) + found_in(
                dumped.encode("unicode_escape"), values
            )
            if hits:
                leaks[f"{service}.{table}"] = sorted(set(hits))
        for file in sqlite_files(platform.databases[service]):
            hits = found_in(file.read_bytes(), values)
            if hits:
                leaks[f"{service}:{file.name}"] = hits
    return leaks


# -- steps through the APIs --------------------------------------------------------------------


async def register(platform: Platform, family: dict[str, Any], birth_date: str) -> str:
    response = await platform.intake.post(
        "/cases", json=registration(family, birth_date), headers=BABYLOTSE
    )
    assert response.status_code == 201, response.text
    case_id: str = response.json()["case_id"]
    return case_id


async def scheduled_visit(platform: Platform, case_id: str) -> dict[str, Any]:
    async def found() -> dict[str, Any] | None:
        response = await platform.visits.get(f"/cases/{case_id}", headers=FAMILIENBUERO)
        if response.status_code != 200:
            return None
        visits = [v for v in response.json()["visits"] if v["status"] == "scheduled"]
        return visits[0] if visits else None

    visit: dict[str, Any] = await eventually(found, timeout_s=30)
    return visit


async def request_handover(platform: Platform, case_id: str) -> dict[str, Any]:
    """The Babylotse asks for the warm handover; referrals turns it into a referral to the
    Träger the family consented to."""
    response = await platform.intake.post(
        f"/cases/{case_id}/handovers",
        json={"module": MODULE, "traeger": TRAEGER},
        headers=BABYLOTSE,
    )
    assert response.status_code == 201, response.text

    async def created() -> dict[str, Any] | None:
        response = await platform.referrals.get(
            f"/cases/{case_id}/referrals", headers=FAMILIENBUERO
        )
        if response.status_code != 200 or not response.json():
            return None
        first: dict[str, Any] = response.json()[0]
        return first

    referral: dict[str, Any] = await eventually(created, timeout_s=30)
    return referral


async def referral_status(platform: Platform, referral_id: str) -> str:
    response = await platform.referrals.get(f"/referrals/{referral_id}", headers=FAMILIENBUERO)
    assert response.status_code == 200, response.text
    status: str = response.json()["status"]
    return status


async def traeger_feed(platform: Platform, referral_id: str, event_type: str) -> dict[str, Any]:
    """Wait for an event on the Träger's own feed about one referral."""
    topic = platform.topic(topic_names.partner_referrals(TRAEGER))

    def about_it(record: RawRecord) -> bool:
        event = from_kafka(record.value, record.headers)
        return event.type == event_type and (event.data or {}).get("referral_id") == referral_id

    _names, records = await asyncio.to_thread(
        _read_all, platform.bootstrap, topic, until=about_it, timeout_s=30
    )
    assert records, f"nothing on {topic}"
    assert about_it(records[-1]), f"no {event_type} for the referral on {topic}"
    found = from_kafka(records[-1].value, records[-1].headers).data
    assert isinstance(found, dict)
    return found


async def traeger_accepts(platform: Platform, referral_id: str) -> ReferralRequested:
    """The Träger, as examples/partner_client.py does: reads the referral from its feed and
    answers received, then accepted, on its responses topic."""
    requested = ReferralRequested.model_validate(
        await traeger_feed(platform, referral_id, ReferralRequested.event_type)
    )
    responses = platform.topic(topic_names.partner_responses(TRAEGER))
    for answer in (PartnerAnswer.RECEIVED, PartnerAnswer.ACCEPTED):
        platform.clock.advance(minutes=5)
        record = build_answer(requested, answer, at=platform.clock())
        await asyncio.to_thread(
            produce, platform.bootstrap, responses, record.value, record.headers, record.key
        )

    async def accepted() -> bool:
        return await referral_status(platform, referral_id) == "accepted"

    await eventually(accepted, timeout_s=30)
    return requested


#: Who may ask for keys, and the keys each may get: a Lotse service straight from intake's
#: keyring, a Träger through its referral's disclosure-key route.
KEY_HOLDERS: dict[str, dict[str, str]] = {
    "visits": bearer("service", subject="visits"),
    "referrals": KEYRING_CLIENT,
    "reporting": bearer("service", subject="reporting"),
    "an unknown service": bearer("service", subject="intruder"),
    "the addressed Träger": TRAEGER_STAFF,
    "another Träger": bearer("traeger", subject="tr-9", traeger="familienforum-west"),
}
#: Which block each holder's keys may open (by the purpose the block was sealed for).
MAY_OPEN = {
    "visits": {"contact"},
    "the addressed Träger": {"disclosure"},
}
PURPOSES = ("contact", "children", "screening")


async def released_keys(
    platform: Platform, case_id: str, referral_id: str
) -> dict[str, dict[str, bytes]]:
    """Every key each holder obtains when it asks for every key of the family."""
    released: dict[str, dict[str, bytes]] = {}
    for holder, headers in KEY_HOLDERS.items():
        keys: dict[str, bytes] = {}
        for purpose in PURPOSES:
            answer = await platform.intake.get(
                f"/keyring/cases/{case_id}/keys/{purpose}", headers=headers
            )
            if answer.status_code == 200:
                keys[purpose] = decode_data_key(answer.json()["key"])
        answer = await platform.referrals.get(
            f"/referrals/{referral_id}/disclosure-key", headers=headers
        )
        if answer.status_code == 200:
            keys["disclosure"] = decode_data_key(answer.json()["key"])
        released[holder] = keys
    return released


def sealed_blocks(records: list[RawRecord], case_id: str) -> list[tuple[str, str, Any]]:
    """(topic, purpose, block or compact JWE) of every sealed block of the case on any topic,
    found by its shape, whatever event or field carries it."""
    found: list[tuple[str, str, Any]] = []

    def walk(topic: str, value: Any) -> None:
        if isinstance(value, dict):
            if {"kid", "nonce", "ciphertext"} <= value.keys():
                block = EncryptedBlock.model_validate(value)
                found.append((topic, kid_purpose(block.kid)[1] or "family", block))
                return
            for item in value.values():
                walk(topic, item)
        elif isinstance(value, list):
            for item in value:
                walk(topic, item)
        elif isinstance(value, str) and value.count(".") == 4 and value.startswith("ey"):
            purpose = kid_purpose(jwe_header(value)["kid"])[1]
            found.append((topic, purpose or "family", value))

    for record in records:
        if record.value is None or case_id.encode() not in record.raw:
            continue
        try:
            event = from_kafka(record.value, record.headers)
        except ValueError:
            continue
        if event.subject == case_id:
            walk(record.topic, event.data)
    return found


def opens(sealed: Any, key: bytes, case_id: str) -> bool:
    try:
        if isinstance(sealed, str):
            open_jwe(sealed, key=key)
        else:
            open_block(sealed, key=key, case_id=case_id)
    except BlockUnreadable:
        return False
    return True


# -- the tests ---------------------------------------------------------------------------------


async def test_consent_withdrawal_and_erasure_end_to_end(
    broker: Broker, topics: str, databases: dict[str, str]
) -> None:
    async with platform(broker, topics, databases) as lotse:
        case_id, referral_id = await consent_withdrawal_stops_visit_and_referral(lotse)
        records = await erasure_leaves_no_readable_personal_data(lotse)
        cancellations_published(lotse, records, case_id, referral_id)


async def consent_withdrawal_stops_visit_and_referral(lotse: Platform) -> tuple[str, str]:
    case_id = await register(lotse, CONSENT_FAMILY, "2025-02-25")
    visit = await scheduled_visit(lotse, case_id)
    referral = await request_handover(lotse, case_id)
    referral_id = referral["referral_id"]
    await traeger_accepts(lotse, referral_id)

    consents = (await lotse.intake.get(f"/cases/{case_id}/consents", headers=BABYLOTSE)).json()
    withdrawn = [c for c in consents if c["scope"] in ("welcome_visit", "traeger_contact")]
    assert len(withdrawn) == 2
    lotse.clock.advance(hours=1)
    for consent in withdrawn:
        response = await lotse.intake.post(
            f"/cases/{case_id}/consents/{consent['consent_id']}/withdraw", headers=BABYLOTSE
        )
        assert response.status_code == 200, response.text

    # One hop: visits and referrals consume intake's consent-changed and act on it.
    async def visit_cancelled() -> dict[str, Any] | None:
        response = await lotse.visits.get(f"/visits/{visit['visit_id']}", headers=FAMILIENBUERO)
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()["visit"]
        return body if body["status"] == "cancelled" else None

    async def referral_cancelled() -> bool:
        return await referral_status(lotse, referral_id) == "cancelled"

    await eventually(visit_cancelled, timeout_s=30)
    await eventually(referral_cancelled, timeout_s=30)

    # The Träger is told on its own feed, with the reason; and the domain topics say so too.
    told = ReferralCancelled.model_validate(
        await traeger_feed(lotse, referral_id, ReferralCancelled.event_type)
    )
    assert told.reason == "consent_withdrawn"
    # Nothing of the family is open for the Träger any more.
    base = f"/traeger/{TRAEGER}/referrals"
    still_open = await lotse.referrals.get(base, headers=TRAEGER_STAFF)
    assert still_open.status_code == 200, still_open.text
    assert referral_id not in {r["referral_id"] for r in still_open.json()}
    mine = await lotse.referrals.get(base, params={"status": "all"}, headers=TRAEGER_STAFF)
    assert {r["referral_id"]: r["status"] for r in mine.json()}[referral_id] == "cancelled"
    return case_id, referral_id


def cancellations_published(
    lotse: Platform, records: list[RawRecord], case_id: str, referral_id: str
) -> None:
    """The cancellations of the consent test are on the domain topics, with the reason."""
    cancelled_visits = [
        e
        for e in events_of(
            records, lotse.topic(topic_names.VISITS), "de.lotse.visits.visit-cancelled.v1"
        )
        if e["case_id"] == case_id
    ]
    assert [e["reason"] for e in cancelled_visits] == ["consent_withdrawn"]
    cancelled_referrals = [
        e
        for e in events_of(
            records, lotse.topic(topic_names.REFERRALS), ReferralCancelled.event_type
        )
        if e["referral_id"] == referral_id
    ]
    assert [e["reason"] for e in cancelled_referrals] == ["consent_withdrawn"]


async def erasure_leaves_no_readable_personal_data(lotse: Platform) -> list[RawRecord]:
    """Returns every record on the topics before the erasure."""
    values = plaintexts(ERASED_FAMILY) + plaintexts(CONSENT_FAMILY)
    # The scanner sees the values however JSON spells them (a scan that cannot fail proves
    # nothing).
    body = registration(ERASED_FAMILY, ERASED_BIRTH_DATE)
    for ascii_only in (True, False):
        dumped = json.dumps(body, ensure_ascii=ascii_only).encode()
        assert found_in(dumped, values) == plaintexts(ERASED_FAMILY)
    case_id = await register(lotse, ERASED_FAMILY, ERASED_BIRTH_DATE)
    screening = await lotse.intake.post(
        f"/cases/{case_id}/screenings",
        json={"support_need": "increased", "indicators": ["social_isolation"]},
        headers=BABYLOTSE,
    )
    assert screening.status_code == 201, screening.text
    await scheduled_visit(lotse, case_id)
    referral = await request_handover(lotse, case_id)
    requested = await traeger_accepts(lotse, referral["referral_id"])
    assert requested.disclosure is not None
    await lotse.quiet()

    # Before: the values are on the topics only sealed, and in the databases only sealed.
    # Every outbox row is a record on some topic; the Träger wrote two answers per family.
    before = await every_record(lotse, at_least=await outbox_rows(lotse) + 4)
    assert leaks_in_topics(before, [*values, ERASED_BIRTH_DATE]) == {}
    assert await leaks_in_databases(lotse, values) == {}
    [registered] = [
        FamilyRegistered.model_validate(e)
        for e in events_of(before, lotse.topic(topic_names.INTAKE), FamilyRegistered.event_type)
        if e["case_id"] == case_id
    ]
    [assessed] = [
        NeedsAssessed.model_validate(e)
        for e in events_of(before, lotse.topic(topic_names.INTAKE), NeedsAssessed.event_type)
        if e["case_id"] == case_id
    ]
    assert registered.children is not None
    assert requested.disclosure_jwe is not None
    blocks: list[EncryptedBlock] = [
        registered.personal,
        registered.children,
        assessed.screening,
        requested.disclosure,
    ]
    # Every key every role can obtain, tried on every sealed block of the family on every
    # topic (domain topics, the Träger's feed, the Bezirk feeds): exactly the allowed
    # combinations open.
    keys = await released_keys(lotse, case_id, referral["referral_id"])
    assert {holder: sorted(k) for holder, k in keys.items() if k} == {
        "visits": ["contact"],
        "the addressed Träger": ["disclosure"],
    }
    on_topics = sealed_blocks(before, case_id)
    purposes_seen = {purpose for _topic, purpose, _block in on_topics}
    assert purposes_seen == {"contact", "children", "screening", "disclosure"}
    assert lotse.topic(topic_names.partner_referrals(TRAEGER)) in {t for t, _p, _b in on_topics}
    for holder, held in keys.items():
        for key_purpose, key in held.items():
            for topic, purpose, sealed in on_topics:
                allowed = purpose == key_purpose and purpose in MAY_OPEN.get(holder, set())
                assert opens(sealed, key, case_id) == allowed, (holder, key_purpose, topic, purpose)
    # What the Träger opens is exactly what the family consented to pass, in both envelopes.
    disclosure_key = keys["the addressed Träger"]["disclosure"]
    opened = open_block(requested.disclosure, key=disclosure_key, case_id=case_id)
    assert opened["phone"] == ERASED_FAMILY["phone"]
    assert set(opened) == {f.value for f in requested.disclosed_fields}
    assert open_jwe(requested.disclosure_jwe, key=disclosure_key) == opened
    del keys, opened, disclosure_key

    lotse.clock.advance(days=1)
    erasure_request = await lotse.intake.post(
        f"/cases/{case_id}/erasure",
        json={"reason": "request", "note": "Antrag der Familie, Vorgang E-17"},
        headers=DPO,
    )
    assert erasure_request.status_code == 202, erasure_request.text
    erased = await lotse.intake.post(
        f"/cases/{case_id}/erasure/{erasure_request.json()['request_id']}/confirm",
        headers=SECOND_DPO,
    )
    assert erased.status_code == 200, erased.text

    # Each service hears of it (one hop) and drops its local copies.
    async def everywhere_erased() -> bool:
        visits = await lotse.visits.get(f"/cases/{case_id}", headers=FAMILIENBUERO)
        referral_now = await referral_status(lotse, referral["referral_id"])
        return (
            visits.status_code in (200, 404, 410)
            and (visits.status_code != 200 or visits.json()["personal"] is None)
            and referral_now == "cancelled"
        )

    await eventually(everywhere_erased, timeout_s=30)
    visits_runtime = lotse.runtime("visits")

    async def visits_purged() -> bool:
        async with visits_runtime.db.engine.connect() as conn:
            row = (
                await conn.execute(
                    text("SELECT erased_at FROM visits_case WHERE case_id = :c"), {"c": case_id}
                )
            ).first()
        return row is not None and row[0] is not None

    await eventually(visits_purged, timeout_s=30)
    await lotse.quiet()

    # After: no plaintext anywhere, and no way to open what is still on the topics.
    after = await every_record(lotse, at_least=len(before) + 1)
    assert leaks_in_topics(after, [*values, ERASED_BIRTH_DATE]) == {}
    # Visits keeps the visit's reference date (the birth) in a plain column until the erasure;
    # the raw SQLite files (and their write-ahead logs) must not keep the old pages either.
    assert await leaks_in_databases(lotse, [*values, ERASED_BIRTH_DATE]) == {}
    still_there = [r.raw for r in after]
    for block in blocks:
        assert any(block.ciphertext.encode() in raw for raw in still_there)

    # After the erasure no key of the family is released to anyone, for any purpose.
    for holder, headers in KEY_HOLDERS.items():
        for purpose in PURPOSES:
            answer = await lotse.intake.get(
                f"/keyring/cases/{case_id}/keys/{purpose}", headers=headers
            )
            assert answer.status_code in (403, 410), (holder, purpose, answer.text)
        answer = await lotse.referrals.get(
            f"/referrals/{referral['referral_id']}/disclosure-key", headers=headers
        )
        # The Träger gets no key either (the referral is cancelled and the key gone).
        assert answer.status_code in (403, 404, 409, 410), (holder, answer.text)
    referrals_ctx: ReferralsContext = lotse.apps["referrals"].state.referrals
    assert referrals_ctx.keyring is not None
    with pytest.raises(KeyGone):
        await referrals_ctx.keyring.disclosure_key(
            DisclosureFor(case_id, referral["referral_id"], TRAEGER, requested.consent_ref)
        )
    # Without the family key a block does not open, whichever key one tries.
    for block in blocks:
        with pytest.raises(BlockUnreadable):
            open_block(block, key=secrets.token_bytes(32), case_id=case_id)
    return before
