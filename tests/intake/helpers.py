"""Helpers of the intake tests: the real service on the real broker and database, a clock
the test controls, callers in their roles, and readers for raw rows."""

from __future__ import annotations

import base64
import copy
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from lotse_intake.app import create_app
from lotse_intake.settings import IntakeSettings
from lotse_runtime.app import ServiceRuntime
from sqlalchemy import inspect, text

from tests.conftest import Broker
from tests.support import bearer

CLINIC = "st-josefs-hospital-hoerde"
# Monday 3 March 2025, 09:15 in Dortmund: the fictitious family's registration.
START = datetime(2025, 3, 3, 8, 15, tzinfo=UTC)

BABYLOTSE = bearer("babylotse", subject="bl-7", clinic=CLINIC)
OTHER_CLINIC = bearer("babylotse", subject="bl-9", clinic="klinikum-nord")
FAMILIENBUERO_HOERDE = bearer("familienbuero", subject="fb-3", bezirk="hoerde")
FAMILIENBUERO_EVING = bearer("familienbuero", subject="fb-4", bezirk="eving")
BEZIRKSTEAM_HOERDE = bearer("bezirksteam", subject="bt-1", bezirk="hoerde")
CITIZENS_OFFICE = bearer("service", subject="buergerbuero")
REFERRALS_SERVICE = bearer("service", subject="referrals")
REPORTING_SERVICE = bearer("service", subject="reporting")
VISITS_SERVICE = bearer("service", subject="visits")
TRAEGER = bearer("traeger", subject="tr-1", traeger="hebammenzentrum-dortmund")
DPO = bearer("dpo", subject="dsb-1")
#: A second data-protection officer: confirms what the first requested (four eyes).
SECOND_DPO = bearer("dpo", subject="dsb-2")
#: A request body for an erasure (reason and note, the family's written request).
ERASURE_REQUEST = {"reason": "request", "note": "Antrag der Familie, Vorgang E-17"}
ANALYST = bearer("analyst", subject="jhp-1")

#: Every plaintext personal value of the family in ``registration()``; none of them may
#: appear in a topic or a database row.
PLAINTEXTS = [
    "Yılmaz-Özdemir",
    "Ayşe",
    "Konstantin",
    "Mirabelle",
    "Hörder Bahnhofstraße",
    "Bahnhofstra",
    "+49 231 555 0177",
    "ayse.yilmaz@example.org",
    "2025-02-27",
    "27.02.2025",
]


def erase(
    client: TestClient,
    case_id: str,
    *,
    requester: dict[str, str] = DPO,
    confirmer: dict[str, str] = SECOND_DPO,
    body: dict[str, Any] | None = None,
) -> Any:
    """Erase a family with four eyes: one requests, a second data-protection officer
    confirms; the confirmation's answer (the erasure status)."""
    requested = client.post(
        f"/cases/{case_id}/erasure", json=body or ERASURE_REQUEST, headers=requester
    )
    assert requested.status_code == 202, requested.text
    request_id = requested.json()["request_id"]
    return client.post(f"/cases/{case_id}/erasure/{request_id}/confirm", headers=confirmer)


def registration(**changes: Any) -> dict[str, Any]:
    """A clinic registration of one newborn in Hörde; ``changes`` replace top-level keys."""
    body: dict[str, Any] = {
        "channel": "clinic",
        "family": {
            "family_name": "Yılmaz-Özdemir",
            "parent_given_names": ["Ayşe", "Konstantin"],
            "phone": "+49 231 555 0177",
            "email": "ayse.yilmaz@example.org",
        },
        "children": [{"given_name": "Mirabelle", "birth_date": "2025-02-27"}],
        "address": {
            "street": "Hörder Bahnhofstraße",
            "house_number": "12a",
            "postcode": "44263",
        },
        "preferred_language": "tr",
        "consents": [
            {"scope": "welcome_visit"},
            {
                "scope": "traeger_contact",
                "traeger": "hebammenzentrum-dortmund",
                "purpose": "familienhebamme",
            },
        ],
    }
    body.update(copy.deepcopy(changes))
    return body


