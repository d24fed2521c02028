"""The duplicate guard never looks across scope: a family enrolled by another clinic or in
another Stadtbezirk is registered as if new (same answer as for a new family, nothing of the
other case in it) and flagged for the Familienbüro of the existing case, which merges the two
(``cases-merged``) or dismisses the flag. Tried as an attacker would: real ids of another
scope, changed spelling, ``bezirk_override``."""

from __future__ import annotations

import json
from typing import Any

import pytest
from httpx import Response
from lotse_runtime.audit import AuditEntry
from sqlalchemy import text
from sqlmodel import select

from tests.intake.helpers import (
    BABYLOTSE,
    FAMILIENBUERO_EVING,
    FAMILIENBUERO_HOERDE,
    OTHER_CLINIC,
    PLAINTEXTS,
    Intake,
    registration,
)
from tests.support import bearer

pytestmark = pytest.mark.integration

NOBODY = "0c5f5d4e-1111-4aaa-8bbb-123456789abc"
BEZIRKSTEAM_EVING = bearer("bezirksteam", subject="bt-9", bezirk="eving")
MERGED = "de.lotse.intake.cases-merged.v1"

#: The enrolled family as someone else types it: capitals, no umlauts, abbreviated street.
RESPELLED: dict[str, Any] = {
    "family": {"family_name": "YILMAZ OEZDEMIR", "parent_given_names": ["Ayse"]},
    "address": {"street": "Hoerder Bahnhofstr.", "house_number": "12 A", "postcode": "44263"},
    "children": [{"birth_date": "2025-02-27"}],
}


def shape(body: Any) -> Any:
    """Keys (recursively) and value types of an answer, without the values."""
    if isinstance(body, dict):
        return {key: shape(value) for key, value in body.items()}
    if isinstance(body, list):
        return [shape(value) for value in body]
    return type(body).__name__


def same_refusal(real: Response, unknown: Response) -> None:
    assert real.status_code == unknown.status_code == 403
    assert real.content == unknown.content == b'{"detail":"not permitted"}'


def outbox(intake: Intake) -> list[dict[str, Any]]:
    async def rows() -> list[dict[str, Any]]:
        async with intake.runtime.db.engine.connect() as conn:
            found = await conn.execute(
                text("SELECT topic, record_key, event_type, value, headers FROM outbox ORDER BY id")
            )
            return [dict(row._mapping) for row in found]

    result: list[dict[str, Any]] = intake.client.portal.call(rows)  # type: ignore[union-attr]
    return result


def audit_trail(intake: Intake) -> list[AuditEntry]:
    async def load() -> list[AuditEntry]:
        async with intake.runtime.db.transaction() as session:
            return list((await session.execute(select(AuditEntry))).scalars())

    rows: list[AuditEntry] = intake.client.portal.call(load)  # type: ignore[union-attr]
    return rows


