"""Intake on the real broker and database: what it publishes, and that personal data never
travels or rests in clear — before and after a family's erasure (crypto-shredding)."""

from __future__ import annotations

import base64
import json
import uuid
from typing import Any

import pytest
from lotse_contracts.events.intake import (
    ConsentChanged,
    FamilyErased,
    FamilyRegistered,
    HandoverRequested,
    NeedsAssessed,
)
from lotse_contracts.personal import (
    BlockUnreadable,
    ChildrenData,
    KeyPurpose,
    data_key_for,
    new_data_key,
    open_block,
    open_personal,
)
from sqlalchemy import text

from tests.intake.helpers import (
    BABYLOTSE,
    DPO,
    ERASURE_REQUEST,
    FAMILIENBUERO_HOERDE,
    PLAINTEXTS,
    VISITS_SERVICE,
    Intake,
    erase,
    registration,
)
from tests.support import Record, read_topic

pytestmark = pytest.mark.integration

UUID4 = r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$"


def forms(plain: str) -> list[bytes]:
    """A plaintext as it could appear in bytes: UTF-8, JSON-escaped, case-folded."""
    escaped = json.dumps(plain)[1:-1]
    return sorted(
        {plain.encode(), escaped.encode(), plain.lower().encode(), plain.casefold().encode()}
    )


def assert_no_plaintext(blob: bytes, where: str) -> None:
    for plain in PLAINTEXTS:
        for form in forms(plain):
            assert form not in blob, f"{plain!r} in clear in {where}"


def raw(records: list[Record]) -> bytes:
    return b"\n".join(
        (r.key or b"")
        + (r.value or b"")
        + b"".join(name.encode() + value for name, value in r.headers)
        for r in records
    )


async def events(
    intake: Intake, topic: str, count: int, *, settle_s: float = 0.0, timeout_s: float = 30.0
) -> list[Record]:
    """At least ``count`` distinct events of one of intake's topics (fewer on timeout), each
    once: delivery is at-least-once, so a record may come twice."""
    wanted = count
    while True:
        records = await read_topic(
            intake.bootstrap, intake.topic(topic), wanted, timeout_s=timeout_s, settle_s=settle_s
        )
        unique: dict[str | None, Record] = {}
        for record in records:
            unique.setdefault(record.header("ce_id"), record)
        if len(unique) >= count or len(records) < wanted:
            return list(unique.values())
        wanted += len(records) - len(unique)


def data(record: Record) -> dict[str, Any]:
    assert record.value is not None
    parsed: dict[str, Any] = json.loads(record.value)
    return parsed


def of_type(records: list[Record], event_type: str) -> list[Record]:
    return [r for r in records if r.header("ce_type") == event_type]


def contact_key(intake: Intake, case_id: str) -> bytes:
    """The contact key, as the visits service obtains it from the keyring."""
    response = intake.client.get(f"/keyring/cases/{case_id}/keys/contact", headers=VISITS_SERVICE)
    assert response.status_code == 200, response.text
    assert response.json()["purpose"] == "contact"
    return base64.urlsafe_b64decode(response.json()["key"] + "==")


def inner_key(intake: Intake, case_id: str, purpose: KeyPurpose) -> bytes:
    """A purpose key no service obtains (children, screening), derived inside intake."""
    keyring = intake.client.app.state.intake.keyring  # type: ignore[attr-defined]

    async def derive() -> bytes:
        async with intake.runtime.db.transaction() as session:
            keys = await keyring.find(session, case_id)
        assert keys is not None
        key: bytes = keys.key(purpose)[1]
        return key

    found: bytes = intake.client.portal.call(derive)  # type: ignore[union-attr]
    return found


