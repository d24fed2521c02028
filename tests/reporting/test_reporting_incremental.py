"""Incremental figures: each event changes only the cells of the families it touches, by
subtracting their old shares and adding their new ones. The cells built that way, event by
event, equal those recomputed from all facts at once (``compute_year``, the reference), also
when corrections move a family from one cell to another."""

from __future__ import annotations

import random
from collections.abc import Iterable

from lotse_contracts.events.base import EventModel
from lotse_contracts.events.common import ConsentScope, Role
from lotse_contracts.events.intake import CasesMerged, Channel, ErasureReason
from lotse_contracts.figures import KpiFigure
from lotse_reporting.domain import (
    STADT,
    STOCK_DELTA,
    Accumulated,
    Cell,
    CellKey,
    ImpossibleEvent,
    Snapshot,
    accumulate,
    apply,
    cell_deltas,
    changed_figures,
    clusters_of,
    families_of,
    median_of,
    shares_of,
    year_cells,
)

from tests.reporting.builders import Family, at, new_id, random_city
from tests.reporting.test_reporting_domain import LAYOUT, RULES, ZONE, figures, run


def incremental(events: Iterable[EventModel]) -> tuple[Snapshot, dict[CellKey, Accumulated]]:
    """Apply events one at a time, keeping only the cells up to date (as the consumer does)."""
    snapshot = Snapshot()
    cells: dict[CellKey, Accumulated] = {}
    for event in events:
        touched = families_of(event)
        before = shares_of(snapshot, touched, ZONE)
        try:
            apply(event, snapshot, RULES)
        except ImpossibleEvent:
            continue
        after = shares_of(snapshot, touched, ZONE)
        for key, delta in cell_deltas(before, after).items():
            cells.setdefault(key, Accumulated()).add(delta)
    return snapshot, cells


def nonzero(cells: dict[CellKey, Accumulated]) -> dict[CellKey, Accumulated]:
    """Cells that hold something (a family leaving a cell may leave zeros behind)."""
    found = {}
    for key, acc in cells.items():
        numbers = {n: c for n, c in acc.numbers.items() if c}
        kept = Accumulated(acc.families, acc.value, acc.hits, acc.weight, numbers)
        if kept != Accumulated():
            found[key] = kept
    return found


def published(
    snapshot: Snapshot, cells: dict[CellKey, Accumulated], year: int = 2025
) -> dict[CellKey, Cell]:
    months = [f.month for f in snapshot.facts.values()] + [
        c.registered_month for c in snapshot.cases.values() if c.registered_month
    ]
    stock = {(k[0], k[1]): acc for k, acc in cells.items() if k[2] == STOCK_DELTA}
    flows = {k: acc for k, acc in cells.items() if k[2] != STOCK_DELTA}
    return {c.key: c for c in year_cells(year, max(months), LAYOUT, flows, stock)}


def test_event_by_event_equals_recomputing_everything() -> None:
    rng = random.Random(11)
    events = random_city(
        rng, 400, ["hoerde", "eving", "brackel", "mengede"], at("2025-01-02").date()
    )
    snapshot, cells = incremental(events)
    everyone = set(snapshot.cases) | {f.case_id for f in snapshot.facts.values()}
    assert nonzero(cells) == nonzero(accumulate(shares_of(snapshot, everyone, ZONE)))
    expected = figures(run(events))
    got = published(snapshot, cells)
    assert got == expected
    assert any(not c.suppressed and c.value for c in got.values())


def test_corrections_move_a_family_between_cells() -> None:
    everyone = [Family(bezirk="hoerde", channel=Channel.CLINIC) for _ in range(7)]
    events: list[EventModel] = []
    # Visits first, registrations later (topics interleave): the visits move into the
    # birth-to-visit median once the channel is known.
    for i, family in enumerate(everyone):
        visit, starts = new_id(), at("2025-03-12", 10)
        events.append(family.scheduled(visit, at("2025-03-04"), starts))
        events.append(family.completed(visit, starts, at("2025-03-12", 11), 10 + i))
    for i, family in enumerate(everyone):
        events.append(family.registered(at("2025-03-03"), welcome_consent=i not in (0, 4)))
    # A consent given later enters the numerator; an erased duplicate leaves every cell; a
    # merged case stops counting twice.
    events.append(everyone[0].consent(ConsentScope.WELCOME_VISIT, True, at("2025-03-20")))
    events.append(everyone[1].erased(at("2025-03-21"), ErasureReason.DUPLICATE))
    events.append(
        CasesMerged(
            merged_case_id=everyone[2].case_id,
            surviving_case_id=everyone[3].case_id,
            bezirk="hoerde",
            merged_bezirk="hoerde",
            merged_at=at("2025-03-22"),
            merged_by_role=Role.FAMILIENBUERO,
        )
    )
    snapshot, cells = incremental(events)
    got = published(snapshot, cells)
    assert got == figures(run(events))
    march = ("hoerde", "2025-03")
    assert got[(*march, "families_registered", "")].value == 5
    assert got[(*march, "visits_completed", "")].value == 5
    assert got[(*march, "median_days_birth_to_visit", "")].value == 14
    # 4 of 5 consented (0 did later, 4 never): a numerator below k, so no published rate.
    assert cells[(*march, "consent_rate", "")].hits == 4
    assert got[(*march, "consent_rate", "")].suppressed
    assert got[(STADT, "2025", "reach_rate", "")].value == 100.0


