"""The rebuild writes the facts no check reads back (and the consents) after each fetch and
sums the cells from the stored tables; rows and cells must be what applying the same events
to one in-memory snapshot gives, on both backends, also where a later event replaces an
unchecked fact or brings an older consent statement than the one already stored."""

from __future__ import annotations

import asyncio
import contextlib
import random
from dataclasses import fields
from datetime import timedelta
from typing import Any

from lotse_contracts.events.base import EventModel
from lotse_contracts.events.common import ConsentScope, ConsentState
from lotse_reporting import domain, store
from lotse_reporting.replay_cells import sum_families
from lotse_reporting.replay_rebuild import horizon
from lotse_reporting.tables import TABLES
from lotse_runtime.db import Database
from lotse_runtime.migrations import create_schema
from sqlalchemy import Table, select

from tests.reporting.builders import Family, at, new_id, random_city
from tests.reporting.replay_data import (
    bench_events,
    consumer_record,
    dortmund_rules,
    new_rebuild,
    odd_families,
)

#: Records per fetch of the rebuild.
FETCH = 150


def _rewrites(rng: random.Random) -> list[EventModel]:
    """Events that come back to a row already written in an earlier fetch: a visit recorded
    as completed twice (the second replaces the first); a consent withdrawn, then an older
    statement of it that must not override that; another withdrawn, then a newer statement
    that must."""
    family = Family(bezirk="hoerde", case_id=new_id(rng))
    registered = at("2025-03-03")
    visit_id = new_id(rng)
    starts = registered + timedelta(days=5)
    screening = family.consent(ConsentScope.SCREENING_DATA_USE, False, registered + timedelta(9))
    contact = family.consent(ConsentScope.TRAEGER_CONTACT, False, registered + timedelta(2))
    given = {"state": ConsentState.GIVEN}
    return [
        family.registered(registered),
        family.scheduled(visit_id, registered, starts),
        family.completed(visit_id, starts, starts, 5),
        screening,
        contact,
        family.completed(visit_id, starts, starts + timedelta(days=1), 6),
        screening.model_copy(update={**given, "changed_at": registered}),
        contact.model_copy(update={**given, "changed_at": registered + timedelta(days=20)}),
    ]


def _events() -> list[EventModel]:
    rewrites = _rewrites(random.Random(11))
    rng = random.Random(3)
    events = [
        *bench_events(1200, 3),
        *random_city(rng, 40, ["hoerde", "eving", "mengede"], at("2024-11-04").date()),
        *odd_families(rng),
    ]
    # Spread over the fetches: each rewrite comes in a later fetch than the row it rewrites.
    for n, event in enumerate(rewrites):
        events.insert(FETCH * (n + 1), event)
    return events


def _expected(events: list[EventModel]) -> domain.Snapshot:
    snapshot = domain.Snapshot()
    for event in events:
        with contextlib.suppress(domain.ImpossibleEvent):
            domain.apply(event, snapshot, dortmund_rules())
    return snapshot


def _plain(rows: Any) -> set[tuple[Any, ...]]:
    return {tuple(row) for row in rows}


def _as_rows(kind: type[Any], facts: Any) -> set[tuple[Any, ...]]:
    names = [f.name for f in fields(kind)]
    return {tuple(getattr(f, n) for n in names) for f in facts}


Rows = dict[str, set[tuple[Any, ...]]]


async def _rebuild(url: str, events: list[EventModel]) -> tuple[Rows, Any, Any]:
    db = Database(url)
    try:
        await create_schema(db, TABLES, service="reporting")
        rebuild = new_rebuild()
        records = [consumer_record(event, offset) for offset, event in enumerate(events)]
        async with db.transaction() as session:
            for start in range(0, len(records), FETCH):
                await rebuild.apply_batch(session, records[start : start + FETCH])
            await rebuild.write_rows(session)
            rebuild.release()
            cells = await rebuild.cells(session)
            span = await horizon(session)
            stored: Rows = {}
            tables: list[tuple[str, Table, type[Any]]] = [
                ("cases", store.CASES, domain.CaseFacts),
                ("consents", store.CONSENTS, domain.ConsentFacts),
                ("facts", store.FACTS, domain.Fact),
                ("referrals", store.REFERRALS, domain.ReferralFacts),
            ]
            for name, table, kind in tables:
                columns = [table.c[f.name] for f in fields(kind)]
                stored[name] = _plain(await session.execute(select(*columns)))
        return stored, cells, span
    finally:
        await db.dispose()


def test_the_rebuilds_stored_rows_and_cells_are_the_in_memory_ones(database_url: str) -> None:
    events = _events()
    expected = _expected(events)
    stored, cells, span = asyncio.run(_rebuild(database_url, events))
    rules = dortmund_rules()
    assert stored["cases"] == _as_rows(domain.CaseFacts, expected.cases.values())
    assert stored["consents"] == _as_rows(domain.ConsentFacts, expected.consents.values())
    assert stored["facts"] == _as_rows(domain.Fact, expected.facts.values())
    assert stored["referrals"] == _as_rows(domain.ReferralFacts, expected.referrals.values())
    assert cells == sum_families(expected, rules.zone)
    months = {f.month for f in expected.facts.values()} | {
        c.registered_month for c in expected.cases.values() if c.registered_month
    }
    assert span == (min(months), max(months))
    # The rewrites happened as the in-memory rules say.
    by_scope = {c.scope: c for c in expected.consents.values() if c.case_id == _rewrites_case()}
    assert not by_scope["screening_data_use"].given
    assert by_scope["traeger_contact"].given
    assert any(f.kind == "completed" and f.number == 6 for f in expected.facts.values())


def _rewrites_case() -> str:
    return _rewrites(random.Random(11))[0].case_id  # type: ignore[attr-defined, no-any-return]
