"""The HTTP API: catalogue, creating referrals behind the gates (every bad input refused
with field and reason, nothing stored), lifecycle steps with actor rules, who sees what."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from lotse_contracts.personal import EncryptedBlock, open_block
from lotse_runtime.outbox import OutboxMessage
from sqlalchemy import func, select

from tests.conftest import Broker
from tests.referrals.helpers import (
    BABYLOTSE,
    BEZIRKSTEAM,
    CONTACT_VALUES,
    FAMILIENBUERO,
    FAMILIENBUERO_EVING,
    KOORDINATION,
    MODULE,
    NEVER_DISCLOSED,
    TRAEGER,
    Family,
    Service,
    running,
    traeger_caller,
)
from tests.support import bearer

pytestmark = pytest.mark.integration


def sqlite(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'referrals.db'}"


def outbox_types(service: Service) -> list[str]:
    async def load() -> list[str]:
        async with service.runtime.db.transaction() as session:
            rows = (await session.execute(select(OutboxMessage.event_type))).scalars()  # type: ignore[call-overload]
            return list(rows)

    types: list[str] = service.client.portal.call(load)  # type: ignore[union-attr]
    return types


def referral_count(service: Service) -> int:
    from lotse_referrals.tables import Referral

    async def load() -> int:
        async with service.runtime.db.transaction() as session:
            return int(await session.scalar(select(func.count()).select_from(Referral)) or 0)

    count: int = service.client.portal.call(load)  # type: ignore[union-attr]
    return count


def registered_family(service: Service, **kwargs: Any) -> Family:
    family = Family(**kwargs)
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
    return family


def test_catalogue_from_configuration_editable_and_kept(
    broker: Broker, tmp_path: Path, topic_prefix: str
) -> None:
    with running(broker.bootstrap, sqlite(tmp_path), topic_prefix, ready=False) as service:
        client = service.client
        all_traeger = client.get("/catalogue/traeger", headers=FAMILIENBUERO).json()
        assert {t["slug"] for t in all_traeger} == set(service.runtime.city.traeger_slugs)
        hebammen = client.get(f"/catalogue/traeger/{TRAEGER}", headers=FAMILIENBUERO).json()
        assert hebammen["modules"] == [MODULE]
        assert hebammen["bezirke"] == ["*"]
        assert hebammen["free_capacity"] == hebammen["capacity_per_month"] == 30
        assert hebammen["contact"].endswith(".example")

        modules = client.get("/catalogue/modules", headers=BABYLOTSE).json()
        assert "elternschule" in {m["slug"] for m in modules}

        # Elternschule in Hörde: only the Familienbildungsstätte Süd-Ost serves it.
        offered = client.get(
            "/catalogue/traeger",
            params={"module": "elternschule", "bezirk": "hoerde"},
            headers=FAMILIENBUERO,
        ).json()
        assert [t["slug"] for t in offered] == ["familienbildung-sued-ost"]

        # A Träger changes its own capacity; city-wide coordination extends an offer, which
        # a Bezirksteam may not (a Träger's entry holds for every Bezirk).
        own = client.patch(
            "/catalogue/traeger/familienforum-west",
            json={"capacity_per_month": 99},
            headers=traeger_caller("familienforum-west"),
        )
        assert own.status_code == 200
        assert own.json()["capacity_per_month"] == 99
        foreign = client.patch(
            "/catalogue/traeger/familienbildung-sued-ost",
            json={"capacity_per_month": 0},
            headers=traeger_caller("familienforum-west"),
        )
        assert foreign.status_code == 403
        by_bezirksteam = client.patch(
            "/catalogue/traeger/familienforum-west",
            json={"bezirke": ["innenstadt-west", "luetgendortmund", "hoerde"]},
            headers=BEZIRKSTEAM,
        )
        assert by_bezirksteam.status_code == 403
        widened = client.patch(
            "/catalogue/traeger/familienforum-west",
            json={"bezirke": ["innenstadt-west", "luetgendortmund", "hoerde"]},
            headers=KOORDINATION,
        )
        assert widened.status_code == 200
        by_familienbuero = client.patch(
            "/catalogue/traeger/familienforum-west", json={"active": False}, headers=FAMILIENBUERO
        )
        assert by_familienbuero.status_code == 403

        bad = client.patch(
            "/catalogue/traeger/familienforum-west",
            json={"modules": ["yoga"], "capacity_per_month": -1},
            headers=KOORDINATION,
        )
        assert bad.status_code == 422
        assert {e["field"] for e in bad.json()["errors"]} == {"capacity_per_month"}
        bad_module = client.patch(
            "/catalogue/traeger/familienforum-west",
            json={"modules": ["yoga"]},
            headers=KOORDINATION,
        )
        assert bad_module.status_code == 422
        assert bad_module.json()["errors"] == [
            {"field": "modules", "reason": "unknown module(s) yoga"}
        ]
        assert (
            client.patch(
                "/catalogue/traeger/nobody", json={"active": False}, headers=KOORDINATION
            ).status_code
            == 404
        )

        # Suggestions: free capacity first.
        suggestions = client.get(
            "/catalogue/suggestions",
            params={"bezirk": "hoerde", "module": "elternschule"},
            headers=FAMILIENBUERO,
        ).json()
        assert [s["slug"] for s in suggestions] == [
            "familienforum-west",
            "familienbildung-sued-ost",
        ]
        unknown = client.get(
            "/catalogue/suggestions",
            params={"bezirk": "atlantis", "module": "elternschule"},
            headers=FAMILIENBUERO,
        )
        assert unknown.status_code == 422
        assert unknown.json()["errors"][0]["field"] == "bezirk"

    # Restarted: the edited entry keeps its edits, the others follow the configuration.
    with running(broker.bootstrap, sqlite(tmp_path), topic_prefix, ready=False) as service:
        kept = service.client.get(
            "/catalogue/traeger/familienforum-west", headers=FAMILIENBUERO
        ).json()
        assert kept["capacity_per_month"] == 99
        assert kept["edited"] is True
        assert "hoerde" in kept["bezirke"]


def create(
    service: Service, family: Family, headers: dict[str, str] | None = None, **body: Any
) -> Any:
    payload: dict[str, Any] = {
        "case_id": family.case_id,
        "module": MODULE,
        "traeger": TRAEGER,
        "consent_ref": family.consent_id,
    }
    payload.update(body)
    payload = {k: v for k, v in payload.items() if v is not None}
    return service.client.post("/referrals", json=payload, headers=headers or FAMILIENBUERO)


def test_bad_referral_requests_are_refused_with_field_and_reason_and_store_nothing(
    broker: Broker, tmp_path: Path, topic_prefix: str
) -> None:
    with running(broker.bootstrap, sqlite(tmp_path), topic_prefix) as service:
        family = registered_family(service)
        other = registered_family(service, traeger="elternberatung-unterwegs", purpose=None)

        def refused(response: Any, status: int, field: str, reason: str) -> None:
            assert response.status_code == status, response.text
            errors = response.json()["errors"]
            assert errors[0]["field"] == field, errors
            assert reason in errors[0]["reason"], errors

        refused(
            create(service, family, traeger="nobody-ev"), 422, "traeger", "unknown Träger nobody-ev"
        )
        refused(create(service, family, module="yoga"), 422, "module", "unknown module yoga")
        refused(
            create(service, family, traeger="elternberatung-unterwegs"),
            422,
            "traeger",
            "does not offer familienhebamme",
        )
        # The Familienbildungswerk Nord offers the Elternschule, but not in Hörde.
        refused(
            create(service, family, traeger="familienbildungswerk-nord", module="elternschule"),
            422,
            "traeger",
            "not offer elternschule in Stadtbezirk hoerde",
        )
        refused(
            create(service, family, consent_ref=str(uuid.uuid4())),
            409,
            "consent_ref",
            "no consent with this id",
        )
        refused(
            create(service, family, consent_ref=other.consent_id),
            409,
            "consent_ref",
            "another case",
        )
        # This family consented to the outreach counselling only, not to the Hebammenzentrum.
        refused(
            create(service, other, consent_ref=other.consent_id),
            409,
            "consent_ref",
            "covers Träger elternberatung-unterwegs, not hebammenzentrum",
        )
        refused(
            create(service, family, disclose=["child_birth_dates"]),
            422,
            "disclose",
            "does not cover child_birth_dates",
        )
        missing = create(service, family, consent_ref=None)
        assert missing.status_code == 422
        assert missing.json()["errors"][0]["field"] == "consent_ref"

        # Wrong callers: a Träger cannot refer, another Bezirk's office sees nothing.
        assert create(service, family, headers=traeger_caller()).status_code == 403
        assert create(service, family, headers=FAMILIENBUERO_EVING).status_code == 403
        assert create(service, family, case_id=str(uuid.uuid4())).status_code == 403

        # No capacity left this month.
        service.client.patch(
            f"/catalogue/traeger/{TRAEGER}", json={"capacity_per_month": 0}, headers=KOORDINATION
        )
        refused(create(service, family), 409, "traeger", "no free capacity this month")
        assert referral_count(service) == 0
        assert not [t for t in outbox_types(service) if "referral" in t]

        # With capacity back, the same request succeeds (once).
        service.client.patch(
            f"/catalogue/traeger/{TRAEGER}", json={"capacity_per_month": 1}, headers=KOORDINATION
        )
        made = create(service, family, headers=BABYLOTSE)
        assert made.status_code == 201, made.text
        body = made.json()
        assert body["status"] == "requested"
        assert body["requested_by_role"] == "babylotse"
        assert body["answer_due_by"] == "2025-04-24"  # 3 working days over Easter
        assert body["disclosed_fields"] == ["family_name", "parent_given_names", "phone", "email"]
        refused(create(service, family), 409, "module", "is still open")
        taken = service.client.get(f"/catalogue/traeger/{TRAEGER}", headers=FAMILIENBUERO).json()
        assert taken["free_capacity"] == 0
        assert referral_count(service) == 1

        # What the Träger will receive: the consented contact fields, sealed with the key of this
        # referral's disclosure.
        async def requested_rows() -> list[OutboxMessage]:
            async with service.runtime.db.transaction() as session:
                query = select(OutboxMessage).where(
                    OutboxMessage.event_type == "de.lotse.referrals.referral-requested.v1"  # type: ignore[arg-type]
                )
                return list((await session.execute(query)).scalars())

        rows = service.client.portal.call(requested_rows)  # type: ignore[union-attr]
        partner = next(r for r in rows if r.topic.endswith(f"partner.{TRAEGER}.referrals"))
        data = json.loads(partner.value or b"{}")
        opened = open_block(
            EncryptedBlock.model_validate(data["disclosure"]),
            key=family.disclosure_key(body["referral_id"]),
            case_id=family.case_id,
        )
        assert set(opened) == {"family_name", "parent_given_names", "phone", "email"}
        for row in rows:
            raw = (row.value or b"").decode()
            assert not any(v in raw for v in CONTACT_VALUES + NEVER_DISCLOSED)
        bezirk_copy = next(r for r in rows if r.topic.endswith("bezirk.hoerde"))
        assert "disclosure" not in json.loads(bezirk_copy.value or b"{}")

        # Staff may narrow the disclosure further; the creation is in the audit trail.
        narrow_family = registered_family(service)
        service.client.patch(
            f"/catalogue/traeger/{TRAEGER}", json={"capacity_per_month": 5}, headers=KOORDINATION
        )
        narrow = create(service, narrow_family, disclose=["phone", "email"])
        assert narrow.status_code == 201, narrow.text
        assert narrow.json()["disclosed_fields"] == ["phone", "email"]
        rows = service.client.portal.call(requested_rows)  # type: ignore[union-attr]
        narrow_row = next(
            r
            for r in rows
            if r.topic.endswith(f"partner.{TRAEGER}.referrals")
            and narrow_family.case_id.encode() == (r.record_key or "").encode()
        )
        sealed = EncryptedBlock.model_validate(json.loads(narrow_row.value or b"{}")["disclosure"])
        opened = open_block(
            sealed,
            key=narrow_family.disclosure_key(narrow.json()["referral_id"]),
            case_id=narrow_family.case_id,
        )
        assert set(opened) == {"phone", "email"}
        trail = service.client.get(
            "/audit",
            params={"case_id": narrow_family.case_id},
            headers=bearer("dpo", subject="dsb-1"),
        ).json()
        created = [e for e in trail if e["action"] == "create"]
        assert created[0]["purpose"] == (
            f"referral to {TRAEGER} for {MODULE}, disclosing phone, email"
        )
        assert created[0]["role"] == "familienbuero"


def test_steps_over_http_follow_the_actor_rules(
    broker: Broker, tmp_path: Path, topic_prefix: str
) -> None:
    with running(broker.bootstrap, sqlite(tmp_path), topic_prefix) as service:
        client = service.client
        family = registered_family(service)
        referral = create(service, family).json()
        rid = referral["referral_id"]
        steps = f"/referrals/{rid}/steps"
        hebammen = traeger_caller()
        stranger = traeger_caller("elternberatung-unterwegs")

        def refused(response: Any, reason: str) -> None:
            assert response.status_code == 409, response.text
            assert response.json()["errors"][0]["field"] == "step"
            assert reason in response.json()["detail"]

        refused(
            client.post(steps, json={"step": "accepted"}, headers=FAMILIENBUERO),
            "only the addressed Träger",
        )
        refused(
            client.post(
                steps, json={"step": "cancelled", "cancel_reason": "other"}, headers=hebammen
            ),
            "only the requesting side may cancel",
        )
        refused(
            client.post(steps, json={"step": "completed"}, headers=hebammen),
            "completed is only possible from in-progress",
        )
        refused(
            client.post(steps, json={"step": "first-contact"}, headers=hebammen),
            "only possible from accepted or in-progress",
        )
        rejected = client.post(steps, json={"step": "rejected"}, headers=hebammen)
        assert rejected.status_code == 422
        assert rejected.json()["errors"][0]["field"] == "rejection_reason"
        erased = client.post(
            steps, json={"step": "cancelled", "cancel_reason": "case_erased"}, headers=FAMILIENBUERO
        )
        assert erased.status_code == 422
        # Another Träger may not even see it.
        assert client.post(steps, json={"step": "accepted"}, headers=stranger).status_code == 403
        assert client.get(f"/referrals/{rid}", headers=stranger).status_code == 403
        assert client.get(f"/referrals/{rid}", headers=FAMILIENBUERO_EVING).status_code == 403

        for step in ("received", "accepted", "first-contact", "in-progress"):
            response = client.post(
                steps,
                json={
                    "step": step,
                    **({"first_contact_planned_for": "2025-04-23"} if step == "accepted" else {}),
                },
                headers=hebammen,
            )
            assert response.status_code == 200, response.text
        refused(
            client.post(steps, json={"step": "first-contact"}, headers=hebammen),
            "already confirmed",
        )
        done = client.post(
            steps, json={"step": "completed", "outcome": "goal_reached"}, headers=hebammen
        ).json()
        assert done["status"] == "completed"
        assert done["warm_handover"] is True
        assert done["days_to_first_contact"] == 0
        assert done["completion_outcome"] == "goal_reached"
        refused(
            client.post(
                steps, json={"step": "cancelled", "cancel_reason": "other"}, headers=FAMILIENBUERO
            ),
            "completed, which is final",
        )

        detail = client.get(f"/referrals/{rid}", headers=BEZIRKSTEAM).json()
        assert [s["step"] for s in detail["steps"]] == [
            "requested",
            "received",
            "accepted",
            "first-contact",
            "in-progress",
            "completed",
        ]
        assert detail["first_contact_planned_for"] == "2025-04-23"

        # Lists: the Bezirk sees it among all, the Träger sees only its own.
        open_now = client.get("/bezirke/hoerde/referrals", headers=BEZIRKSTEAM).json()
        assert open_now == []
        every = client.get("/bezirke/hoerde/referrals?status=all", headers=BEZIRKSTEAM).json()
        assert [r["referral_id"] for r in every] == [rid]
        assert (
            client.get("/bezirke/hoerde/referrals", headers=FAMILIENBUERO_EVING).status_code == 403
        )
        assert (
            client.get("/bezirke/hoerde/referrals?status=lost", headers=BEZIRKSTEAM).status_code
            == 422
        )
        own = client.get(f"/traeger/{TRAEGER}/referrals?status=all", headers=hebammen).json()
        assert [r["referral_id"] for r in own] == [rid]
        assert client.get(f"/traeger/{TRAEGER}/referrals", headers=stranger).status_code == 403
        assert client.get(f"/cases/{family.case_id}/referrals", headers=stranger).status_code == 403
