"""Referrals through the real broker: the full lifecycle with the example partner client,
answers that are not allowed (dead-lettered, nothing changed), duplicate answers, consent
withdrawal and erasure, visit wishes waiting for consent, and escalation timing."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from lotse_contracts import topics
from lotse_contracts.city import load_city
from lotse_contracts.cloudevents import from_kafka, to_kafka_binary
from lotse_contracts.events.common import ConsentState, Role
from lotse_contracts.events.intake import (
    CasesMerged,
    ErasureReason,
    FamilyErased,
    HandoverRequested,
)
from lotse_contracts.events.partner import PartnerAnswer, PartnerReferralAnswer
from lotse_contracts.events.referrals import ReferralRequested
from lotse_contracts.events.visits import VisitCompleted
from lotse_contracts.personal import BlockUnreadable, open_block, open_jwe
from lotse_contracts.subscriptions import load_registry
from lotse_referrals.keyring import DisclosureFor
from lotse_referrals.operations import escalate_overdue
from lotse_runtime.consumer import DLQ_REASON
from sqlalchemy import text

from examples.partner_client import PartnerClient, build_answer
from tests.conftest import Broker
from tests.referrals.helpers import (
    BEZIRKSTEAM,
    CONTACT_VALUES,
    FAMILIENBUERO,
    KOORDINATION,
    MODULE,
    NEVER_DISCLOSED,
    TRAEGER,
    Family,
    Service,
    running,
    traeger_caller,
)
from tests.support import Record, read_topic

pytestmark = pytest.mark.integration

CONSENTED = {"family_name", "parent_given_names", "phone", "email"}


def sqlite(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'referrals.db'}"


def read(
    service: Service, topic: str, count: int, settle_s: float = 0.0, timeout_s: float = 30.0
) -> list[Record]:
    return asyncio.run(
        read_topic(
            service.bootstrap, service.prefix + topic, count, timeout_s=timeout_s, settle_s=settle_s
        )
    )


def types_of(records: list[Record]) -> list[str]:
    return [str(r.header("ce_type")).split(".")[-2] for r in records]


def handover(family: Family, **changes: Any) -> HandoverRequested:
    values: dict[str, Any] = {
        "handover_id": str(uuid.uuid4()),
        "case_id": family.case_id,
        "bezirk": family.bezirk,
        "module": MODULE,
        "consent_ref": family.consent_id,
        "requested_by_role": Role.BABYLOTSE,
        "requested_at": datetime.now(UTC),
    }
    values.update(changes)
    return HandoverRequested(**values)


def referral_of(service: Service, family: Family, what: str = "referral") -> Any:
    rows = service.wait(lambda: service.referrals(family.case_id), what=what)
    return rows[0]


def status_of(service: Service, referral_id: str) -> str:
    body = service.client.get(f"/referrals/{referral_id}", headers=BEZIRKSTEAM).json()
    return str(body["status"])


def create(service: Service, family: Family, **body: Any) -> dict[str, Any]:
    payload = {"case_id": family.case_id, "module": MODULE, "consent_ref": family.consent_id}
    payload.update(body)
    response = service.client.post("/referrals", json=payload, headers=FAMILIENBUERO)
    assert response.status_code == 201, response.text
    result: dict[str, Any] = response.json()
    return result


def wait_registered(service: Service, family: Family) -> None:
    service.wait(
        lambda: (
            service.client.get(
                f"/cases/{family.case_id}/referrals", headers=FAMILIENBUERO
            ).status_code
            == 200
        ),
        what="family registered",
    )


def test_full_lifecycle_through_the_broker_with_the_example_partner_client(
    broker: Broker, database_url: str, topic_prefix: str
) -> None:
    with running(broker.bootstrap, database_url, topic_prefix) as service:
        service.clock.set(datetime.now(UTC))  # the partner client stamps real time
        family = Family(traeger=TRAEGER, purpose=MODULE)
        service.register(family)
        # The Babylotse chose no Träger: the consent names the Hebammenzentrum.
        service.send(handover(family))
        referral = referral_of(service, family)
        assert referral.traeger == TRAEGER
        assert referral.origin == "handover"

        async def fetch_key(requested: ReferralRequested) -> bytes | None:
            response = await asyncio.to_thread(
                service.client.get,
                f"/referrals/{requested.referral_id}/disclosure-key",
                headers=traeger_caller(),
            )
            assert response.status_code == 200, response.text
            text = response.json()["key"]
            return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))

        partner = PartnerClient(
            bootstrap=service.bootstrap,
            traeger=TRAEGER,
            topic_prefix=service.prefix,
            key_fetcher=fetch_key,
            kafka_options={"session_timeout_ms": 2000, "heartbeat_interval_ms": 300},
        )
        summary = asyncio.run(partner.run(max_referrals=1, idle_timeout_s=30))
        assert summary.answered == {
            referral.referral_id: [
                "received",
                "accepted",
                "first-contact",
                "in-progress",
                "completed",
            ]
        }
        assert set(summary.disclosed_fields[referral.referral_id]) == CONSENTED

        service.wait(
            lambda: status_of(service, referral.referral_id) == "completed", what="completed"
        )
        done = service.client.get(
            f"/referrals/{referral.referral_id}", headers=FAMILIENBUERO
        ).json()
        assert done["warm_handover"] is True
        assert done["days_to_first_contact"] == 0
        assert done["hours_to_warm_handover"] is not None
        assert done["hours_to_warm_handover"] >= 0
        assert [s["actor_role"] for s in done["steps"]][1:] == ["traeger"] * 5

        domain = read(service, topics.REFERRALS, 6)
        assert types_of(domain) == [
            "referral-requested",
            "referral-received",
            "referral-accepted",
            "referral-first-contact",
            "referral-in-progress",
            "referral-completed",
        ]
        assert {r.key for r in domain} == {family.case_id.encode()}

        # The Träger's feed: only what the registry and the family's consent allow.
        registry = load_registry(load_city("dortmund"))
        feed = read(service, topics.partner_referrals(TRAEGER), 1, settle_s=1.0)
        assert types_of(feed) == ["referral-requested"]
        for record in feed:
            raw = (record.value or b"").decode()
            assert not any(v in raw for v in CONTACT_VALUES + NEVER_DISCLOSED)
            event = from_kafka(record.value, record.headers)
            allowed = registry.fields_for("traeger", event.type)
            assert allowed is not None
            assert set(event.data) <= set(allowed)
            requested = ReferralRequested.model_validate(event.data)
            assert set(requested.disclosed_fields) == CONSENTED
            assert "handover_id" not in event.data
            assert requested.disclosure is not None
            # Sealed under this referral's disclosure key, not under the family's secret.
            with pytest.raises(BlockUnreadable):
                open_block(requested.disclosure, key=family.key, case_id=family.case_id)
            key = family.disclosure_key(requested.referral_id)
            opened = open_block(requested.disclosure, key=key, case_id=family.case_id)
            assert set(opened) == CONSENTED
            assert requested.disclosure_jwe is not None
            assert open_jwe(requested.disclosure_jwe, key=key) == opened
            assert opened["phone"] == CONTACT_VALUES[2]
        # Another Träger's feed gets nothing; the Bezirksteam's copies carry no personal data.
        rows = service.outbox_rows()
        assert {r.topic for r in rows} == {
            service.prefix + t
            for t in (
                topics.REFERRALS,
                topics.partner_referrals(TRAEGER),
                topics.bezirk_feed("hoerde"),
            )
        }
        for row in rows:
            if row.topic.endswith("bezirk.hoerde"):
                data = json.loads(row.value or b"{}")
                assert "disclosure" not in data
                assert "consent_ref" not in data


def answer_record(referral: Any, answer: PartnerAnswer, **changes: Any) -> Any:
    values: dict[str, Any] = {
        "referral_id": referral["referral_id"],
        "case_id": referral["case_id"],
        "traeger": referral["traeger"],
        "answer": answer,
        "occurred_at": datetime.now(UTC),
    }
    values.update(changes)
    source = values.pop("source", None)
    model = PartnerReferralAnswer(**values)
    return to_kafka_binary(model.to_cloudevent(source=source))


def test_answers_that_are_not_allowed_are_dead_lettered_and_duplicates_count_once(
    broker: Broker, tmp_path: Path, topic_prefix: str
) -> None:
    with running(broker.bootstrap, sqlite(tmp_path), topic_prefix) as service:
        service.clock.set(datetime.now(UTC))
        family = Family()
        service.register(family)
        wait_registered(service, family)
        referral = create(service, family)
        ours = topics.partner_responses(TRAEGER)
        other = "elternberatung-unterwegs"
        theirs = topics.partner_responses(other)

        # Another Träger answers (on its own topic) a referral not addressed to it.
        service.send_raw(theirs, answer_record(referral, PartnerAnswer.ACCEPTED, traeger=other))
        # Someone writes an answer in the Hebammenzentrum's name on another Träger's topic.
        service.send_raw(theirs, answer_record(referral, PartnerAnswer.ACCEPTED))
        # The right Träger, but with a source that is not its own.
        service.send_raw(
            ours, answer_record(referral, PartnerAnswer.ACCEPTED, source=f"/partner/{other}")
        )
        # Out of order: completed straight from requested.
        service.send_raw(ours, answer_record(referral, PartnerAnswer.COMPLETED))
        # Unknown referral, and an answer dated tomorrow.
        service.send_raw(
            ours, answer_record(referral, PartnerAnswer.RECEIVED, referral_id=str(uuid.uuid4()))
        )
        service.send_raw(
            ours,
            answer_record(
                referral, PartnerAnswer.RECEIVED, occurred_at=datetime.now(UTC) + timedelta(days=1)
            ),
        )
        # A schema violation (rejected without a reason) and a record that is no CloudEvent.
        broken = answer_record(referral, PartnerAnswer.ACCEPTED)
        value = json.loads(broken.value)
        value["answer"] = "rejected"
        service.send_raw(ours, broken._replace(value=json.dumps(value).encode()))
        service.send_raw(ours, broken._replace(value=b"{not json", headers=[]))
        dead = read(service, topics.dead_letter("referrals"), 8)
        reasons = [str(r.header(DLQ_REASON)) for r in dead]
        assert len(reasons) == 8, reasons
        assert any("reason is required for answer 'rejected'" in r for r in reasons)
        assert any("not a CloudEvent" in r for r in reasons)
        assert any("is not addressed to Träger elternberatung-unterwegs" in r for r in reasons)
        assert any("not on its own topic" in r for r in reasons)
        assert any("does not match Träger" in r for r in reasons)
        assert any("completed is only possible from in-progress" in r for r in reasons)
        assert any("no referral" in r for r in reasons)
        assert any("in the future" in r for r in reasons)
        assert status_of(service, referral["referral_id"]) == "requested"

        # The service goes on: a valid answer, delivered twice (same event id), counts once.
        record = build_answer(
            ReferralRequested.model_validate(
                {
                    **referral,
                    "occurred_at": referral["requested_at"],
                    "requested_by_role": "familienbuero",
                    "disclosed_fields": [],
                    "disclosure": None,
                }
            ),
            PartnerAnswer.ACCEPTED,
        )
        consumer = service.consumer("main")
        seen_before = consumer.duplicates
        service.send_raw(ours, record)
        service.send_raw(ours, record)
        service.wait(lambda: consumer.duplicates > seen_before, what="duplicate seen")
        assert status_of(service, referral["referral_id"]) == "accepted"
        domain = read(service, topics.REFERRALS, 2, settle_s=1.0)
        assert types_of(domain).count("referral-accepted") == 1
        detail = service.client.get(
            f"/referrals/{referral['referral_id']}", headers=FAMILIENBUERO
        ).json()
        assert [s["step"] for s in detail["steps"]] == ["requested", "accepted"]
        # A second, different "accepted" is a step the lifecycle does not allow.
        service.send_raw(ours, answer_record(referral, PartnerAnswer.ACCEPTED))
        more = read(service, topics.dead_letter("referrals"), 9)
        assert "the referral is accepted" in str(more[-1].header(DLQ_REASON))


def test_withdrawn_consent_and_erasure_cancel_open_referrals_and_tell_the_traeger(
    broker: Broker, tmp_path: Path, topic_prefix: str
) -> None:
    with running(broker.bootstrap, sqlite(tmp_path), topic_prefix) as service:
        withdrawing, erased, untouched = Family(), Family(), Family()
        for family in (withdrawing, erased, untouched):
            service.register(family)
            wait_registered(service, family)
        first = create(service, withdrawing)
        second = create(service, erased)
        third = create(service, untouched)
        service.client.post(
            f"/referrals/{second['referral_id']}/steps",
            json={"step": "accepted"},
            headers=traeger_caller(),
        )

        service.send(withdrawing.consent_changed(ConsentState.WITHDRAWN, datetime.now(UTC)))
        service.send(
            FamilyErased(
                case_id=erased.case_id,
                bezirk="hoerde",
                erased_at=datetime.now(UTC),
                key_id=erased.kid,
                reason=ErasureReason.REQUEST,
            )
        )
        service.wait(
            lambda: (
                status_of(service, first["referral_id"]) == "cancelled"
                and status_of(service, second["referral_id"]) == "cancelled"
            ),
            what="both cancelled",
        )
        one = service.client.get(f"/referrals/{first['referral_id']}", headers=BEZIRKSTEAM).json()
        assert (one["cancel_reason"], one["cancelled_by_role"]) == ("consent_withdrawn", "system")
        two = service.client.get(f"/referrals/{second['referral_id']}", headers=BEZIRKSTEAM).json()
        assert two["cancel_reason"] == "case_erased"
        assert status_of(service, third["referral_id"]) == "requested"
        # The cancelled referral's key is no longer released to the Träger.
        key = service.client.get(
            f"/referrals/{second['referral_id']}/disclosure-key", headers=traeger_caller()
        )
        assert key.status_code == 409
        # Once intake has destroyed a family's key, no key is released for its referral.
        untouched_key = service.client.get(
            f"/referrals/{third['referral_id']}/disclosure-key", headers=traeger_caller()
        )
        assert untouched_key.status_code == 200
        del service.keyring.families[untouched.case_id]
        gone = service.client.get(
            f"/referrals/{third['referral_id']}/disclosure-key", headers=traeger_caller()
        )
        assert gone.status_code == 410
        # A new referral of the erased family is refused.
        again = service.client.post(
            "/referrals",
            json={"case_id": erased.case_id, "module": MODULE, "consent_ref": erased.consent_id},
            headers=FAMILIENBUERO,
        )
        assert again.status_code == 409
        assert "erased" in again.json()["detail"]

        feed = read(service, topics.partner_referrals(TRAEGER), 5)
        cancelled = [
            json.loads(r.value or b"{}") for r in feed if types_of([r]) == ["referral-cancelled"]
        ]
        assert {(c["referral_id"], c["reason"]) for c in cancelled} == {
            (first["referral_id"], "consent_withdrawn"),
            (second["referral_id"], "case_erased"),
        }


def test_a_merge_moves_unanswered_referrals_to_the_survivor_once(
    broker: Broker, tmp_path: Path, topic_prefix: str
) -> None:
    with running(broker.bootstrap, sqlite(tmp_path), topic_prefix) as service:
        survivor, duplicate = Family(), Family()
        for family in (survivor, duplicate):
            service.register(family)
            wait_registered(service, family)
        asked = handover(duplicate)
        service.send(asked)
        before = referral_of(service, duplicate, "the duplicate's referral")
        assert before.handover_id == asked.handover_id

        merge = CasesMerged(
            merged_case_id=duplicate.case_id,
            surviving_case_id=survivor.case_id,
            bezirk=survivor.bezirk,
            merged_bezirk=duplicate.bezirk,
            merged_at=datetime.now(UTC),
            merged_by_role=Role.FAMILIENBUERO,
        )
        event_id = str(uuid.uuid4())
        service.send(merge, event_id=event_id)
        service.send(merge, event_id=event_id)  # redelivered: no second effect
        moved = referral_of(service, survivor, "the survivor's referral")
        assert status_of(service, before.referral_id) == "cancelled"
        gone = service.client.get(f"/referrals/{before.referral_id}", headers=BEZIRKSTEAM).json()
        assert (gone["cancel_reason"], gone["cancelled_by_role"]) == ("duplicate", "system")
        assert (moved.module, moved.handover_id, moved.status) == (
            MODULE,
            asked.handover_id,
            "requested",
        )
        assert len(service.referrals(survivor.case_id)) == 1
        assert [w.case_id for w in service.wishes(survivor.case_id)] == [survivor.case_id]
        assert service.wishes(duplicate.case_id) == []

        # A second duplicate of the same family: the survivor has the module already.
        third = Family()
        service.register(third)
        wait_registered(service, third)
        service.send(handover(third))
        referral_of(service, third, "the third case's referral")
        service.send(
            merge.model_copy(update={"merged_case_id": third.case_id}), event_id=str(uuid.uuid4())
        )
        service.wait(
            lambda: [w.state for w in service.wishes(third.case_id)] == ["dropped"],
            what="wish dropped",
        )
        assert len(service.referrals(survivor.case_id)) == 1
        feed = read(service, topics.partner_referrals(TRAEGER), 6)
        cancelled = [
            json.loads(r.value or b"{}") for r in feed if types_of([r]) == ["referral-cancelled"]
        ]
        assert {c["reason"] for c in cancelled} == {"duplicate"}
        assert len(cancelled) == 2


def test_a_visit_wish_waits_for_consent_then_becomes_a_referral(
    broker: Broker, tmp_path: Path, topic_prefix: str
) -> None:
    with running(broker.bootstrap, sqlite(tmp_path), topic_prefix) as service:
        family = Family()
        service.register(family, with_traeger_consent=False)
        wait_registered(service, family)
        visit = VisitCompleted(
            visit_id=str(uuid.uuid4()),
            case_id=family.case_id,
            bezirk="hoerde",
            familienbuero="familienbuero-hoerde",
            scheduled_for=datetime.now(UTC),
            completed_at=datetime.now(UTC),
            informed_about_offers=True,
            needs_noted=True,
            referral_wished_module=MODULE,
            days_since_reference=10,
        )
        service.send(visit)
        wish = service.wait(lambda: service.wishes(family.case_id), what="wish")[0]
        assert wish.state == "open"
        assert wish.problem.startswith("consent_ref: no consent")
        listed = service.client.get("/bezirke/hoerde/wishes", headers=BEZIRKSTEAM).json()
        assert [w["source_id"] for w in listed] == [visit.visit_id]

        # A handover naming an unknown module is invalid: dead-lettered, nothing stored.
        service.send(handover(family, module="yoga-fuer-babys"))
        dead = read(service, topics.dead_letter("referrals"), 1)
        assert "yoga-fuer-babys" in str(dead[0].header(DLQ_REASON))

        # The family consents at the Familienbüro: the waiting wish becomes a referral.
        service.send(family.consent_changed(ConsentState.GIVEN, datetime.now(UTC)))
        referral = referral_of(service, family, "referral from the visit")
        assert (referral.origin, referral.visit_id, referral.traeger) == (
            "visit",
            visit.visit_id,
            TRAEGER,
        )
        assert referral.requested_by_role == "familienbuero"
        placed = service.wait(
            lambda: [w for w in service.wishes(family.case_id) if w.state == "placed"],
            what="wish placed",
        )
        assert placed[0].referral_id == referral.referral_id

        # A handover to a Träger without free places waits, and is placed once there are.
        waiting = Family(traeger="elternberatung-unterwegs", purpose="aufsuchende-elternberatung")
        service.register(waiting)
        wait_registered(service, waiting)
        service.client.patch(
            "/catalogue/traeger/elternberatung-unterwegs",
            json={"capacity_per_month": 0},
            headers=KOORDINATION,
        )
        service.send(
            handover(
                waiting, module="aufsuchende-elternberatung", traeger="elternberatung-unterwegs"
            )
        )
        stuck = service.wait(lambda: service.wishes(waiting.case_id), what="handover wish")[0]
        assert stuck.problem is not None
        assert "no free capacity" in stuck.problem
        service.run_job("placement")
        assert service.referrals(waiting.case_id) == []
        service.client.patch(
            "/catalogue/traeger/elternberatung-unterwegs",
            json={"capacity_per_month": 45},
            headers=KOORDINATION,
        )
        service.run_job("placement")
        [late] = service.referrals(waiting.case_id)
        assert (late.origin, late.handover_id) == ("handover", stuck.source_id)
        assert service.client.get("/bezirke/hoerde/wishes", headers=BEZIRKSTEAM).json() == []


def test_escalation_once_after_n_working_days_with_nrw_holidays(
    broker: Broker, database_url: str, topic_prefix: str
) -> None:
    with running(broker.bootstrap, database_url, topic_prefix) as service:
        # Thursday 17 April 2025 (Maundy Thursday), 10:00 in Dortmund.
        normal, urgent, answered = Family(), Family(), Family()
        for family in (normal, urgent, answered):
            service.register(family)
            wait_registered(service, family)
        slow = create(service, normal)
        quick = create(service, urgent, urgent=True)
        fine = create(service, answered)
        assert (slow["answer_due_by"], quick["answer_due_by"]) == ("2025-04-24", "2025-04-22")
        service.client.post(
            f"/referrals/{fine['referral_id']}/steps",
            json={"step": "accepted"},
            headers=traeger_caller(),
        )
        service.client.post(
            f"/referrals/{slow['referral_id']}/steps",
            json={"step": "received"},
            headers=traeger_caller(),
        )

        def escalated() -> dict[str, Any]:
            rows = service.client.get("/bezirke/hoerde/escalations", headers=BEZIRKSTEAM).json()
            return {r["referral_id"]: r for r in rows}

        # Tuesday 22 April, 23:30 in Dortmund: the urgent one's last day is not over yet.
        service.clock.set(datetime(2025, 4, 22, 21, 30, tzinfo=UTC))
        service.run_job("escalation")
        assert escalated() == {}
        # Wednesday 23 April, 00:30: the urgent one escalates (Tuesday went by unanswered).
        service.clock.set(datetime(2025, 4, 22, 22, 30, tzinfo=UTC))
        service.run_job("escalation")
        assert set(escalated()) == {quick["referral_id"]}
        # Thursday 24 April late: the normal one still has its last day.
        service.clock.set(datetime(2025, 4, 24, 21, 0, tzinfo=UTC))
        service.run_job("escalation")
        assert set(escalated()) == {quick["referral_id"]}
        # Friday 25 April: escalated, stuck in "received", after Tue, Wed and Thu.
        service.clock.set(datetime(2025, 4, 25, 5, 0, tzinfo=UTC))

        async def two_replicas_at_once() -> list[list[str]]:
            now = service.clock()
            return list(
                await asyncio.gather(
                    escalate_overdue(service.ctx, now), escalate_overdue(service.ctx, now)
                )
            )

        runs = service.client.portal.call(two_replicas_at_once)  # type: ignore[union-attr]
        assert sorted(runs[0] + runs[1]) == [slow["referral_id"]]  # claimed exactly once
        service.run_job("escalation")
        now = escalated()
        assert set(now) == {quick["referral_id"], slow["referral_id"]}
        assert now[slow["referral_id"]]["working_days_at_escalation"] == 3
        assert now[quick["referral_id"]]["working_days_at_escalation"] == 1

        feed = read(service, topics.bezirk_feed("hoerde"), 7, settle_s=0.5)
        events = [
            json.loads(r.value or b"{}") for r in feed if types_of([r]) == ["referral-escalated"]
        ]
        assert sorted((e["referral_id"], e["last_status"]) for e in events) == sorted(
            [(quick["referral_id"], "requested"), (slow["referral_id"], "received")]
        )
        assert all(e["escalated_to"] == "bezirksteam" for e in events)
        assert date.fromisoformat(slow["answer_due_by"]).weekday() == 3


def test_releasing_a_key_holds_no_database_lock_while_the_keyring_answers(
    broker: Broker, sqlite_url: str, topic_prefix: str
) -> None:
    """The keyring is another service and may be slow. On SQLite every transaction holds the
    write lock, so a release that asked the keyring inside its transaction would stall every
    consumer and request of the service meanwhile (seen in the pipeline benchmark)."""
    with running(broker.bootstrap, sqlite_url, topic_prefix) as service:
        family = Family(traeger=TRAEGER, purpose=MODULE)
        service.register(family)
        wait_registered(service, family)
        referral = create(service, family)
        runtime = service.client.app.state.runtime  # type: ignore[attr-defined]
        static = service.keyring.disclosure_key
        writes: list[str] = []

        async def slow_keyring(which: DisclosureFor) -> tuple[str, bytes]:
            # Someone else writes while the keyring is being asked.
            async with asyncio.timeout(2), runtime.db.transaction() as session:
                await session.execute(text("UPDATE referrals_referral SET urgent = urgent"))
            writes.append(which.case_id)
            return await static(which)

        service.keyring.disclosure_key = slow_keyring  # type: ignore[method-assign]
        key = service.client.get(
            f"/referrals/{referral['referral_id']}/disclosure-key", headers=traeger_caller()
        )
        assert key.status_code == 200, key.text
        assert writes == [family.case_id]