@dataclass
class Clock:
    """The service's clock; tests move it."""

    now: datetime = START

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


def _secret() -> str:
    return base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()


def intake_settings(broker: Broker, database_url: str, prefix: str, **extra: Any) -> IntakeSettings:
    return IntakeSettings(
        kafka_bootstrap=broker.bootstrap,
        database_url=database_url,
        topic_prefix=prefix,
        consumer_session_timeout_ms=2000,
        consumer_heartbeat_interval_ms=300,
        relay_poll_interval_s=0.05,
        key_encryption_key=_secret(),
        match_key_secret=_secret(),
        **extra,
    )


@dataclass
class Intake:
    """A running intake service and what tests need around it."""

    client: TestClient
    clock: Clock
    prefix: str
    bootstrap: str
    database_url: str
    sqlite_file: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def runtime(self) -> ServiceRuntime[Any]:
        runtime: ServiceRuntime[Any] = self.client.app.state.runtime  # type: ignore[attr-defined]
        return runtime

    def topic(self, name: str) -> str:
        return self.prefix + name

    def register(self, headers: dict[str, str] | None = None, **changes: Any) -> dict[str, Any]:
        response = self.client.post(
            "/cases", json=registration(**changes), headers=headers or BABYLOTSE
        )
        assert response.status_code == 201, response.text
        body: dict[str, Any] = response.json()
        return body

    def row_counts(self) -> dict[str, int]:
        """Rows per table of the service database (intake's tables, outbox, audit)."""

        async def count() -> dict[str, int]:
            async with self.runtime.db.engine.connect() as conn:
                names = await conn.run_sync(lambda sync: inspect(sync).get_table_names())
                result = {}
                for name in names:
                    if name == "alembic_version":
                        continue
                    value = await conn.execute(text(f'SELECT COUNT(*) FROM "{name}"'))
                    result[name] = int(value.scalar_one())
                return result

        counts: dict[str, int] = self.client.portal.call(count)  # type: ignore[union-attr]
        return counts

    def stored_state(self) -> dict[str, int]:
        """Counts of what a refused request must not change (the audit log may grow)."""
        return {k: v for k, v in self.row_counts().items() if k != "audit_log"}

    def dump_rows(self) -> str:
        """Every row of every table as text, for scanning for plaintext."""

        async def dump() -> str:
            async with self.runtime.db.engine.connect() as conn:
                names = await conn.run_sync(lambda sync: inspect(sync).get_table_names())
                parts = []
                for name in names:
                    rows = await conn.execute(text(f'SELECT * FROM "{name}"'))
                    for row in rows:
                        for value in row:
                            if isinstance(value, bytes):
                                parts.append(value.decode("utf-8", "replace"))
                            else:
                                parts.append(str(value))
                return "\n".join(parts)

        dumped: str = self.client.portal.call(dump)  # type: ignore[union-attr]
        return dumped

    def outbox_types(self) -> list[str]:
        """Event types of the outbox rows (every topic copy, sent or not), in order."""

        async def types() -> list[str]:
            async with self.runtime.db.engine.connect() as conn:
                rows = await conn.execute(text("SELECT event_type FROM outbox ORDER BY id"))
                return [str(row[0]) for row in rows]

        found: list[str] = self.client.portal.call(types)  # type: ignore[union-attr]
        return found


def wait_ready(client: TestClient, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        response = client.get("/readyz")
        if response.status_code == 200:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"intake not ready: {response.text}")
        time.sleep(0.05)


def run_intake(broker: Broker, database_url: str, prefix: str, **extra: Any) -> Iterator[Intake]:
    clock = Clock()
    app = create_app(intake_settings(broker, database_url, prefix, **extra), clock=clock)
    sqlite_file = (
        Path(database_url.split("///", 1)[1]) if database_url.startswith("sqlite") else None
    )
    with TestClient(app) as client:
        wait_ready(client)
        yield Intake(client, clock, prefix, broker.bootstrap, database_url, sqlite_file, extra)
