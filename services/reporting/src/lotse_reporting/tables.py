"""Tables of the reporting service, and the API models built on them.

Two kinds of data live here. The *facts* (``reporting_case``, ``reporting_consent``,
``reporting_fact``, ``reporting_referral``) are the projections of the domain events; they hold
pseudonymous case ids so that a family's events can be related, never leave the service, and
are dropped and rebuilt by a replay. The *key figures* (``reporting_kpi``) are the anonymised
cells as last published on ``lotse.reporting.kpis``; the API and the dashboard read only them.

Times are stored in UTC and read back as aware UTC datetimes on both backends (SQLModel's
``UTCDateTime``; SQLite itself keeps no zone).
"""

from __future__ import annotations

from datetime import datetime

from lotse_contracts.figures import Accumulation, Attribution, KpiFigure, KpiUnit, Suppression
from pydantic import BaseModel, ConfigDict
from sqlalchemy import Column
from sqlalchemy import true as sa_true
from sqlmodel import Field, SQLModel, UTCDateTime


def _utc_column(nullable: bool = True) -> Column[datetime]:
    return Column(UTCDateTime(), nullable=nullable)


class ReportingCase(SQLModel, table=True):
    """One family: where and when it was registered (no personal data)."""

    __tablename__ = "reporting_case"

    case_id: str = Field(primary_key=True, max_length=36)
    bezirk: str | None = Field(default=None, max_length=64)
    channel: str | None = Field(default=None, max_length=16)
    registered_month: str | None = Field(default=None, max_length=7, index=True)
    erased: bool = False
    excluded: bool = Field(default=False, description="Erased as a duplicate: never counted.")


class ReportingConsent(SQLModel, table=True):
    """The latest state of one consent of a family."""

    __tablename__ = "reporting_consent"

    case_id: str = Field(primary_key=True, max_length=36)
    consent_id: str = Field(primary_key=True, max_length=36)
    scope: str = Field(max_length=32)
    given: bool
    at: datetime = Field(sa_column=_utc_column(nullable=False))


class ReportingFact(SQLModel, table=True):
    """Something that happened to a family in a Stadtbezirk and month (see FactKind)."""

    __tablename__ = "reporting_fact"

    kind: str = Field(primary_key=True, max_length=16)
    ref: str = Field(primary_key=True, max_length=96)
    case_id: str = Field(max_length=36, index=True)
    bezirk: str = Field(max_length=64)
    month: str = Field(max_length=7, index=True)
    dimension: str | None = Field(default=None, max_length=64)
    number: float | None = None
    at: datetime | None = Field(default=None, sa_column=_utc_column())
    until: datetime | None = Field(default=None, sa_column=_utc_column())


class ReportingReferral(SQLModel, table=True):
    """A referral's current status and open escalation."""

    __tablename__ = "reporting_referral"

    referral_id: str = Field(primary_key=True, max_length=36)
    case_id: str = Field(max_length=36, index=True)
    bezirk: str = Field(max_length=64)
    module: str = Field(max_length=64)
    status: str = Field(max_length=16)
    open_escalation: str | None = Field(default=None, max_length=96)


class ReportingCell(SQLModel, table=True):
    """The sums behind one key-figure cell over every family's share, kept up to date by
    each event (see ``domain.family_shares``); figures are published from these alone."""

    __tablename__ = "reporting_cell"

    bezirk: str = Field(primary_key=True, max_length=64)
    period: str = Field(primary_key=True, max_length=7)
    figure: str = Field(primary_key=True, max_length=40)
    dimension: str = Field(primary_key=True, max_length=64, description='"" for none.')
    families: int = 0
    value: float = 0.0
    hits: int = 0
    weight: float = 0.0