async def test_registration_publishes_family_registered_with_personal_data_sealed(
    intake_any_db: Intake,
) -> None:
    intake = intake_any_db
    case = intake.register()
    case_id = case["case_id"]
    assert case["bezirk"] == "hoerde"
    assert case["bezirk_source"] == "address"
    # 14 days (the city's target) after the birth on 27 February, as visits counts it.
    assert case["visit_target_date"] == "2025-03-13"

    [record] = await events(intake, "lotse.intake", 1)
    # CloudEvents binary mode; the Kafka key is the pseudonymous case id.
    assert record.key == case_id.encode()
    assert record.header("ce_specversion") == "1.0"
    assert record.header("ce_type") == "de.lotse.intake.family-registered.v1"
    assert record.header("ce_source") == "/lotse/intake"
    assert record.header("ce_subject") == case_id
    assert record.header("ce_bezirk") == "hoerde"
    assert record.header("ce_time") == "2025-03-03T08:15:00Z"  # the service clock
    # An absolute URI below the service's own address (no contracts base URL configured).
    assert record.header("ce_dataschema") == (
        "http://127.0.0.1:8001/contracts/schemas/de.lotse.intake.family-registered.v1.json"
    )
    assert record.header("content-type") == "application/json"
    assert uuid.UUID(record.header("ce_id") or "")
    assert_no_plaintext(raw([record]), "lotse.intake")

    event = FamilyRegistered.model_validate(data(record))
    assert event.case_id == case_id
    assert (event.channel, event.clinic_id) == ("clinic", "st-josefs-hospital-hoerde")
    assert event.days_since_birth_at_registration == 4
    assert event.children_count == 1
    assert event.preferred_language == "tr"
    assert [(c.scope, c.traeger, c.purpose) for c in event.consents] == [
        ("welcome_visit", None, None),
        ("traeger_contact", "hebammenzentrum-dortmund", "familienhebamme"),
    ]
    assert [c.consent_id for c in event.consents] == [c["consent_id"] for c in case["consents"]]

    # Visits opens the contact block with the key the keyring hands out for a welcome
    # visit; the children's data is in a block of its own, under a key visits never gets.
    personal = open_personal(event.personal, key=contact_key(intake, case_id), case_id=case_id)
    assert personal.family_name == "Yılmaz-Özdemir"
    assert personal.parent_given_names == ["Ayşe", "Konstantin"]
    assert (personal.child_given_names, personal.child_birth_dates) == ([], [])
    assert event.children is not None
    with pytest.raises(BlockUnreadable):
        open_block(event.children, key=contact_key(intake, case_id), case_id=case_id)
    children = ChildrenData.model_validate(
        open_block(
            event.children, key=inner_key(intake, case_id, KeyPurpose.CHILDREN), case_id=case_id
        )
    )
    assert children.child_given_names == ["Mirabelle"]
    assert str(children.child_birth_dates[0]) == "2025-02-27"
    assert (personal.street, personal.house_number, personal.postcode, personal.city) == (
        "Hörder Bahnhofstraße",
        "12a",
        "44263",
        "Dortmund",
    )
    # Bound to its case: the block does not open as another family's.
    with pytest.raises(BlockUnreadable):
        open_personal(event.personal, key=contact_key(intake, case_id), case_id=str(uuid.uuid4()))

    # At rest, too, nothing personal is in clear.
    assert_no_plaintext(intake.dump_rows().encode(), "database rows")

    # The registering Babylotse reads the case back, decrypted.
    detail = intake.client.get(f"/cases/{case_id}", headers=BABYLOTSE).json()
    assert detail["personal"]["family_name"] == "Yılmaz-Özdemir"
    assert detail["personal"]["children"] == [
        {"given_name": "Mirabelle", "birth_date": "2025-02-27"}
    ]


