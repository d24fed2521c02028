"""The replay sums every family's cells at once (``replay_cells``); the result must be what
the live path's shares add up to (``domain.family_shares`` → ``domain.accumulate``)."""

from __future__ import annotations

from lotse_reporting import domain
from lotse_reporting.replay_cells import CellsByYear, sum_families

from tests.reporting.replay_data import dortmund_rules, mixed_events


def test_the_replays_cell_sums_are_the_sum_of_the_families_shares() -> None:
    rules = dortmund_rules()
    snapshot = domain.Snapshot()
    rejected = 0
    for event in mixed_events():
        try:
            domain.apply(event, snapshot, rules)
        except domain.ImpossibleEvent:
            rejected += 1
    families = {
        *snapshot.cases,
        *(f.case_id for f in snapshot.facts.values()),
        *(c.case_id for c in snapshot.consents.values()),
        *(r.case_id for r in snapshot.referrals.values()),
    }
    expected = domain.accumulate(domain.shares_of(snapshot, families, rules.zone))
    summed = sum_families(snapshot, rules.zone)
    assert rejected > 0
    assert any(c.excluded for c in snapshot.cases.values())
    assert any(key[2] == domain.STOCK_DELTA for key in expected)
    assert any(acc.numbers for acc in expected.values())
    assert summed.keys() == expected.keys()
    for key, acc in expected.items():
        assert summed[key] == acc, key


def test_a_years_inputs_are_what_the_store_reads_for_it() -> None:
    """The year's cells, and every stock delta up to its end (the stock carries over)."""
    cells = {
        ("hoerde", "2024-05", "visits_offered", ""): domain.Accumulated(families=2, value=2),
        ("hoerde", "2025", "visits_offered", ""): domain.Accumulated(families=1, value=1),
        ("hoerde", "2025-02", "visits_offered", ""): domain.Accumulated(families=1, value=1),
        ("hoerde", "2024-11", domain.STOCK_DELTA, ""): domain.Accumulated(families=1, value=1),
        ("hoerde", "2025-12", domain.STOCK_DELTA, ""): domain.Accumulated(families=-1, value=-1),
        ("hoerde", "2026-01", domain.STOCK_DELTA, ""): domain.Accumulated(families=1, value=1),
    }
    by_year = CellsByYear(cells)
    in_year, stock = by_year.of(2025)
    assert set(in_year) == {
        ("hoerde", "2025", "visits_offered", ""),
        ("hoerde", "2025-02", "visits_offered", ""),
    }
    assert set(stock) == {("hoerde", "2024-11"), ("hoerde", "2025-12")}
    assert stock[("hoerde", "2025-12")] == domain.Accumulated(families=-1, value=-1)
    # The same split serves every year: an earlier one, and a later one without cells.
    in_year, stock = by_year.of(2024)
    assert set(in_year) == {("hoerde", "2024-05", "visits_offered", "")}
    assert set(stock) == {("hoerde", "2024-11")}
    in_year, stock = by_year.of(2027)
    assert in_year == {}
    assert set(stock) == {("hoerde", "2024-11"), ("hoerde", "2025-12"), ("hoerde", "2026-01")}