class ReportingCellNumber(SQLModel, table=True):
    """Histogram of the values a median cell is taken from: how often each value occurs."""

    __tablename__ = "reporting_cell_number"

    bezirk: str = Field(primary_key=True, max_length=64)
    period: str = Field(primary_key=True, max_length=7)
    figure: str = Field(primary_key=True, max_length=40)
    dimension: str = Field(primary_key=True, max_length=64, description='"" for none.')
    number: float = Field(primary_key=True)
    count: int = 0


class ReportingKpi(SQLModel, table=True):
    """One key-figure cell as last published on the reporting stream."""

    __tablename__ = "reporting_kpi"

    bezirk: str = Field(primary_key=True, max_length=64)
    period: str = Field(primary_key=True, max_length=7)
    figure: str = Field(primary_key=True, max_length=40)
    dimension: str = Field(primary_key=True, max_length=64, description='"" for none.')
    value: float | None = None
    suppressed: bool
    unit: str = Field(max_length=16)
    computed_at: datetime = Field(sa_column=_utc_column(nullable=False))
    revision: int = Field(index=True, description="Publication pass that last changed it.")


class ReportingDirtyYear(SQLModel, table=True):
    """A year's changes for the publisher: dirty while ``version`` (counting the changes) is
    ahead of ``cleared``. The row stays once clean and its version only grows: a publisher
    clears only the version it read, so a change made after another replica's pass cleared
    the year can never carry a version an older read still holds."""

    __tablename__ = "reporting_dirty_year"

    year: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})
    version: int = 0
    cleared: int = Field(
        default=0,
        sa_column_kwargs={"server_default": "0"},
        description="The version the last pass that recomputed the year had read.",
    )
    carries: bool = Field(
        default=True,
        sa_column_kwargs={"server_default": sa_true()},
        description="The open-escalation stock changed: every later year follows.",
    )


class ReportingState(SQLModel, table=True):
    """Small bookkeeping values (last publication revision, data horizon)."""

    __tablename__ = "reporting_state"

    key: str = Field(primary_key=True, max_length=32)
    value: str = Field(max_length=64)


FACT_TABLES: list[type[SQLModel]] = [
    ReportingCase,
    ReportingConsent,
    ReportingFact,
    ReportingReferral,
    ReportingCell,
    ReportingCellNumber,
]
TABLES: list[type[SQLModel]] = [
    *FACT_TABLES,
    ReportingKpi,
    ReportingDirtyYear,
    ReportingState,
]


# --- API models ----------------------------------------------------------------------------


class KpiPublic(BaseModel):
    """One key figure of one Stadtbezirk (or ``stadt``) and period; anonymised."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    bezirk: str
    """Stadtbezirk slug, or ``stadt`` for the whole city."""
    period: str
    """``YYYY-MM`` or ``YYYY``."""
    figure: KpiFigure
    """Which key figure."""
    dimension: str | None = None
    """Breakdown as ``<kind>:<value>``, e.g. ``module:familienhebamme``, ``status:accepted``."""
    value: float | None
    """The value in ``unit``; null when suppressed."""
    suppressed: bool
    """True when fewer than k families are behind the cell (or it would give one away)."""
    unit: KpiUnit
    """Unit of ``value``."""
    computed_at: datetime
    """When the value was computed."""

    @classmethod
    def of(cls, row: ReportingKpi) -> KpiPublic:
        computed = row.computed_at
        assert computed is not None
        return cls(
            bezirk=row.bezirk,
            period=row.period,
            figure=KpiFigure(row.figure),
            dimension=row.dimension or None,
            value=row.value,
            suppressed=row.suppressed,
            unit=KpiUnit(row.unit),
            computed_at=computed,
        )


class FigurePublic(BaseModel):
    """What a key figure means: its declaration (``lotse_contracts.figures``) and its
    breakdowns in this city."""

    figure: KpiFigure
    unit: KpiUnit
    label: str
    description: str
    accumulates: Accumulation
    attribution: Attribution
    suppression: Suppression
    dimensions: list[str]


class BezirkPublic(BaseModel):
    """A Stadtbezirk (or the whole city) figures are published for."""

    slug: str
    name: str
