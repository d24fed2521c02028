"""The cells of every family at once, for a replay into empty projections.

The live path adds, per event, the difference of the touched families' shares
(:func:`lotse_reporting.domain.family_shares`, :func:`~lotse_reporting.domain.cell_deltas`).
A replay from empty cells knows every "before" (nothing), so it only needs the sum of all
families' shares once, at the end. Building a ``Share`` object per family and cell and then
a ``CellDelta`` per cell costs more than everything else in a replay, so :class:`CellSums`
adds each family's parts (:func:`lotse_reporting.domain.family_parts`, the rules both
paths read) straight into the cells, and counts a family once per cell by remembering the
last family that touched it (families are added one after the other). Families with
escalation episodes (a few per cent) go through ``domain.family_shares`` itself: their
month-end stock needs the episodes together.

``tests/reporting/test_reporting_replay_cells.py`` holds the result equal to
``domain.accumulate(domain.shares_of(...))`` on the benchmark's families and the test city.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import Table, select
from sqlalchemy.ext.asyncio import AsyncSession

from lotse_reporting import domain, store
from lotse_reporting.domain import (
    STADT,
    STOCK_DELTA,
    Accumulated,
    CaseFacts,
    CellKey,
    ConsentFacts,
    Fact,
    FactKind,
    ReferralFacts,
    Snapshot,
)

_ESCALATED = FactKind.ESCALATED.value


class _Sum:
    """One cell's sums, and which family touched it last (to count each family once)."""

    __slots__ = ("families", "hit_last", "hits", "last", "min_value", "numbers", "value", "weight")

    def __init__(self) -> None:
        self.families = 0
        self.value = 0.0
        self.hits = 0
        self.weight = 0.0
        self.numbers: dict[float, int] = {}
        self.last = -1
        self.hit_last = -1
        self.min_value: float | None = None


class CellSums:
    """Every cell's sums over the families added so far (as the stored cells hold them)."""

    def __init__(self) -> None:
        self._sums: dict[CellKey, _Sum] = {}
        self._family = 0
        self._fours: dict[CellKey, tuple[_Sum, ...]] = {}

    def _four(self, bezirk: str, month: str, figure: str, dimension: str) -> tuple[_Sum, ...]:
        """The sums of the four cells a family's part in a Bezirk and month goes to (the
        Bezirk and the city, the month and the year); looked up once per (Bezirk, month,
        figure, dimension): a family adds to some forty cells, and building and looking up
        four keys for each was most of the summing."""
        base = (bezirk, month, figure, dimension)
        found = self._fours.get(base)
        if found is None:
            sums = self._sums
            keys = [
                (area, period, figure, dimension)
                for area in (bezirk, STADT)
                for period in (month, month[:4])
            ]
            found = self._fours[base] = tuple(sums.setdefault(key, _Sum()) for key in keys)
        return found

    def add_family(
        self,
        case: CaseFacts | None,
        consents: Iterable[ConsentFacts],
        facts: list[Fact],
        referrals: Mapping[str, ReferralFacts],
    ) -> None:
        """Add one family's share of every cell (families without escalations): the parts
        ``domain.family_parts`` states, as ``domain.family_shares`` adds them up."""
        if case is not None and case.excluded:
            return
        self._family += 1
        for (
            bezirk,
            month,
            figure,
            dimension,
            value,
            hits,
            weight,
            number,
            smallest,
        ) in domain.family_parts(case, consents, facts, referrals):
            if smallest:
                assert number is not None
                self._add_smallest(bezirk, month, figure, number)
            else:
                self._add(
                    bezirk, month, figure, dimension, value, hits=hits, weight=weight, number=number
                )

    def add_shares(self, shares: domain.Shares) -> None:
        """Add a family's shares as ``domain.family_shares`` computed them."""
        sums = self._sums
        for key, share in shares.items():
            found = sums.get(key)
            if found is None:
                found = sums[key] = _Sum()
            found.families += share.families
            found.value += share.value
            found.hits += share.hits
            found.weight += share.weight
            for number in share.numbers:
                found.numbers[number] = found.numbers.get(number, 0) + 1

    def _add(
        self,
        bezirk: str,
        month: str,
        figure: str,
        dimension: str,
        value: float = 0.0,
        *,
        hits: int = 0,
        weight: float = 0.0,
        number: float | None = None,
    ) -> None:
        family = self._family
        for found in self._four(bezirk, month, figure, dimension):
            if found.last != family:
                found.last = family
                found.families += 1
            found.value += value
            found.weight += weight
            if hits and found.hit_last != family:
                found.hit_last = family
                found.hits += 1
            if number is not None:
                found.numbers[number] = found.numbers.get(number, 0) + 1

    def _add_smallest(self, bezirk: str, month: str, figure: str, number: float) -> None:
        """A number of which each family counts once per cell: its smallest (first visit)."""
        family = self._family
        for found in self._four(bezirk, month, figure, ""):
            numbers = found.numbers
            if found.last != family:
                found.last = family
                found.families += 1
                found.min_value = number
                numbers[number] = numbers.get(number, 0) + 1
            elif found.min_value is not None and number < found.min_value:
                numbers[found.min_value] -= 1
                found.min_value = number
                numbers[number] = numbers.get(number, 0) + 1

    def cells(self) -> dict[CellKey, Accumulated]:
        """The cells with anything in them (as ``domain.accumulate`` leaves them)."""
        result: dict[CellKey, Accumulated] = {}
        for key, found in self._sums.items():
            acc = Accumulated(
                families=found.families,
                value=found.value,
                hits=found.hits,
                weight=found.weight,
                numbers={n: c for n, c in found.numbers.items() if c},
            )
            if not _empty(acc):
                result[key] = acc
        return result