def test_a_rate_from_a_small_numerator_or_denominator_is_not_published() -> None:
    events: list[EventModel] = []
    for i, family in enumerate([Family(bezirk="luetgendortmund") for _ in range(6)]):
        referral = family.referral(new_id(), "elternschule")
        events += [family.registered(at("2025-03-02")), referral.requested(at("2025-03-03"))]
        if i < 4:
            events.append(referral.accepted(at("2025-03-05")))
        elif i == 4:
            events.append(referral.rejected(at("2025-03-05")))
    snapshot, cells = incremental(events)
    got = published(snapshot, cells)
    key = ("luetgendortmund", "2025-03", KpiFigure.ACCEPTANCE_RATE.value, "")
    # Five answered, four accepted: "80 %" would tell that exactly one family declined.
    assert (cells[key].value, cells[key].weight, cells[key].families) == (4, 5, 5)
    assert got[key].suppressed
    assert got[key].value is None


def test_medians_come_from_histograms() -> None:
    assert median_of({}) is None
    assert median_of({3.0: 1}) == 3.0
    assert median_of({1.0: 1, 4.0: 1}) == 2.5
    assert median_of({1.0: 2, 9.0: 1}) == 1.0
    assert median_of({1.0: 2, 5.0: 0, 9.0: 2}) == 5.0


def test_a_cluster_of_figures_comes_out_as_in_the_whole_year() -> None:
    """A pass recomputes only the clusters whose sums changed; their cells, complementary
    suppression included, must be exactly those of the whole year's computation."""
    rng = random.Random(5)
    events = random_city(
        rng, 120, ["hoerde", "eving", "brackel", "mengede"], at("2025-01-02").date()
    )
    snapshot, cells = incremental(events)
    whole = published(snapshot, cells)
    stock = {(k[0], k[1]): acc for k, acc in cells.items() if k[2] == STOCK_DELTA}
    flows = {k: acc for k, acc in cells.items() if k[2] != STOCK_DELTA}
    horizon = max(k[1] for k in flows if len(k[1]) == 7)
    hidden_by_complement = 0
    for name in {k[2] for k in cells} | {STOCK_DELTA}:
        cluster = clusters_of([name], LAYOUT)
        assert cluster  # every figure belongs to one
        part = year_cells(2025, horizon, LAYOUT, flows, stock, cluster)
        assert {c.figure for c in part} == set(cluster)
        assert {c.key: c for c in part} == {k: c for k, c in whole.items() if c.figure in cluster}
        hidden_by_complement += sum(1 for c in part if c.suppressed)
    assert hidden_by_complement  # the sample exercises suppression
    # Reach rate follows its base, the families registered: one cluster.
    assert KpiFigure.FAMILIES_REGISTERED in clusters_of(["reach_rate"], LAYOUT)
    assert clusters_of([STOCK_DELTA], LAYOUT) == {KpiFigure.OPEN_ESCALATIONS}


def test_changed_figures_name_the_figures_whose_sums_moved() -> None:
    key = ("hoerde", "2025-03", "visits_offered", "")
    other = ("eving", "2025-03", "referrals_requested", "module:elternschule")
    before = {key: Accumulated(families=3, value=3.0), other: Accumulated(families=1)}
    after = {key: Accumulated(families=3, value=3.0), other: Accumulated(families=2)}
    assert changed_figures(before, after) == {"referrals_requested"}
    assert changed_figures(before, {key: before[key]}) == {"referrals_requested"}
    assert changed_figures(before, dict(before)) == set()