def test_a_family_of_another_scope_is_answered_like_a_new_family(intake: Intake) -> None:
    client = intake.client
    enrolled = intake.register()  # Hörde, by a Babylotse of St.-Josefs-Hospital
    enrolled_id = enrolled["case_id"]
    probes: list[tuple[dict[str, str], dict[str, Any]]] = [
        (OTHER_CLINIC, {**RESPELLED}),
        (OTHER_CLINIC, {}),  # spelt exactly as enrolled
        # A Familienbüro of another Bezirk, pulling the address into its own via override.
        (FAMILIENBUERO_EVING, {**RESPELLED, "channel": "move_in", "bezirk_override": "eving"}),
    ]
    new_ids = []
    for number, (headers, changes) in enumerate(probes):
        # What a brand-new family looks like to the same caller on the same channel.
        fresh = client.post(
            "/cases",
            json=registration(
                **{
                    **changes,
                    "consents": [],
                    "family": {"family_name": f"Brombeerstrauch {number}"},
                }
            ),
            headers=headers,
        )
        assert fresh.status_code == 201, fresh.text
        answer = client.post(
            "/cases", json=registration(**{**changes, "consents": []}), headers=headers
        )
        assert answer.status_code == fresh.status_code == 201, answer.text
        assert shape(answer.json()) == shape(fresh.json())
        assert answer.json()["duplicate"] is False
        assert enrolled_id not in answer.text
        assert answer.json()["case_id"] != enrolled_id
        assert answer.json()["clinic_id"] == fresh.json()["clinic_id"]
        assert answer.json()["bezirk"] == fresh.json()["bezirk"]
        assert answer.json()["consents"] == []  # not the enrolled family's consents
        assert set(answer.headers) == set(fresh.headers)
        new_ids.append(answer.json()["case_id"])
    assert answer.json()["bezirk"] == "eving"

    # Within scope the guard still answers with the existing case.
    again = client.post("/cases", json=registration(**RESPELLED), headers=BABYLOTSE)
    assert again.status_code == 200
    assert again.json()["duplicate"] is True
    assert again.json()["case_id"] == enrolled_id
    same_bezirk = client.post(
        "/cases", json=registration(**RESPELLED, channel="move_in"), headers=FAMILIENBUERO_HOERDE
    )
    assert same_bezirk.status_code == 200
    assert same_bezirk.json()["case_id"] == enrolled_id

    # Each outside registration is flagged, with ids only, for Hörde's Familienbüro.
    flags = client.get("/bezirke/hoerde/possible-duplicates", headers=FAMILIENBUERO_HOERDE)
    assert flags.status_code == 200, flags.text
    assert sorted(f["case_id"] for f in flags.json()) == sorted(new_ids)
    assert {f["existing_case_id"] for f in flags.json()} == {enrolled_id}
    assert {f["status"] for f in flags.json()} == {"open"}
    assert {f["bezirk"] for f in flags.json()} == {"hoerde"}
    for plain in PLAINTEXTS:
        assert plain not in flags.text
    # The flagging is audited on both cases, ids only.
    flagged = [e for e in audit_trail(intake) if e.purpose.startswith("possible duplicate ")]
    assert {e.case_id for e in flagged} == {enrolled_id, *new_ids}
    dumped = json.dumps([e.model_dump(mode="json") for e in flagged], ensure_ascii=False)
    for plain in PLAINTEXTS:
        assert plain.lower() not in dumped.lower()


def test_only_the_responsible_familienbuero_sees_and_decides_the_flag(intake: Intake) -> None:
    client = intake.client
    intake.register()
    other = client.post("/cases", json=registration(**RESPELLED), headers=OTHER_CLINIC)
    assert other.status_code == 201
    flag = client.get("/bezirke/hoerde/possible-duplicates", headers=FAMILIENBUERO_HOERDE).json()[0]
    duplicate_id = flag["duplicate_id"]

    for outsider in (FAMILIENBUERO_EVING, BEZIRKSTEAM_EVING, OTHER_CLINIC, BABYLOTSE):
        listed = client.get("/bezirke/hoerde/possible-duplicates", headers=outsider)
        assert listed.status_code == 403
        assert listed.content == b'{"detail":"not permitted"}'
        for action in ("merge", "dismiss"):
            same_refusal(
                client.post(f"/possible-duplicates/{duplicate_id}/{action}", headers=outsider),
                client.post(f"/possible-duplicates/{NOBODY}/{action}", headers=outsider),
            )
    # Eving's own list knows nothing of Hörde's flag.
    own = client.get("/bezirke/eving/possible-duplicates", headers=FAMILIENBUERO_EVING)
    assert own.status_code == 200
    assert own.json() == []
    # The registering clinic cannot read the existing case either.
    existing = flag["existing_case_id"]
    same_refusal(
        client.get(f"/cases/{existing}", headers=OTHER_CLINIC),
        client.get(f"/cases/{NOBODY}", headers=OTHER_CLINIC),
    )

    dismissed = client.post(
        f"/possible-duplicates/{duplicate_id}/dismiss", headers=FAMILIENBUERO_HOERDE
    )
    assert dismissed.status_code == 200, dismissed.text
    assert dismissed.json()["status"] == "dismissed"
    again = client.post(f"/possible-duplicates/{duplicate_id}/merge", headers=FAMILIENBUERO_HOERDE)
    assert again.status_code == 409
    assert MERGED not in intake.outbox_types()