def _empty(acc: Accumulated) -> bool:
    """Nothing summed and no number counted (the numbers without zero counts): a cell the
    families' shares cancel out in, which the stored cells do not hold."""
    return not (acc.families or acc.value or acc.hits or acc.weight or acc.numbers)


def _add(
    sums: CellSums,
    case_id: str,
    case: CaseFacts | None,
    consents: Sequence[ConsentFacts],
    facts: list[Fact],
    referrals: Mapping[str, ReferralFacts],
    zone: ZoneInfo,
) -> None:
    """One family's shares: straight into the sums, or (escalations) through the domain."""
    if any(f.kind == _ESCALATED for f in facts):
        sums.add_shares(domain.family_shares(case_id, case, consents, facts, referrals, zone))
    else:
        sums.add_family(case, consents, facts, referrals)


def sum_families(snapshot: Snapshot, zone: ZoneInfo) -> dict[CellKey, Accumulated]:
    """Every family's share of every cell, summed: what the cells hold after a replay of the
    events whose rows ``snapshot`` holds (all of each family's rows)."""
    facts: dict[str, list[Fact]] = {}
    for fact in snapshot.facts.values():
        facts.setdefault(fact.case_id, []).append(fact)
    consents: dict[str, list[ConsentFacts]] = {}
    for consent in snapshot.consents.values():
        consents.setdefault(consent.case_id, []).append(consent)
    referrals: dict[str, dict[str, ReferralFacts]] = {}
    for referral in snapshot.referrals.values():
        referrals.setdefault(referral.case_id, {})[referral.referral_id] = referral
    sums = CellSums()
    for case_id in {*snapshot.cases, *facts, *consents, *referrals}:
        _add(
            sums,
            case_id,
            snapshot.cases.get(case_id),
            consents.get(case_id, []),
            facts.get(case_id, []),
            referrals.get(case_id, {}),
            zone,
        )
    return sums.cells()


def merge_cells(
    into: dict[CellKey, Accumulated], more: Mapping[CellKey, Accumulated]
) -> dict[CellKey, Accumulated]:
    """The cells of two disjoint sets of families (every sum adds up), as :func:`sum_families`
    over both would leave them: a cell whose sums cancel out (a stock delta) is dropped."""
    for key, found in more.items():
        mine = into.get(key)
        if mine is None:
            into[key] = found
            continue
        mine.add(found)
        mine.numbers = {n: c for n, c in mine.numbers.items() if c}
        if _empty(mine):
            del into[key]
    return into


# --- the same sums from the stored rows ------------------------------------------------------

#: Rows per fetch when reading the stored rows back.
FETCH_ROWS = 5000

_CASE_COLUMNS = ("case_id", "bezirk", "channel", "registered_month", "erased", "excluded")
_CONSENT_COLUMNS = ("case_id", "consent_id", "scope", "given", "at")
_FACT_COLUMNS = ("case_id", "kind", "ref", "bezirk", "month", "dimension", "number", "at", "until")
_REFERRAL_COLUMNS = ("case_id", "referral_id", "bezirk", "module", "status", "open_escalation")


def _sqlite_time(text: str | None) -> datetime | None:
    # How SQLAlchemy's SQLite dialect stores the UTC times (text without an offset).
    return None if text is None else datetime.fromisoformat(text).replace(tzinfo=UTC)


