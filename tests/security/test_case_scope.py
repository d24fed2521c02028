"""Scope with real cases: another Stadtbezirk's case looks exactly like no case, a Träger sees
only what is addressed to it, analysts never get a single case, and every personal-data
access is audited without a single personal value in the trail."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from httpx import Response
from lotse_runtime.audit import AuditEntry
from sqlmodel import select

from tests.conftest import Broker
from tests.intake.helpers import (
    ANALYST,
    BABYLOTSE,
    BEZIRKSTEAM_HOERDE,
    DPO,
    ERASURE_REQUEST,
    FAMILIENBUERO_EVING,
    FAMILIENBUERO_HOERDE,
    OTHER_CLINIC,
    PLAINTEXTS,
    TRAEGER,
    Intake,
    registration,
    run_intake,
)
from tests.support import bearer

pytestmark = pytest.mark.integration

NOBODY = "0c5f5d4e-1111-4aaa-8bbb-123456789abc"


@pytest.fixture
def intake(broker: Broker, topics: str, sqlite_url: str) -> Iterator[Intake]:
    yield from run_intake(broker, sqlite_url, topics)


def same_refusal(real: Response, unknown: Response) -> None:
    """The answer for a case that is not the caller's equals the one for no case at all."""
    assert real.status_code == unknown.status_code == 403
    assert real.content == unknown.content == b'{"detail":"not permitted"}'
    assert real.headers.get("content-type") == unknown.headers.get("content-type")


def trail_of(client: TestClient) -> list[AuditEntry]:
    runtime = client.app.state.runtime  # type: ignore[attr-defined]

    async def load() -> list[AuditEntry]:
        async with runtime.db.transaction() as session:
            return list((await session.execute(select(AuditEntry))).scalars())

    rows: list[AuditEntry] = client.portal.call(load)  # type: ignore[union-attr]
    return rows


def assert_no_personal_values(rows: list[AuditEntry], values: list[str]) -> None:
    dumped = json.dumps([row.model_dump(mode="json") for row in rows], ensure_ascii=False)
    found = [value for value in values if value.lower() in dumped.lower()]
    assert not found, f"personal values in the audit log: {found}"


def test_intake_case_of_another_bezirk_or_clinic_looks_like_no_case(intake: Intake) -> None:
    client = intake.client
    created = client.post("/cases", json=registration(), headers=BABYLOTSE)
    assert created.status_code == 201, created.text
    case_id = created.json()["case_id"]
    assert created.json()["bezirk"] == "hoerde"

    reads = ["/cases/{}", "/cases/{}/consents", "/cases/{}/screenings", "/cases/{}/erasure"]
    for outsider in (FAMILIENBUERO_EVING, OTHER_CLINIC):
        for template in reads:
            same_refusal(
                client.get(template.format(case_id), headers=outsider),
                client.get(template.format(NOBODY), headers=outsider),
            )
        same_refusal(
            client.post(f"/cases/{case_id}/erasure", json=ERASURE_REQUEST, headers=outsider),
            client.post(f"/cases/{NOBODY}/erasure", json=ERASURE_REQUEST, headers=outsider),
        )
    for stranger in (ANALYST, TRAEGER):
        for template in reads:
            same_refusal(
                client.get(template.format(case_id), headers=stranger),
                client.get(template.format(NOBODY), headers=stranger),
            )
    # The family is still there for those it belongs to.
    assert client.get(f"/cases/{case_id}", headers=FAMILIENBUERO_HOERDE).status_code == 200