async def test_duplicate_guard_returns_the_existing_case(intake: Intake) -> None:
    first = intake.register()
    # The same family, typed by someone else: other case, no umlauts, abbreviated street.
    again = registration(
        family={"family_name": "YILMAZ OEZDEMIR", "parent_given_names": ["Ayse"]},
        address={"street": "Hoerder Bahnhofstr.", "house_number": "12 A", "postcode": "44263"},
        children=[{"birth_date": "2025-02-27"}],
        consents=[],
    )
    response = intake.client.post("/cases", json=again, headers=BABYLOTSE)
    assert response.status_code == 200, response.text
    assert response.json()["duplicate"] is True
    assert response.json()["case_id"] == first["case_id"]
    assert len(response.json()["consents"]) == 2  # the existing case, unchanged

    # A sibling born on another day, or another house, is another case.
    other_child = intake.client.post(
        "/cases",
        json=registration(children=[{"given_name": "Leyla", "birth_date": "2025-01-30"}]),
        headers=BABYLOTSE,
    )
    assert other_child.status_code == 201
    assert other_child.json()["duplicate"] is False
    assert intake.row_counts()["intake_case"] == 2
    assert intake.outbox_types().count("de.lotse.intake.family-registered.v1") == 2
    records = await events(intake, "lotse.intake", 2)
    assert len(of_type(records, "de.lotse.intake.family-registered.v1")) == 2


async def test_consent_withdrawal_is_published_and_kept_in_the_history(intake: Intake) -> None:
    case = intake.register()
    case_id = case["case_id"]
    hebamme = case["consents"][1]
    assert hebamme["scope"] == "traeger_contact"

    intake.clock.advance(days=2)
    url = f"/cases/{case_id}/consents/{hebamme['consent_id']}/withdraw"
    withdrawn = intake.client.post(url, headers=FAMILIENBUERO_HOERDE)
    assert withdrawn.status_code == 200, withdrawn.text
    body = withdrawn.json()
    assert body["state"] == "withdrawn"
    assert body["withdrawn_at"] == "2025-03-05T08:15:00Z"
    assert [(h["state"], h["recorded_by_role"]) for h in body["history"]] == [
        ("given", "babylotse"),
        ("withdrawn", "familienbuero"),
    ]

    again = intake.client.post(url, headers=FAMILIENBUERO_HOERDE)
    assert again.status_code == 409
    assert again.json()["errors"][0]["field"] == "consent_id"
    assert "already withdrawn" in again.json()["detail"]

    # A handover may not rest on the withdrawn consent.
    handover = intake.client.post(
        f"/cases/{case_id}/handovers",
        json={"module": "familienhebamme", "traeger": "hebammenzentrum-dortmund"},
        headers=BABYLOTSE,
    )
    assert handover.status_code == 409
    assert handover.json()["errors"][0]["field"] == "traeger"

    # Giving it anew is a new consent with a new id; giving it twice is answered as it is.
    new = intake.client.post(
        f"/cases/{case_id}/consents",
        json={
            "scope": "traeger_contact",
            "traeger": "hebammenzentrum-dortmund",
            "purpose": "familienhebamme",
        },
        headers=BABYLOTSE,
    )
    assert new.status_code == 201
    assert new.json()["consent_id"] != hebamme["consent_id"]
    repeated = intake.client.post(
        f"/cases/{case_id}/consents",
        json={
            "scope": "traeger_contact",
            "traeger": "hebammenzentrum-dortmund",
            "purpose": "familienhebamme",
        },
        headers=BABYLOTSE,
    )
    assert repeated.status_code == 200
    assert repeated.json()["consent_id"] == new.json()["consent_id"]

    assert intake.outbox_types().count("de.lotse.intake.consent-changed.v1") == 2
    records = await events(intake, "lotse.intake", 3)
    changes = of_type(records, "de.lotse.intake.consent-changed.v1")
    assert len(changes) == 2
    withdrawal = ConsentChanged.model_validate(data(changes[0]))
    assert withdrawal.consent_id == hebamme["consent_id"]
    assert (withdrawal.state, withdrawal.scope) == ("withdrawn", "traeger_contact")
    assert (withdrawal.traeger, withdrawal.purpose) == (
        "hebammenzentrum-dortmund",
        "familienhebamme",
    )
    assert withdrawal.changed_by_role == "familienbuero"
    assert changes[0].key == case_id.encode()
    assert changes[0].header("ce_subject") == case_id
    renewed = ConsentChanged.model_validate(data(changes[1]))
    assert (renewed.state, renewed.consent_id) == ("given", new.json()["consent_id"])

    history = intake.client.get(f"/cases/{case_id}/consents", headers=DPO)
    assert history.status_code == 200  # the data-protection officer may check consents
    assert [c["state"] for c in history.json()] == ["given", "withdrawn", "given"]