def test_a_merge_is_published_and_closes_the_merged_case(intake: Intake) -> None:
    client = intake.client
    enrolled = intake.register(consents=[{"scope": "welcome_visit"}])
    enrolled_id = enrolled["case_id"]
    other = client.post(
        "/cases",
        json=registration(
            **RESPELLED,
            consents=[{"scope": "welcome_visit"}, {"scope": "screening_data_use"}],
        ),
        headers=OTHER_CLINIC,
    )
    assert other.status_code == 201
    merged_id = other.json()["case_id"]
    flag = client.get("/bezirke/hoerde/possible-duplicates", headers=FAMILIENBUERO_HOERDE).json()[0]
    bad = client.post(
        f"/possible-duplicates/{flag['duplicate_id']}/merge",
        json={"surviving_case_id": NOBODY},
        headers=FAMILIENBUERO_HOERDE,
    )
    assert bad.status_code == 422

    merged = client.post(
        f"/possible-duplicates/{flag['duplicate_id']}/merge", headers=FAMILIENBUERO_HOERDE
    )
    assert merged.status_code == 200, merged.text
    assert merged.json()["status"] == "merged"
    assert merged.json()["merged_case_id"] == merged_id
    assert merged.json()["surviving_case_id"] == enrolled_id

    rows = [r for r in outbox(intake) if r["event_type"] == MERGED]
    domain = [r for r in rows if r["topic"] == intake.topic("lotse.intake")]
    assert len(domain) == 1
    assert domain[0]["record_key"] == merged_id  # ordered after the merged case's events
    headers = dict(json.loads(domain[0]["headers"]))
    assert headers["ce_subject"] == merged_id
    assert headers["ce_bezirk"] == "hoerde"
    event = json.loads(domain[0]["value"])
    assert event["merged_case_id"] == merged_id
    assert event["surviving_case_id"] == enrolled_id
    assert event["merged_by_role"] == "familienbuero"
    # Hörde's Bezirksteam feed gets it too (without the merged case's Bezirk).
    feed = [r for r in rows if r["topic"] == intake.topic("lotse.bezirk.hoerde")]
    assert len(feed) == 1
    assert "merged_bezirk" not in json.loads(feed[0]["value"])

    # The consent only the merged case had is carried over to the survivor.
    consents = client.get(f"/cases/{enrolled_id}/consents", headers=FAMILIENBUERO_HOERDE).json()
    assert sorted(c["scope"] for c in consents) == ["screening_data_use", "welcome_visit"]
    carried = [
        r
        for r in outbox(intake)
        if r["event_type"] == "de.lotse.intake.consent-changed.v1"
        and r["record_key"] == enrolled_id
    ]
    assert len(carried) == 1

    # Nothing more is recorded for the merged case: 409 naming the survivor.
    refused = client.post(
        f"/cases/{merged_id}/consents", json={"scope": "welcome_visit"}, headers=OTHER_CLINIC
    )
    assert refused.status_code == 409, refused.text
    assert enrolled_id in refused.text
    # A second merge of the same flag is refused.
    twice = client.post(
        f"/possible-duplicates/{flag['duplicate_id']}/merge", headers=FAMILIENBUERO_HOERDE
    )
    assert twice.status_code == 409
    assert intake.outbox_types().count(MERGED) == len(rows)

    # The guard now answers the survivor's clinic with the survivor.
    again = client.post("/cases", json=registration(**RESPELLED), headers=BABYLOTSE)
    assert again.status_code == 200
    assert again.json()["case_id"] == enrolled_id
