"""Statements a handled event sends to the database (issue 20: ORM work per event).

Counted, not timed: a registration reads the stored forms of all its consents in one
query, not one get per consent."""

from __future__ import annotations

from typing import Any

from lotse_referrals.tables import ConsentRecord
from sqlalchemy import event

from tests.referrals.helpers import Family
from tests.referrals.test_referrals_handlers import fed


async def test_a_registration_reads_its_consents_in_one_query(
    database_url: str, topic_prefix: str
) -> None:
    async with fed(database_url, topic_prefix) as service:
        family = Family()
        registered = family.registered()
        assert len(registered.consents) == 2
        engine = service.runtime.db.engine.sync_engine
        seen: list[str] = []

        def record(*args: Any) -> None:
            seen.append(" ".join(str(args[2]).split()))

        event.listen(engine, "before_cursor_execute", record)
        try:
            assert await service.main.send(registered) == "ok"
            # Sent again as a new event: both consents are found stored, none is added.
            again = registered.model_copy()
            assert await service.main.send(again, event_id="reg-again") == "ok"
        finally:
            event.remove(engine, "before_cursor_execute", record)
        consent_reads = [s for s in seen if s.startswith("SELECT referrals_consent.")]
        assert len(consent_reads) == 2, consent_reads  # one per delivery
        stored = await service.rows(ConsentRecord, case_id=family.case_id)
        assert sorted((c.consent_id, c.state) for c in stored) == sorted(
            (c.consent_id, c.state.value) for c in registered.consents
        )