async def test_screening_is_sealed_and_never_routed(intake: Intake) -> None:
    case = intake.register(
        consents=[
            {"scope": "screening_data_use"},
            {"scope": "traeger_contact", "purpose": "familienhebamme"},
        ]
    )
    case_id = case["case_id"]
    screening = intake.client.post(
        f"/cases/{case_id}/screenings",
        json={
            "support_need": "acute",
            "indicators": ["single_parent", "parent_mental_strain", "single_parent"],
            "wished_modules": ["familienhebamme"],
            "instrument": "kinderstark-screening-2024",
        },
        headers=BABYLOTSE,
    )
    assert screening.status_code == 201, screening.text
    assert "support_need" not in screening.json()  # Art. 9 data is not echoed (nor replayed)

    # With screening data use consented, an acute need makes the handover urgent; the
    # family consented to the purpose without naming a Träger: the Familienbüro chooses.
    handover = intake.client.post(
        f"/cases/{case_id}/handovers", json={"module": "familienhebamme"}, headers=BABYLOTSE
    )
    assert handover.status_code == 201, handover.text
    assert handover.json()["urgent"] is True
    assert handover.json()["traeger"] is None

    read = intake.client.get(f"/cases/{case_id}/screenings", headers=BABYLOTSE).json()
    assert read[0]["support_need"] == "acute"
    assert read[0]["indicators"] == ["single_parent", "parent_mental_strain"]

    records = await events(intake, "lotse.intake", 3)
    [assessed] = of_type(records, "de.lotse.intake.needs-assessed.v1")
    blob = raw([assessed])
    for clear in (b"acute", b"single_parent", b"parent_mental_strain", b"kinderstark"):
        assert clear not in blob
    event = NeedsAssessed.model_validate(data(assessed))
    # Sealed under the Art. 9 screening key: the contact key does not open it.
    with pytest.raises(BlockUnreadable):
        open_block(event.screening, key=contact_key(intake, case_id), case_id=case_id)
    screening_key = inner_key(intake, case_id, KeyPurpose.SCREENING)
    opened = open_block(event.screening, key=screening_key, case_id=case_id)
    assert opened["support_need"] == "acute"
    assert b"acute" not in intake.dump_rows().encode()

    [requested] = of_type(records, "de.lotse.intake.handover-requested.v1")
    handover_event = HandoverRequested.model_validate(data(requested))
    assert handover_event.consent_ref == case["consents"][1]["consent_id"]
    assert (handover_event.urgent, handover_event.requested_by_role) == (True, "babylotse")

    # The Bezirksteam's feed gets neither the screening nor anything personal.
    feed = await events(intake, "lotse.bezirk.hoerde", 1, timeout_s=3)
    assert feed == []


