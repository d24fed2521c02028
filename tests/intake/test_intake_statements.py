"""Statements a registration sends to the database (issue 20: ORM work per family).

Counted, not timed: the answer of a registration is built from the rows it has just
written, so no SELECT of its consents or their history follows the INSERTs."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import event

from tests.intake.helpers import BABYLOTSE, Intake, registration


def test_registration_answers_from_the_rows_it_wrote(intake_any_db: Intake) -> None:
    intake = intake_any_db
    # Given out of order (a later consent first, two at the same moment in other zones):
    # the answer lists them as a later read does, by moment given, then position.
    body = registration(
        consents=[
            {"scope": "welcome_visit", "given_at": "2025-03-03T09:00:00+01:00"},
            {
                "scope": "traeger_contact",
                "traeger": "hebammenzentrum-dortmund",
                "purpose": "familienhebamme",
                "given_at": "2025-03-02T10:00:00+02:00",
            },
            {"scope": "screening_data_use", "given_at": "2025-03-02T08:00:00Z"},
        ]
    )
    engine = intake.runtime.db.engine.sync_engine
    seen: list[str] = []

    def record(*args: Any) -> None:
        seen.append(str(args[2]))

    event.listen(engine, "before_cursor_execute", record)
    try:
        response = intake.client.post("/cases", json=body, headers=BABYLOTSE)
    finally:
        event.remove(engine, "before_cursor_execute", record)
    assert response.status_code == 201, response.text
    created = response.json()

    selects = [s for s in seen if s.lstrip().upper().startswith("SELECT")]
    assert not [s for s in selects if "intake_consent" in s], selects

    read = intake.client.get(f"/cases/{created['case_id']}", headers=BABYLOTSE)
    assert read.status_code == 200, read.text
    stored = read.json()["consents"]
    # 10:00+02:00 and 08:00Z are the same moment: position decides.
    assert [c["scope"] for c in created["consents"]] == [
        "traeger_contact",
        "screening_data_use",
        "welcome_visit",
    ]
    assert [_moments(c) for c in created["consents"]] == [_moments(c) for c in stored]


def _moments(consent: dict[str, Any]) -> dict[str, Any]:
    """A consent as answered, its moments compared as instants (a read gives them in UTC)."""
    return {
        **consent,
        "given_at": datetime.fromisoformat(consent["given_at"]),
        "history": [
            {
                **h,
                "at": datetime.fromisoformat(h["at"]),
                "recorded_at": datetime.fromisoformat(h["recorded_at"]),
            }
            for h in consent["history"]
        ],
    }