class _Rows:
    """One table's rows (``columns``, ``case_id`` first) in case-id order, bytewise (as
    Python compares the ids), fetched a chunk at a time; datetimes come back aware (UTC)
    and booleans as bool on both backends. Taking a family's rows is a plain loop over the
    chunk: only a new chunk needs the database."""

    def __init__(self, table: Table, columns: Sequence[str]) -> None:
        self.table = table
        self.columns = columns
        self.rows: list[list[Any]] = []
        self.at = 0
        self.done = False
        self._fetch: Callable[[], Awaitable[list[list[Any]]]] | None = None
        self._close: Callable[[], Awaitable[None]] | None = None

    async def open(self, session: AsyncSession) -> None:
        connection = await session.connection()
        if connection.dialect.name == "sqlite":
            # Straight from the driver: SQLAlchemy's per-row processing would cost more
            # than the sums; the case-id index gives the order without a sort.
            raw = await connection.get_raw_connection()
            driver = raw.driver_connection
            assert driver is not None
            names = ", ".join(f'"{name}"' for name in self.columns)
            cursor = await driver.execute(
                f'SELECT {names} FROM {self.table.name} ORDER BY "case_id"'
            )
            times = [i for i, name in enumerate(self.columns) if name in ("at", "until")]
            flags = [
                i for i, name in enumerate(self.columns) if name in ("given", "erased", "excluded")
            ]

            async def fetch() -> list[list[Any]]:
                chunk = [list(row) for row in await cursor.fetchmany(FETCH_ROWS)]
                for row in chunk:
                    for i in times:
                        row[i] = _sqlite_time(row[i])
                    for i in flags:
                        row[i] = bool(row[i])
                return chunk

            self._fetch, self._close = fetch, cursor.close
        else:
            # The "C" collation: bytewise, the order Python's comparison of the ids agrees
            # with.
            statement = select(*(self.table.c[name] for name in self.columns)).order_by(
                self.table.c.case_id.collate("C")
            )
            result = await connection.stream(statement)
            partitions = result.partitions(FETCH_ROWS).__aiter__()

            async def fetch() -> list[list[Any]]:
                found = await anext(partitions, None)
                return [] if found is None else [list(row) for row in found]

            self._fetch, self._close = fetch, result.close
        await self._refill()

    async def _refill(self) -> None:
        assert self._fetch is not None
        self.rows, self.at = await self._fetch(), 0
        self.done = not self.rows

    def head(self) -> str | None:
        """The case id of the next row (None: no rows left)."""
        return None if self.done else str(self.rows[self.at][0])

    async def take(self, case_id: str) -> list[list[Any]]:
        """The next rows if they are this family's (it may continue in the next chunk)."""
        found: list[list[Any]] = []
        while not self.done:
            rows, at = self.rows, self.at
            start, count = at, len(rows)
            while at < count and rows[at][0] == case_id:
                at += 1
            found += rows[start:at]
            self.at = at
            if at < count:
                break
            await self._refill()
        return found

    async def close(self) -> None:
        if self._close is not None:
            await self._close()


async def sum_stored(session: AsyncSession, zone: ZoneInfo) -> dict[CellKey, Accumulated]:
    """:func:`sum_families` over the stored rows: the four tables read once each in case-id
    order, one family at a time, so only one family's rows (and a chunk of each table) are
    in memory."""
    cases = _Rows(store.CASES, _CASE_COLUMNS)
    consents = _Rows(store.CONSENTS, _CONSENT_COLUMNS)
    facts = _Rows(store.FACTS, _FACT_COLUMNS)
    referrals = _Rows(store.REFERRALS, _REFERRAL_COLUMNS)
    tables = (cases, consents, facts, referrals)
    sums = CellSums()
    try:
        for table in tables:
            await table.open(session)
        while True:
            waiting = [found for table in tables if (found := table.head()) is not None]
            if not waiting:
                break
            case_id = min(waiting)
            case_rows = await cases.take(case_id)
            family_referrals = [
                ReferralFacts(r[1], r[0], *r[2:]) for r in await referrals.take(case_id)
            ]
            _add(
                sums,
                case_id,
                CaseFacts(*case_rows[0]) if case_rows else None,
                [ConsentFacts(*row) for row in await consents.take(case_id)],
                [Fact(r[1], r[2], r[0], *r[3:]) for r in await facts.take(case_id)],
                {r.referral_id: r for r in family_referrals},
                zone,
            )
    finally:
        for table in tables:
            await table.close()
    return sums.cells()


class CellsByYear:
    """What ``store.year_cells`` would read for each year from these cells: the year's
    cells, and the open-escalation deltas of every month up to its end. The cells are split
    by year in one pass (a replay publishes every year of its horizon, and a pass over all
    cells per year cost a replay of a decade more than the split)."""

    def __init__(self, cells: Mapping[CellKey, Accumulated]) -> None:
        self._by_year: dict[str, dict[CellKey, Accumulated]] = {}
        self._deltas: list[tuple[str, str, Accumulated]] = []
        for key, acc in cells.items():
            area, period, figure, _ = key
            if figure == STOCK_DELTA:
                self._deltas.append((area, period, acc))
            else:
                self._by_year.setdefault(period[:4], {})[key] = acc

    def of(
        self, year: int
    ) -> tuple[dict[CellKey, Accumulated], dict[tuple[str, str], Accumulated]]:
        last = f"{year}-12"
        stock = {
            (area, period): Accumulated(families=acc.families, value=acc.value)
            for area, period, acc in self._deltas
            if period <= last
        }
        return self._by_year.get(str(year), {}), stock