async def test_erasure_makes_every_earlier_block_undecryptable(intake_any_db: Intake) -> None:
    intake = intake_any_db
    case = intake.register(
        consents=[
            {"scope": "screening_data_use"},
            {
                "scope": "traeger_contact",
                "traeger": "hebammenzentrum-dortmund",
                "purpose": "familienhebamme",
            },
        ]
    )
    case_id = case["case_id"]
    assert (
        intake.client.post(
            f"/cases/{case_id}/screenings",
            json={"support_need": "increased", "indicators": ["social_isolation"]},
            headers=BABYLOTSE,
        ).status_code
        == 201
    )
    before = await events(intake, "lotse.intake", 2)
    [registered] = of_type(before, "de.lotse.intake.family-registered.v1")
    [assessed] = of_type(before, "de.lotse.intake.needs-assessed.v1")
    personal_block = FamilyRegistered.model_validate(data(registered)).personal
    screening_block = NeedsAssessed.model_validate(data(assessed)).screening
    # Before erasure the blocks open.
    open_personal(personal_block, key=contact_key(intake, case_id), case_id=case_id)

    intake.clock.advance(days=30)
    erased = erase(intake.client, case_id)
    assert erased.status_code == 200, erased.text
    assert erased.json()["erased"] is True
    assert erased.json()["reason"] == "request"
    family_kid = personal_block.kid.partition("/")[0]
    assert personal_block.kid == f"{family_kid}/contact"
    assert erased.json()["key_id"] == family_kid

    # The keyring has no secret any more: no key of the family is released for any purpose.
    gone = intake.client.get(f"/keyring/cases/{case_id}/keys/contact", headers=VISITS_SERVICE)
    assert gone.status_code == 410

    async def keys_in_database() -> dict[str, bytes]:
        async with intake.runtime.db.engine.connect() as conn:
            rows = await conn.execute(text("SELECT kid, wrapped_key FROM intake_data_key"))
            return {kid: wrapped.encode() for kid, wrapped in rows}

    keyring = intake.client.portal.call(keys_in_database)  # type: ignore[union-attr]
    for block in (personal_block, screening_block):
        with pytest.raises(BlockUnreadable, match="destroyed when the family was erased"):
            data_key_for(block, keyring)
        # No other key opens it either (GCM authenticates the key).
        with pytest.raises(BlockUnreadable):
            open_block(block, key=new_data_key(), case_id=case_id)

    # family-erased: on the domain topic and, projected, on the Bezirksteam's feed.
    after = await events(intake, "lotse.intake", 3)
    [erasure] = of_type(after, "de.lotse.intake.family-erased.v1")
    event = FamilyErased.model_validate(data(erasure))
    assert (event.case_id, event.key_id, event.reason) == (case_id, family_kid, "request")
    assert erasure.key == case_id.encode()
    [feed] = await events(intake, "lotse.bezirk.hoerde", 1)
    assert set(data(feed)) == {"case_id", "bezirk", "erased_at"}

    # No plaintext of the family anywhere intake controls: topics, rows, database file.
    assert_no_plaintext(raw(after) + raw([feed]), "topics")
    dumped = intake.dump_rows()
    assert_no_plaintext(dumped.encode(), "database rows")
    assert personal_block.ciphertext not in dumped  # intake's own sealed copies are purged
    assert screening_block.ciphertext not in dumped
    counts = intake.row_counts()
    assert counts["intake_data_key"] == 0
    assert counts["intake_match_key"] == 0
    if intake.sqlite_file is not None:
        files = [intake.sqlite_file, intake.sqlite_file.with_name(intake.sqlite_file.name + "-wal")]
        assert_no_plaintext(b"".join(f.read_bytes() for f in files if f.exists()), "SQLite file")

    # What is left is a stub; nothing can be recorded for it any more.
    stub = intake.client.get(f"/cases/{case_id}", headers=BABYLOTSE).json()
    assert stub["erased"] is True
    assert stub["personal"] is None
    refused = intake.client.post(
        f"/cases/{case_id}/screenings", json={"support_need": "none"}, headers=BABYLOTSE
    )
    assert refused.status_code == 410
    # Erasing again changes nothing (410: it is erased); registering the family again is a
    # new case.
    again_erased = intake.client.post(
        f"/cases/{case_id}/erasure", json=ERASURE_REQUEST, headers=DPO
    )
    assert again_erased.status_code == 410
    status = intake.client.get(f"/cases/{case_id}/erasure", headers=DPO).json()
    assert status == {**erased.json(), "pending_request": None}
    again = intake.client.post("/cases", json=registration(consents=[]), headers=BABYLOTSE)
    assert again.status_code == 201
    assert again.json()["case_id"] != case_id
    # One family-erased, on the intake topic and the Bezirksteam's feed.
    assert intake.outbox_types().count("de.lotse.intake.family-erased.v1") == 2
