"""Tables of the referrals service (all named ``referrals_*``).

Times are stored in UTC and read back as aware UTC datetimes on both backends (SQLModel's
``UTCDateTime``; SQLite itself keeps no zone).
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Any

from sqlalchemy import JSON, Boolean, Column, Index, Integer, UniqueConstraint, false, text
from sqlmodel import Field, SQLModel, UTCDateTime


def _ts(nullable: bool = False, index: bool = False) -> Any:
    return Field(
        default=None if nullable else ...,
        sa_column=Column(UTCDateTime(), nullable=nullable, index=index),
    )


class CatalogueTraeger(SQLModel, table=True):
    """One Träger (provider agency) of the offer catalogue.

    Reconciled with the city configuration at every start (``catalogue.seed_catalogue``),
    field by field: a field changed through the API (``edited_fields``) keeps its value
    over restarts unless the city file changed that same field since the last start
    (``seeded`` holds the file's values as last applied); every other field follows the
    file. A Träger no longer in the file is ``retired``: kept while referrals point at it,
    no new ones go to it, and it comes back when the file names it again.
    """

    __tablename__ = "referrals_traeger"

    slug: str = Field(primary_key=True, max_length=64)
    name: str
    contact: str
    modules: list[str] = Field(sa_column=Column(JSON, nullable=False))
    bezirke: list[str] = Field(sa_column=Column(JSON, nullable=False))
    capacity_per_month: int
    active: bool = True
    edited: bool = False
    retired: bool = Field(
        default=False, sa_column=Column(Boolean, nullable=False, server_default=false())
    )
    edited_fields: list[str] = Field(
        default_factory=list, sa_column=Column(JSON, nullable=False, server_default="[]")
    )
    seeded: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    updated_at: datetime = _ts()


class CatalogueCity(SQLModel, table=True):
    """The city whose configuration the catalogue was seeded from (one row): a start with
    another city's configuration over this database is refused instead of mixing cities."""

    __tablename__ = "referrals_city"

    slug: str = Field(primary_key=True, max_length=64)
    name: str
    seeded_at: datetime = _ts()


class Case(SQLModel, table=True):
    """What the service knows of a family's case, from intake's events."""

    __tablename__ = "referrals_case"

    case_id: str = Field(primary_key=True, max_length=36)
    bezirk: str = Field(index=True, max_length=64)
    clinic_id: str | None = Field(default=None, max_length=64)
    registered_at: datetime = _ts()
    personal: dict[str, Any] | None = Field(
        default=None,
        sa_column=Column(JSON, nullable=True),
        description="The family's sealed personal block (never opened except to build a "
        "referral's disclosure); dropped on erasure.",
    )
    erased_at: datetime | None = _ts(nullable=True)


class ConsentRecord(SQLModel, table=True):
    """One consent of a family (from family-registered and consent-changed)."""

    __tablename__ = "referrals_consent"

    consent_id: str = Field(primary_key=True, max_length=36)
    case_id: str = Field(index=True, max_length=36)
    scope: str = Field(max_length=32)
    traeger: str | None = Field(default=None, max_length=64)
    purpose: str | None = Field(default=None, max_length=64)
    state: str = Field(max_length=16)
    changed_at: datetime = _ts()


#: The statuses of a running referral (domain.OPEN_STATUSES) as SQL, for the partial
#: unique indexes: at most one running referral per family and module, and per handover.
OPEN_STATUS_SQL = "status IN ('requested', 'received', 'accepted', 'in-progress')"
ONE_OPEN_PER_MODULE = "uq_referrals_referral_open_case_module"
ONE_OPEN_PER_HANDOVER = "uq_referrals_referral_open_handover"
_REFERRAL_VERSION = Column("version", Integer, nullable=False, server_default=text("1"))


class Referral(SQLModel, table=True):
    """A referral of a family to a Träger's module, with its lifecycle times.

    ``version`` counts the changes of the row: every update through the ORM is written
    ``WHERE version = <the version read>``, so of two concurrent steps on one referral only
    the first commits and the other finds nothing to update (``StaleDataError``) instead of
    overwriting it.
    """

    __tablename__ = "referrals_referral"
    __table_args__ = (
        Index(
            ONE_OPEN_PER_MODULE,
            "case_id",
            "module",
            unique=True,
            postgresql_where=text(OPEN_STATUS_SQL),
            sqlite_where=text(OPEN_STATUS_SQL),
        ),
        Index(
            ONE_OPEN_PER_HANDOVER,
            "handover_id",
            unique=True,
            postgresql_where=text(f"handover_id IS NOT NULL AND {OPEN_STATUS_SQL}"),
            sqlite_where=text(f"handover_id IS NOT NULL AND {OPEN_STATUS_SQL}"),
        ),
    )

    referral_id: str = Field(primary_key=True, max_length=36)
    case_id: str = Field(index=True, max_length=36)
    bezirk: str = Field(index=True, max_length=64)
    traeger: str = Field(index=True, max_length=64)
    module: str = Field(max_length=64)
    status: str = Field(index=True, max_length=16)
    origin: str = Field(max_length=16)
    consent_ref: str = Field(index=True, max_length=36)
    requested_by_role: str = Field(max_length=32)
    requested_by_subject: str | None = Field(default=None, max_length=200)
    handover_id: str | None = Field(default=None, max_length=36)
    visit_id: str | None = Field(default=None, max_length=36)
    urgent: bool = False
    disclosed_fields: list[str] = Field(default_factory=list, sa_column=Column(JSON))
    requested_at: datetime = _ts(index=True)
    answer_due_by: date
    received_at: datetime | None = _ts(nullable=True)
    accepted_at: datetime | None = _ts(nullable=True)
    first_contact_planned_for: date | None = None
    rejected_at: datetime | None = _ts(nullable=True)
    rejection_reason: str | None = Field(default=None, max_length=32)
    rejection_code: str | None = Field(default=None, max_length=32)
    in_progress_at: datetime | None = _ts(nullable=True)
    first_contact_at: datetime | None = _ts(nullable=True)
    days_to_first_contact: int | None = None
    completed_at: datetime | None = _ts(nullable=True)
    completion_outcome: str | None = Field(default=None, max_length=32)
    cancelled_at: datetime | None = _ts(nullable=True)
    cancel_reason: str | None = Field(default=None, max_length=32)
    cancelled_by_role: str | None = Field(default=None, max_length=32)
    escalated_at: datetime | None = _ts(nullable=True, index=True)
    working_days_at_escalation: int | None = None
    updated_at: datetime = _ts()
    version: int = Field(default=1, sa_column=_REFERRAL_VERSION)

    __mapper_args__ = {"version_id_col": _REFERRAL_VERSION}


class ReferralStep(SQLModel, table=True):
    """One change of a referral, for following it (append-only)."""

    __tablename__ = "referrals_step"

    id: int | None = Field(default=None, primary_key=True)
    referral_id: str = Field(index=True, max_length=36)
    step: str = Field(max_length=16)
    actor_role: str = Field(max_length=32)
    occurred_at: datetime = _ts()
    recorded_at: datetime = _ts()
    event_id: str | None = Field(default=None, max_length=64)


class Wish(SQLModel, table=True):
    """A handover request or a referral wish from a visit that is not (yet) a referral.

    Open wishes are tried again periodically and when a consent arrives; the Bezirksteam
    (district coordination team) sees the open ones with the reason they are waiting.
    """

    __tablename__ = "referrals_wish"
    __table_args__ = (UniqueConstraint("origin", "source_id", name="uq_referrals_wish_source"),)

    wish_id: str = Field(primary_key=True, max_length=36)
    origin: str = Field(max_length=16)
    source_id: str = Field(max_length=36, description="Handover id or visit id.")
    case_id: str = Field(index=True, max_length=36)
    bezirk: str = Field(index=True, max_length=64)
    module: str = Field(max_length=64)
    traeger: str | None = Field(default=None, max_length=64)
    consent_ref: str | None = Field(default=None, max_length=36)
    urgent: bool = False
    requested_by_role: str = Field(max_length=32)
    state: str = Field(index=True, max_length=16, description="open, placed or dropped.")
    problem: str | None = None
    waiting_for: str | None = Field(
        default=None, max_length=16, description="WishWaitingFor of an open wish."
    )
    referral_id: str | None = Field(default=None, max_length=36)
    created_at: datetime = _ts()
    updated_at: datetime = _ts()
    escalated_at: datetime | None = _ts(nullable=True)


TABLES: list[type[SQLModel]] = [
    CatalogueCity,
    CatalogueTraeger,
    Case,
    ConsentRecord,
    Referral,
    ReferralStep,
    Wish,
]