def test_every_personal_data_access_is_audited_without_personal_values(intake: Intake) -> None:
    client = intake.client
    created = client.post("/cases", json=registration(), headers=BABYLOTSE)
    assert created.status_code == 201, created.text
    case_id = created.json()["case_id"]
    screening = client.post(
        f"/cases/{case_id}/screenings",
        json={"support_need": "increased", "indicators": ["single_parent"]},
        headers=FAMILIENBUERO_HOERDE,
    )
    assert screening.status_code == 201, screening.text
    accesses = [
        ("/cases/{case_id}", FAMILIENBUERO_HOERDE, "fb-3"),
        ("/cases/{case_id}", BEZIRKSTEAM_HOERDE, "bt-1"),
        ("/cases/{case_id}/consents", DPO, "dsb-1"),
        ("/cases/{case_id}/screenings", BABYLOTSE, "bl-7"),
        ("/cases/{case_id}/erasure", DPO, "dsb-1"),
    ]
    for template, headers, _ in accesses:
        answer = client.get(template.format(case_id=case_id), headers=headers)
        assert answer.status_code == 200, (template, answer.text)
    # An idempotent replay is an access too.
    key = {"Idempotency-Key": str(uuid.uuid4())}
    for _ in range(2):
        consent = client.post(
            f"/cases/{case_id}/consents",
            json={"scope": "screening_data_use"},
            headers={**FAMILIENBUERO_HOERDE, **key},
        )
        assert consent.status_code in (200, 201), consent.text

    trail = client.get("/audit", params={"case_id": case_id, "limit": 1000}, headers=DPO).json()
    entries = {(e["subject"], e["path"], e["action"]) for e in trail}
    for template, _, subject in accesses:
        assert (subject, template, "read") in entries, (subject, template)
    assert ("bl-7", "/cases", "create") in entries
    assert ("fb-3", "/cases/{case_id}/screenings", "create") in entries
    changes = [
        e for e in trail if e["path"] == "/cases/{case_id}/consents" and e["subject"] == "fb-3"
    ]
    assert len(changes) == 2  # the first request and its replay
    assert all(e["case_id"] == case_id for e in trail)
    assert all(e["at"] and e["purpose"] and e["role"] for e in trail)
    assert_no_personal_values(trail_of(client), PLAINTEXTS)


def test_dpo_alone_reads_the_trail(intake: Intake) -> None:
    client = intake.client
    for headers in (FAMILIENBUERO_HOERDE, BABYLOTSE, ANALYST, TRAEGER, BEZIRKSTEAM_HOERDE):
        assert client.get("/audit", headers=headers).status_code == 403
    assert client.get("/audit").status_code == 401
    assert client.get("/audit", headers=DPO).status_code == 200


# -- referrals -------------------------------------------------------------------------------------


@contextmanager
def referral_for_one_family(
    broker: Broker, tmp_path: Path, prefix: str
) -> Iterator[tuple[Any, str, str]]:
    """A running referrals service with one family's referral to the Hebammenzentrum."""
    from tests.referrals.helpers import FAMILIENBUERO, MODULE, Family, running
    from tests.referrals.helpers import TRAEGER as ADDRESSED

    database = f"sqlite+aiosqlite:///{tmp_path / 'referrals.db'}"
    with running(broker.bootstrap, database, prefix) as service:
        family = Family()
        service.register(family)
        service.wait(
            lambda: (
                service.client.get(
                    f"/cases/{family.case_id}/referrals", headers=FAMILIENBUERO
                ).status_code
                == 200
            ),
            what="family registered",
        )
        created = service.client.post(
            "/referrals",
            json={
                "case_id": family.case_id,
                "module": MODULE,
                "traeger": ADDRESSED,
                "consent_ref": family.consent_id,
            },
            headers=FAMILIENBUERO,
        )
        assert created.status_code == 201, created.text
        yield service, family.case_id, created.json()["referral_id"]


def test_a_traeger_sees_only_referrals_addressed_to_it(
    broker: Broker, tmp_path: Path, topic_prefix: str
) -> None:
    from tests.referrals.helpers import FAMILIENBUERO_EVING as OTHER_OFFICE
    from tests.referrals.helpers import TRAEGER as ADDRESSED
    from tests.referrals.helpers import traeger_caller

    with referral_for_one_family(broker, tmp_path, topic_prefix) as (service, case_id, referral_id):
        client = service.client
        addressed = traeger_caller()
        stranger = traeger_caller("familienforum-west")
        analyst = bearer("analyst", subject="jhp-1")
        for outsider in (stranger, OTHER_OFFICE, analyst):
            for template in ("/referrals/{}", "/referrals/{}/disclosure-key"):
                same_refusal(
                    client.get(template.format(referral_id), headers=outsider),
                    client.get(template.format(NOBODY), headers=outsider),
                )
            same_refusal(
                client.post(
                    f"/referrals/{referral_id}/steps", json={"step": "received"}, headers=outsider
                ),
                client.post(
                    f"/referrals/{NOBODY}/steps", json={"step": "received"}, headers=outsider
                ),
            )
            same_refusal(
                client.get(f"/cases/{case_id}/referrals", headers=outsider),
                client.get(f"/cases/{NOBODY}/referrals", headers=outsider),
            )
        # The addressed Träger follows it, and the runtime's audit entry names the case
        # although the path names only the referral.
        assert client.get(f"/referrals/{referral_id}", headers=addressed).status_code == 200
        entries = [
            e
            for e in trail_of(client)
            if e.path == "/referrals/{referral_id}" and e.action == "read"
        ]
        assert [(e.subject, e.case_id, e.role) for e in entries] == [
            (f"tr-{ADDRESSED}", case_id, "traeger")
        ]
