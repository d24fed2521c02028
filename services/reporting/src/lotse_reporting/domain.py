"""Pure rules of the reporting service: what a domain event means for the projections, which
events are impossible, how the key figures (Kennzahlen) follow from the projected facts, and
which cells must be suppressed so that no family can be singled out.

Nothing here does I/O. Callers load the rows an event needs into a :class:`Snapshot`,
:func:`apply` changes them in place (or raises :class:`ImpossibleEvent` before changing
anything), and callers store what was touched. The figures are incremental: a family's share
of every cell follows from its own rows (:func:`family_shares`), so callers add the
difference of the touched families' shares before and after (:func:`cell_deltas`) to the
stored cells, and a year's published cells follow from those sums alone (:func:`year_cells`,
protected by :func:`protect`). :func:`compute_year` recomputes a year from all facts: the
reference the tests hold the incremental cells to.

Two properties make "rebuild by replay gives identical results" hold:

* Every fact is keyed by a natural id (case, visit, referral, consent) and an event only sets
  fields of its own facts, so the end state does not depend on the order in which the three
  domain topics are interleaved; within one topic a family's events keep their order (the
  Kafka key is the case id), which is all that the checks rely on.
* A family's share is derived from its facts, never incremented by an event, and a cell is
  the sum of the shares, so a value depends on the set of facts only, not on when or in which
  batches they arrived.

Attribution: figures about what happened (visits, referrals) count in the month the event
happened, in the city's time zone; rates about families (consent, reach, contacts per family)
count in the month the family was registered (a cohort), so "85 % reached" means: of the
families registered in that month, 85 % have had a completed welcome visit by now.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from zoneinfo import ZoneInfo

from lotse_contracts.events.base import EventModel
from lotse_contracts.events.common import ConsentScope, ConsentState
from lotse_contracts.events.intake import (
    CasesMerged,
    ConsentChanged,
    ErasureReason,
    FamilyErased,
    FamilyRegistered,
)
from lotse_contracts.events.referrals import (
    ReferralAccepted,
    ReferralCancelled,
    ReferralCompleted,
    ReferralEscalated,
    ReferralFirstContact,
    ReferralInProgress,
    ReferralReceived,
    ReferralRejected,
    ReferralRequested,
    ReferralStatus,
)
from lotse_contracts.events.visits import (
    VisitCompleted,
    VisitDeclined,
    VisitMissed,
    VisitScheduled,
)
from lotse_contracts.figures import (
    CITY_TOTAL,
    DEFINITIONS,
    FIGURE_UNITS,
    FIGURES,
    Accumulation,
    Attribution,
    DimensionKind,
    KpiFigure,
    KpiUnit,
    Suppression,
    figures_accumulating,
    figures_suppressed_as,
)

STADT = CITY_TOTAL
"""The ``bezirk`` of figures for the whole city."""

#: Event types the projections use; every other known event is skipped.
HANDLED: tuple[type[EventModel], ...] = (
    FamilyRegistered,
    ConsentChanged,
    FamilyErased,
    CasesMerged,
    VisitScheduled,
    VisitCompleted,
    VisitMissed,
    VisitDeclined,
    ReferralRequested,
    ReferralReceived,
    ReferralAccepted,
    ReferralRejected,
    ReferralInProgress,
    ReferralFirstContact,
    ReferralCompleted,
    ReferralCancelled,
    ReferralEscalated,
)


class FactKind(StrEnum):
    """What one fact row records (one per visit, no-show, referral answer, ...)."""

    OFFERED = "offered"
    """A welcome visit was scheduled (offered); ``at`` is when the appointment was made."""
    COMPLETED = "completed"
    """A welcome visit took place; ``number`` is days from birth (or move-in) to the visit."""
    MISSED = "missed"
    """A family was not at home for an appointment (one row per attempt)."""
    DECLINED = "declined"
    """A family declined the welcome visit."""
    REQUESTED = "requested"
    """A referral was made; ``dimension`` is the module, ``at`` when it was requested."""
    ACCEPTED = "accepted"
    """A Träger accepted a referral."""
    REJECTED = "rejected"
    """A Träger rejected a referral."""
    FIRST_CONTACT = "first_contact"
    """Warm handover done; ``number`` is days from request to first contact."""
    ESCALATED = "escalated"
    """A referral escalated to the Bezirksteam; open from ``at`` until ``until``."""


CHECKED_KINDS = frozenset({FactKind.OFFERED, FactKind.REQUESTED, FactKind.ESCALATED})
"""The only facts :func:`apply` reads back (an appointment's time, a referral's request, an
open escalation); facts of the other kinds are only ever written and summed, so a caller
holding every family's rows may store them and let them go."""


class ImpossibleEvent(ValueError):
    """A well-formed event whose values cannot be true; it is never counted."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Rules:
    """What the checks need to know about the city."""

    bezirke: frozenset[str]
    modules: frozenset[str]
    zone: ZoneInfo
    completion_grace: timedelta = timedelta(minutes=60)
    """How much earlier than its appointment a visit may be recorded as done (families are
    sometimes visited a little early); anything earlier is impossible."""


# --- facts: the projections' rows (pseudonymous ids stay inside the service) ---------------


@dataclass(slots=True)
class CaseFacts:
    """One family as far as reporting needs it: where and when it was registered."""

    case_id: str
    bezirk: str | None = None
    channel: str | None = None
    registered_month: str | None = None
    erased: bool = False
    excluded: bool = False
    """Erased as a duplicate of another case, or merged into another: not a family of its
    own, counted nowhere (the survivor counts the family)."""


@dataclass(slots=True)
class ConsentFacts:
    """The latest known state of one consent of a family."""

    case_id: str
    consent_id: str
    scope: str
    given: bool
    at: datetime


@dataclass(slots=True)
class Fact:
    """Something that happened to a family, in a Stadtbezirk and month."""

    kind: str
    ref: str
    case_id: str
    bezirk: str
    month: str
    dimension: str | None = None
    number: float | None = None
    at: datetime | None = None
    until: datetime | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.kind, self.ref)


@dataclass(slots=True)
class ReferralFacts:
    """A referral's current status, and its escalation if one is open."""

    referral_id: str
    case_id: str
    bezirk: str
    module: str
    status: str
    open_escalation: str | None = None
    """``ref`` of the open ESCALATED fact."""


@dataclass
class Needs:
    """Which rows must be loaded before events can be applied."""

    case_ids: set[str] = field(default_factory=set)
    consent_case_ids: set[str] = field(default_factory=set)
    fact_keys: set[tuple[str, str]] = field(default_factory=set)
    referral_ids: set[str] = field(default_factory=set)
    fact_years_of: set[str] = field(default_factory=set)
    """Cases whose fact years are needed to tell which years a change affects."""
    families: set[str] = field(default_factory=set)
    """Cases whose every row is needed: their shares of the cells are recomputed."""

    def merge(self, other: Needs) -> None:
        self.families |= other.families
        self.case_ids |= other.case_ids
        self.consent_case_ids |= other.consent_case_ids
        self.fact_keys |= other.fact_keys
        self.referral_ids |= other.referral_ids
        self.fact_years_of |= other.fact_years_of


@dataclass
class Snapshot:
    """Loaded rows, changed in place by :func:`apply`; ``touched_*`` say what to store."""

    cases: dict[str, CaseFacts] = field(default_factory=dict)
    consents: dict[tuple[str, str], ConsentFacts] = field(default_factory=dict)
    facts: dict[tuple[str, str], Fact] = field(default_factory=dict)
    referrals: dict[str, ReferralFacts] = field(default_factory=dict)
    fact_years: dict[str, set[int]] = field(default_factory=dict)
    touched_cases: set[str] = field(default_factory=set)
    touched_consents: set[tuple[str, str]] = field(default_factory=set)
    touched_facts: set[tuple[str, str]] = field(default_factory=set)
    touched_referrals: set[str] = field(default_factory=set)
    dirty_years: set[int] = field(default_factory=set)
    """Years whose figures may have changed."""

    def reset_touched(self) -> None:
        self.touched_cases.clear()
        self.touched_consents.clear()
        self.touched_facts.clear()
        self.touched_referrals.clear()
        self.dirty_years.clear()

    def case(self, case_id: str) -> CaseFacts:
        found = self.cases.get(case_id)
        if found is None:
            found = self.cases[case_id] = CaseFacts(case_id=case_id)
        self.touched_cases.add(case_id)
        return found

    def put_fact(self, fact: Fact) -> None:
        self.facts[fact.key] = fact
        self.touched_facts.add(fact.key)
        self.fact_years.setdefault(fact.case_id, set()).add(year_of(fact.month))
        self.dirty_years.add(year_of(fact.month))

    def put_referral(self, referral: ReferralFacts) -> None:
        self.referrals[referral.referral_id] = referral
        self.touched_referrals.add(referral.referral_id)

    def cohort_is_dirty(self, case_id: str) -> None:
        """The family's registration cohort changes (reach, contacts, consent)."""
        case = self.cases.get(case_id)
        if case is not None and case.registered_month is not None:
            self.dirty_years.add(year_of(case.registered_month))

    def all_years_of_case_are_dirty(self, case_id: str) -> None:
        self.cohort_is_dirty(case_id)
        self.dirty_years |= self.fact_years.get(case_id, set())


# --- periods ---------------------------------------------------------------------------------


_NO_OFFSET = timedelta(0)


def month_of(moment: datetime, zone: ZoneInfo) -> str:
    """``YYYY-MM`` of a moment in the city's local time.

    Called for every event and every episode of a family's shares, live and in the replay:
    a time-zone conversion and ``strftime`` per call were half of :func:`apply`'s cost. The
    local month is the moment's UTC month or one next to it, so the moment is compared with
    that month's local bounds, computed once per month and zone."""
    if moment.utcoffset() != _NO_OFFSET:
        moment = moment.astimezone(UTC)
    year, month = moment.year, moment.month
    start, end, label = _local_month(year, month, zone)
    if moment < start:
        year, month = (year - 1, 12) if month == 1 else (year, month - 1)
    elif moment >= end:
        year, month = (year + 1, 1) if month == 12 else (year, month + 1)
    else:
        return label
    return _local_month(year, month, zone)[2]


@functools.lru_cache(maxsize=4096)
def _local_month(year: int, month: int, zone: ZoneInfo) -> tuple[datetime, datetime, str]:
    """The first instant of local ``month``, the first instant after it, and its label."""
    start = datetime(year, month, 1, tzinfo=zone).astimezone(UTC)
    return start, month_end(f"{year:04d}-{month:02d}", zone), f"{year:04d}-{month:02d}"


def year_of(period: str) -> int:
    return int(period[:4])


def month_end(month: str, zone: ZoneInfo) -> datetime:
    """The first instant after ``month`` (local midnight of the next month's first day)."""
    year, number = int(month[:4]), int(month[5:7])
    year, number = (year + 1, 1) if number == 12 else (year, number + 1)
    return datetime(year, number, 1, tzinfo=zone).astimezone(UTC)


def months_of_year(year: int, horizon: str) -> list[str]:
    """The months of ``year`` that figures are published for: up to the newest month with
    data (``horizon``), so trend lines do not drop to zero in months still to come."""
    horizon_year, horizon_month = year_of(horizon), int(horizon[5:7])
    if year > horizon_year:
        return []
    last = 12 if year < horizon_year else horizon_month
    return [f"{year}-{m:02d}" for m in range(1, last + 1)]


# --- applying events -------------------------------------------------------------------------


def needs_of(event: EventModel) -> Needs:
    """The rows :func:`apply` reads for this event."""
    needs = Needs(families=families_of(event))
    case_id = getattr(event, "case_id", None)
    if isinstance(case_id, str):
        needs.case_ids.add(case_id)
    match event:
        case FamilyRegistered() | ConsentChanged():
            needs.consent_case_ids.add(event.case_id)
            needs.fact_years_of.add(event.case_id)
        case FamilyErased():
            needs.fact_years_of.add(event.case_id)
        case CasesMerged():
            needs.case_ids.add(event.merged_case_id)
            needs.fact_years_of.add(event.merged_case_id)
        case VisitScheduled():
            needs.fact_keys.add((FactKind.OFFERED, event.visit_id))
        case VisitCompleted():
            needs.fact_keys.add((FactKind.OFFERED, event.visit_id))
        case (
            ReferralRequested()
            | ReferralReceived()
            | ReferralAccepted()
            | ReferralRejected()
            | ReferralInProgress()
            | ReferralFirstContact()
            | ReferralCompleted()
            | ReferralCancelled()
            | ReferralEscalated()
        ):
            needs.referral_ids.add(event.referral_id)
            needs.fact_keys.add((FactKind.REQUESTED, event.referral_id))
    return needs


# Over 60 lines: one flat match over every handled event type, read as a table; kept as
# it is while the projections are reworked for incremental figures (issue 19).
def apply(event: EventModel, snapshot: Snapshot, rules: Rules) -> None:
    """Record what ``event`` means in ``snapshot``.

    Raises :class:`ImpossibleEvent` (before changing anything) for values that cannot be
    true; events of types the projections do not use change nothing.
    """
    match event:
        case FamilyRegistered():
            _registered(event, snapshot, rules)
        case ConsentChanged():
            _check_bezirk(event.bezirk, rules)
            _merge_consent(
                snapshot,
                ConsentFacts(
                    case_id=event.case_id,
                    consent_id=event.consent_id,
                    scope=event.scope.value,
                    given=event.state is ConsentState.GIVEN,
                    at=event.changed_at,
                ),
            )
            snapshot.cohort_is_dirty(event.case_id)
        case FamilyErased():
            # Whatever the Bezirk says: an erasure is always honoured.
            case = snapshot.case(event.case_id)
            case.erased = True
            case.excluded = case.excluded or event.reason is ErasureReason.DUPLICATE
            snapshot.all_years_of_case_are_dirty(event.case_id)
        case CasesMerged():
            # The family counts once, as the survivor: the merged case leaves every figure
            # (its cohort and its facts), as a duplicate erased; the years it counted in are
            # recomputed. Idempotent: a second delivery changes nothing.
            case = snapshot.case(event.merged_case_id)
            case.excluded = True
            snapshot.all_years_of_case_are_dirty(event.merged_case_id)
        case VisitScheduled():
            _check_bezirk(event.bezirk, rules)
            _fact(snapshot, FactKind.OFFERED, event.visit_id, event, event.scheduled_at, rules)
        case VisitCompleted():
            _visit_completed(event, snapshot, rules)
        case VisitMissed():
            _check_bezirk(event.bezirk, rules)
            if event.recorded_at < event.scheduled_for:
                raise ImpossibleEvent(
                    f"visit-missed: recorded_at {event.recorded_at.isoformat()} is before the "
                    f"appointment (scheduled_for {event.scheduled_for.isoformat()})"
                )
            ref = f"{event.visit_id}/{event.attempt}"
            _fact(snapshot, FactKind.MISSED, ref, event, event.scheduled_for, rules)
        case VisitDeclined():
            _check_bezirk(event.bezirk, rules)
            ref = event.visit_id or f"case/{event.case_id}"
            _fact(snapshot, FactKind.DECLINED, ref, event, event.declined_at, rules)
        case (
            ReferralRequested()
            | ReferralReceived()
            | ReferralAccepted()
            | ReferralRejected()
            | ReferralInProgress()
            | ReferralFirstContact()
            | ReferralCompleted()
            | ReferralCancelled()
            | ReferralEscalated()
        ):
            _referral(event, snapshot, rules)


def _check_bezirk(bezirk: str, rules: Rules) -> None:
    if bezirk not in rules.bezirke:
        raise ImpossibleEvent(f"bezirk: {bezirk!r} is not a Stadtbezirk of this city")


def _fact(
    snapshot: Snapshot,
    kind: FactKind,
    ref: str,
    event: VisitScheduled | VisitCompleted | VisitMissed | VisitDeclined,
    when: datetime,
    rules: Rules,
    *,
    number: float | None = None,
) -> None:
    snapshot.put_fact(
        Fact(
            kind=kind,
            ref=ref,
            case_id=event.case_id,
            bezirk=event.bezirk,
            month=month_of(when, rules.zone),
            number=number,
            at=when,
        )
    )


def _registered(event: FamilyRegistered, snapshot: Snapshot, rules: Rules) -> None:
    _check_bezirk(event.bezirk, rules)
    known = snapshot.cases.get(event.case_id)
    if known is not None and known.registered_month is not None:
        raise ImpossibleEvent(f"case_id: case {event.case_id} is registered already")
    case = snapshot.case(event.case_id)
    case.bezirk = event.bezirk
    case.channel = event.channel.value
    case.registered_month = month_of(event.registered_at, rules.zone)
    for consent in event.consents:
        _merge_consent(
            snapshot,
            ConsentFacts(
                case_id=event.case_id,
                consent_id=consent.consent_id,
                scope=consent.scope.value,
                given=consent.state is ConsentState.GIVEN,
                at=consent.at,
            ),
        )
    # The channel decides whether earlier visits count as birth-to-visit: those years change.
    snapshot.all_years_of_case_are_dirty(event.case_id)


def _merge_consent(snapshot: Snapshot, consent: ConsentFacts) -> None:
    key = (consent.case_id, consent.consent_id)
    known = snapshot.consents.get(key)
    if known is not None and known.at > consent.at:
        return  # an older statement never overrides a newer one
    snapshot.consents[key] = consent
    snapshot.touched_consents.add(key)


def _visit_completed(event: VisitCompleted, snapshot: Snapshot, rules: Rules) -> None:
    _check_bezirk(event.bezirk, rules)
    if event.completed_at < event.scheduled_for - rules.completion_grace:
        raise ImpossibleEvent(
            f"visit-completed: completed_at {event.completed_at.isoformat()} is before the "
            f"appointment it completes (scheduled_for {event.scheduled_for.isoformat()})"
        )
    offered = snapshot.facts.get((FactKind.OFFERED, event.visit_id))
    if offered is not None and offered.at is not None and event.completed_at < offered.at:
        raise ImpossibleEvent(
            f"visit-completed: completed_at {event.completed_at.isoformat()} is before the "
            f"visit was scheduled ({offered.at.isoformat()})"
        )
    _fact(
        snapshot,
        FactKind.COMPLETED,
        event.visit_id,
        event,
        event.completed_at,
        rules,
        number=event.days_since_reference,
    )
    snapshot.cohort_is_dirty(event.case_id)


_STATUS_OF: dict[type[EventModel], ReferralStatus] = {
    ReferralRequested: ReferralStatus.REQUESTED,
    ReferralReceived: ReferralStatus.RECEIVED,
    ReferralAccepted: ReferralStatus.ACCEPTED,
    ReferralRejected: ReferralStatus.REJECTED,
    ReferralInProgress: ReferralStatus.IN_PROGRESS,
    ReferralCompleted: ReferralStatus.COMPLETED,
    ReferralCancelled: ReferralStatus.CANCELLED,
}
#: Events that answer a stalled referral and so close an open escalation. A mere
#: "received" does not: the escalation is about the missing decision.
_RESOLVES_ESCALATION = (
    ReferralAccepted,
    ReferralRejected,
    ReferralInProgress,
    ReferralFirstContact,
    ReferralCompleted,
    ReferralCancelled,
)
_EVENT_NAME: dict[type[EventModel], str] = {
    model: model.event_type.split(".")[3] for model in HANDLED
}

ReferralEvent = (
    ReferralRequested
    | ReferralReceived
    | ReferralAccepted
    | ReferralRejected
    | ReferralInProgress
    | ReferralFirstContact
    | ReferralCompleted
    | ReferralCancelled
    | ReferralEscalated
)


# Over 60 lines: every referral event's checks, facts and escalation episode in one place;
# kept as it is while the projections are reworked (issue 19).
def _referral(event: ReferralEvent, snapshot: Snapshot, rules: Rules) -> None:
    _check_bezirk(event.bezirk, rules)
    if event.module not in rules.modules:
        raise ImpossibleEvent(f"module: {event.module!r} is not an offer module of this city")
    requested = snapshot.facts.get((FactKind.REQUESTED, event.referral_id))
    name = _EVENT_NAME[type(event)]
    if (
        not isinstance(event, ReferralRequested)
        and requested is not None
        and requested.at is not None
        and event.occurred_at < requested.at
    ):
        raise ImpossibleEvent(
            f"{name}: occurred_at {event.occurred_at.isoformat()} is before the referral was "
            f"requested ({requested.at.isoformat()})"
        )
    month = month_of(event.occurred_at, rules.zone)

    def fact(
        kind: FactKind, ref: str, dimension: str | None = None, number: float | None = None
    ) -> Fact:
        return Fact(
            kind=kind,
            ref=ref,
            case_id=event.case_id,
            bezirk=event.bezirk,
            month=month,
            dimension=dimension,
            number=number,
            at=event.occurred_at,
        )

    referral = snapshot.referrals.get(event.referral_id)
    if referral is None:
        referral = ReferralFacts(
            referral_id=event.referral_id,
            case_id=event.case_id,
            bezirk=event.bezirk,
            module=event.module,
            status=(
                event.last_status.value
                if isinstance(event, ReferralEscalated)
                else ReferralStatus.REQUESTED.value
            ),
        )
    status = _STATUS_OF.get(type(event))
    if status is not None:
        referral.status = status.value
    match event:
        case ReferralRequested():
            snapshot.put_fact(fact(FactKind.REQUESTED, event.referral_id, dimension=event.module))
        case ReferralAccepted():
            snapshot.put_fact(fact(FactKind.ACCEPTED, event.referral_id))
        case ReferralRejected():
            snapshot.put_fact(fact(FactKind.REJECTED, event.referral_id))
        case ReferralFirstContact():
            snapshot.put_fact(
                fact(FactKind.FIRST_CONTACT, event.referral_id, number=event.days_since_requested)
            )
            snapshot.cohort_is_dirty(event.case_id)
        case ReferralEscalated():
            if referral.open_escalation is None:
                ref = f"{event.referral_id}@{event.occurred_at.astimezone(UTC).isoformat()}"
                snapshot.put_fact(fact(FactKind.ESCALATED, ref))
                referral.open_escalation = ref
    if isinstance(event, _RESOLVES_ESCALATION) and referral.open_escalation is not None:
        episode = snapshot.facts.get((FactKind.ESCALATED, referral.open_escalation))
        if episode is not None:
            start = episode.at or event.occurred_at
            # An answer dated before the escalation closes it at once (an empty episode).
            episode.until = max(start, event.occurred_at)
            snapshot.touched_facts.add(episode.key)
            snapshot.dirty_years.add(year_of(month))
        referral.open_escalation = None
    if requested is not None:
        snapshot.dirty_years.add(year_of(requested.month))  # the status breakdown
    snapshot.dirty_years.add(year_of(month))
    snapshot.put_referral(referral)


# --- computing the figures -------------------------------------------------------------------


@dataclass(frozen=True)
class YearInputs:
    """The facts the figures of one year are computed from (loaded by the caller).

    Facts of excluded cases (duplicates) must already be left out.
    """

    year: int
    horizon: str
    """The newest month with any fact, ``YYYY-MM``."""
    cohort: Sequence[CaseFacts]
    """Families registered in the year."""
    consents: Sequence[ConsentFacts]
    """Consents of the cohort's families."""
    cohort_contacts: Sequence[Fact]
    """Completed visits and first contacts of the cohort's families, whenever they were."""
    activity: Sequence[Fact]
    """Facts dated in the year, escalations excepted."""
    channels: Mapping[str, str]
    """Registration channel of the families with a completed visit in the year."""
    statuses: Mapping[str, str]
    """Current status of the referrals requested in the year."""
    escalations: Sequence[Fact]
    """Escalation episodes open at some point of the year."""


@dataclass(frozen=True, slots=True)
class Cell:
    """One published figure: a value, or suppressed."""

    bezirk: str
    period: str
    figure: KpiFigure
    dimension: str | None
    value: float | None
    suppressed: bool

    @property
    def key(self) -> CellKey:
        return (self.bezirk, self.period, self.figure.value, self.dimension or "")

    @property
    def unit(self) -> KpiUnit:
        return FIGURE_UNITS[self.figure]


CellKey = tuple[str, str, str, str]
"""(bezirk, period, figure, dimension or "")."""


@dataclass(frozen=True)
class Layout:
    """Which cells exist: the Stadtbezirke, the modules, and k."""

    bezirke: tuple[str, ...]
    modules: tuple[str, ...]
    k: int
    zone: ZoneInfo

    @property
    def areas(self) -> tuple[str, ...]:
        return (*self.bezirke, STADT)


STATUSES = tuple(status.value for status in ReferralStatus)
CONSENT_DIMENSIONS = {
    None: ConsentScope.WELCOME_VISIT.value,
    f"scope:{ConsentScope.TRAEGER_CONTACT.value}": ConsentScope.TRAEGER_CONTACT.value,
    f"scope:{ConsentScope.SCREENING_DATA_USE.value}": ConsentScope.SCREENING_DATA_USE.value,
}
"""consent_rate without a dimension is the welcome-visit consent (as the contract says)."""

_FLOW_COUNTS = figures_accumulating(Accumulation.COUNT)
_STOCK_COUNTS = figures_accumulating(Accumulation.STOCK)
_ACTIVITY_COUNT = {
    FactKind.OFFERED: KpiFigure.VISITS_OFFERED,
    FactKind.COMPLETED: KpiFigure.VISITS_COMPLETED,
    FactKind.DECLINED: KpiFigure.VISITS_DECLINED,
    FactKind.MISSED: KpiFigure.VISITS_MISSED,
    FactKind.REQUESTED: KpiFigure.REFERRALS_REQUESTED,
    FactKind.ACCEPTED: KpiFigure.REFERRALS_ACCEPTED,
}
#: Ratios whose base is the cohort count: published only where that count is.
_COHORT_RATIOS = figures_suppressed_as(Suppression.COHORT_RATIO)
_COHORT_RATIO_NAMES = frozenset(figure.value for figure in _COHORT_RATIOS)


def _dimension_values(kind: DimensionKind, modules: Iterable[str]) -> list[str]:
    match kind:
        case DimensionKind.MODULE:
            return [f"module:{m}" for m in modules]
        case DimensionKind.STATUS:
            return [f"status:{s}" for s in STATUSES]
        case DimensionKind.SCOPE:
            return [d for d in CONSENT_DIMENSIONS if d is not None]


def figure_dimensions(figure: KpiFigure, modules: Iterable[str]) -> list[str | None]:
    """The breakdowns a figure is published with (None: the figure itself), as declared."""
    found: list[str | None] = [None]
    for kind in DEFINITIONS[figure].dimensions:
        found += _dimension_values(kind, modules)
    return found


def count_dimensions(figure: KpiFigure, modules: Iterable[str]) -> list[str | None]:
    """The breakdowns a count figure is published with (None: the figure itself)."""
    return figure_dimensions(figure, modules)


@dataclass
class _Acc:
    """Accumulator of one cell: a value and the families behind it."""

    value: float = 0.0
    families: set[str] = field(default_factory=set)
    numbers: dict[str, float] = field(default_factory=dict)
    """Per family (or referral) values for medians."""
    hits: set[str] = field(default_factory=set)
    """Families (or referrals) counted in a ratio's numerator."""
    weight: float = 0.0
    """Referrals (not families) in a ratio's denominator."""


class _Table:
    def __init__(self) -> None:
        self.cells: dict[CellKey, _Acc] = {}

    def acc(self, area: str, period: str, figure: KpiFigure, dimension: str | None) -> _Acc:
        key = (area, period, figure.value, dimension or "")
        found = self.cells.get(key)
        if found is None:
            found = self.cells[key] = _Acc()
        return found

    def each(
        self, bezirk: str, month: str, figure: KpiFigure, dimension: str | None = None
    ) -> Iterable[_Acc]:
        """The four cells a fact of one Bezirk and month belongs to."""
        year = month[:4]
        for area in (bezirk, STADT):
            for period in (month, year):
                yield self.acc(area, period, figure, dimension)


# Over 60 lines: the one pass over a year's facts that every figure is counted in; kept as
# it is until issue 19 reworks the computation for incremental figures.
def compute_year(inputs: YearInputs, layout: Layout) -> list[Cell]:
    """All cells of one year: months up to the horizon and the year, every Bezirk and the
    city, every figure; then protected (:func:`protect`)."""
    months = months_of_year(inputs.year, inputs.horizon)
    if not months:
        return []
    year = str(inputs.year)
    periods = [*months, year]
    table = _Table()
    # Every cell exists, also where nothing happened: a zero count, or a ratio without base.
    for area in layout.areas:
        for period in periods:
            for figure in KpiFigure:
                for dimension in figure_dimensions(figure, layout.modules):
                    table.acc(area, period, figure, dimension)
    in_year = set(months)

    # Cohort: families registered in the year.
    consents_by_case: dict[str, set[str]] = defaultdict(set)
    for consent in inputs.consents:
        if consent.given:
            consents_by_case[consent.case_id].add(consent.scope)
    visited: set[str] = set()
    contacts: dict[str, int] = defaultdict(int)
    for fact in inputs.cohort_contacts:
        if fact.kind == FactKind.COMPLETED:
            visited.add(fact.case_id)
        contacts[fact.case_id] += 1
    for case in inputs.cohort:
        if case.registered_month not in in_year or case.bezirk is None or case.excluded:
            continue
        month, cid = case.registered_month, case.case_id
        figures = [KpiFigure.FAMILIES_REGISTERED]
        if case.channel == "clinic":
            figures.append(KpiFigure.FAMILIES_REGISTERED_CLINIC)
        elif case.channel == "move_in":
            figures.append(KpiFigure.FAMILIES_REGISTERED_MOVE_IN)
        for figure in figures:
            for acc in table.each(case.bezirk, month, figure):
                acc.value += 1
                acc.families.add(cid)
        for dimension, scope in CONSENT_DIMENSIONS.items():
            for acc in table.each(case.bezirk, month, KpiFigure.CONSENT_RATE, dimension):
                acc.families.add(cid)
                if scope in consents_by_case.get(cid, ()):
                    acc.hits.add(cid)
        for acc in table.each(case.bezirk, month, KpiFigure.REACH_RATE):
            acc.families.add(cid)
            if cid in visited:
                acc.hits.add(cid)
        for acc in table.each(case.bezirk, month, KpiFigure.CONTACTS_PER_FAMILY):
            acc.families.add(cid)
            acc.value += contacts.get(cid, 0)

    # Activity: what happened in the year.
    for fact in inputs.activity:
        if fact.month not in in_year:
            continue
        count_figure = _ACTIVITY_COUNT.get(FactKind(fact.kind))
        if count_figure is not None:
            dimensions: list[str | None] = [None]
            if fact.kind == FactKind.REQUESTED:
                status = inputs.statuses.get(fact.ref, ReferralStatus.REQUESTED.value)
                dimensions += [f"module:{fact.dimension}", f"status:{status}"]
            for dimension in dimensions:
                for acc in table.each(fact.bezirk, fact.month, count_figure, dimension):
                    acc.value += 1
                    acc.families.add(fact.case_id)
        if fact.kind == FactKind.COMPLETED and inputs.channels.get(fact.case_id) == "clinic":
            days = fact.number if fact.number is not None else 0.0
            for acc in table.each(fact.bezirk, fact.month, KpiFigure.MEDIAN_DAYS_BIRTH_TO_VISIT):
                acc.families.add(fact.case_id)
                # One value per family and cell: its first welcome visit.
                acc.numbers[fact.case_id] = min(days, acc.numbers.get(fact.case_id, days))
        if fact.kind in (FactKind.ACCEPTED, FactKind.REJECTED):
            for acc in table.each(fact.bezirk, fact.month, KpiFigure.ACCEPTANCE_RATE):
                acc.families.add(fact.case_id)
                acc.weight += 1
                if fact.kind == FactKind.ACCEPTED:
                    acc.value += 1
        if fact.kind == FactKind.FIRST_CONTACT:
            days = fact.number if fact.number is not None else 0.0
            for acc in table.each(fact.bezirk, fact.month, KpiFigure.MEDIAN_DAYS_TO_WARM_HANDOVER):
                acc.families.add(fact.case_id)
                acc.numbers[fact.ref] = days

    # Stock: escalations open at the end of each month; the year's value is its last month's.
    for month in months:
        end = month_end(month, layout.zone)
        for episode in inputs.escalations:
            if episode.at is None or episode.at >= end:
                continue
            if episode.until is not None and episode.until < end:
                continue
            for area in (episode.bezirk, STADT):
                periods_hit = [month, year] if month == months[-1] else [month]
                for period in periods_hit:
                    acc = table.acc(area, period, KpiFigure.OPEN_ESCALATIONS, None)
                    acc.value += 1
                    acc.families.add(episode.case_id)

    cells = _to_cells(table, layout, periods)
    sizes = {key: len(acc.families) for key, acc in table.cells.items()}
    return protect(cells, groups_of_year(layout, months, year), layout.k, sizes=sizes)


def _to_cells(table: _Table, layout: Layout, periods: list[str]) -> dict[CellKey, Cell]:
    cells: dict[CellKey, Cell] = {}
    for key, acc in table.cells.items():
        if key[0] not in layout.areas or key[1] not in periods:
            continue
        histogram: dict[float, int] = defaultdict(int)
        for number in acc.numbers.values():
            histogram[number] += 1
        summed = Accumulated(
            families=len(acc.families),
            value=acc.value,
            hits=len(acc.hits),
            weight=acc.weight,
            numbers=dict(histogram),
        )
        cells[key] = _cell(key, KpiFigure(key[2]), summed, layout.k)
    return cells


@dataclass(frozen=True)
class Group:
    """An additive relation: ``total`` is the sum of ``parts``. Publishing the total and all
    parts but one would give the missing part away."""

    total: CellKey
    parts: tuple[CellKey, ...]
    disjoint: bool = False
    """No family can be behind two parts (a family has one Bezirk, registration month and
    channel), so the families behind hidden parts add up."""


def groups_of_year(layout: Layout, months: list[str], year: str) -> list[Group]:
    """The additive relations between the count cells of one year."""
    groups: list[Group] = []
    periods = [*months, year]
    counts = [
        (figure, dimension)
        for figure in (*_FLOW_COUNTS, *_STOCK_COUNTS)
        for dimension in count_dimensions(figure, layout.modules)
    ]
    for figure, dimension in counts:
        dim = dimension or ""
        cohort = DEFINITIONS[figure].attribution is Attribution.COHORT
        for period in periods:  # the city is the sum of its Bezirke
            groups.append(
                Group(
                    (STADT, period, figure.value, dim),
                    tuple((b, period, figure.value, dim) for b in layout.bezirke),
                    disjoint=cohort,
                )
            )
        for area in layout.areas:  # a year is the sum of its months; a stock is its last month
            parts = months if figure not in _STOCK_COUNTS else months[-1:]
            groups.append(
                Group(
                    (area, year, figure.value, dim),
                    tuple((area, m, figure.value, dim) for m in parts),
                    disjoint=cohort,
                )
            )
    wholes = {
        whole: tuple(d.figure.value for d in FIGURES if d.part_of is whole)
        for whole in dict.fromkeys(d.part_of for d in FIGURES if d.part_of is not None)
    }
    for area in layout.areas:
        for period in periods:
            for whole, part_figures in wholes.items():
                groups.append(
                    Group(
                        (area, period, whole.value, ""),
                        tuple((area, period, part, "") for part in part_figures),
                        disjoint=True,
                    )
                )
            # A count is the sum of its breakdowns of one kind (scope breakdowns are rates).
            for figure in _FLOW_COUNTS:
                for kind in DEFINITIONS[figure].dimensions:
                    groups.append(
                        Group(
                            (area, period, figure.value, ""),
                            tuple(
                                (area, period, figure.value, d)
                                for d in _dimension_values(kind, layout.modules)
                            ),
                        )
                    )
    return groups


# Over 60 lines: the suppression rules (primary and complementary) must be read together;
# kept as it is while the projections are reworked (issue 19).
def protect(
    cells: Mapping[CellKey, Cell],
    groups: Sequence[Group],
    k: int,
    families: Mapping[CellKey, set[str]] | None = None,
    *,
    sizes: Mapping[CellKey, int] | None = None,
) -> list[Cell]:
    """Complementary suppression: make sure no suppressed cell can be computed back.

    ``cells`` come with primary suppression done (a count behind 1 … k-1 families, a ratio
    behind fewer than k). Then, for every additive group whose total is published, the
    suppressed parts must be at least two and stand for at least k families together;
    otherwise the smallest further non-zero part is suppressed as well (or, if none is left,
    the total), until every group holds. What can then be derived is only the sum of several
    suppressed parts covering at least k families: an aggregate that could have been
    published itself.

    ``families`` gives the (pseudonymous) families behind each cell, so the families behind
    hidden parts are their union. ``sizes`` gives only their number (what the incremental
    cells keep): hidden parts then stand for as many families as the biggest of them or as
    the total's families that the shown parts cannot account for, whichever is more (every
    family behind a total is behind one of its parts), or, where the group's parts cannot
    share a family (``Group.disjoint``), for their sum; each is never more than the union,
    so it hides at least as much. With neither, a count's
    value is taken as its number of families.

    Ratios (consent, reach, contacts per family) are published only where their base count,
    the families registered, is: a ratio with a hidden base would give the base away.
    """
    suppressed = {key for key, cell in cells.items() if cell.suppressed}
    # Suppressed cells no longer carry a value; the arithmetic needs the true ones.
    true_value: dict[CellKey, float]
    if families is not None:
        true_value = {key: float(len(families.get(key, ()))) for key in cells}
    elif sizes is not None:
        true_value = {key: float(sizes.get(key, 0)) for key in cells}
    else:
        true_value = {key: cell.value or 0.0 for key, cell in cells.items()}

    def behind(group: Group, hidden: list[CellKey]) -> int:
        if families is None:
            if sizes is not None and not group.disjoint:
                # Every family behind the total is behind some part, so the hidden parts
                # stand for at least those the shown parts cannot account for.
                shown = sum(true_value.get(p, 0.0) for p in group.parts if p not in hidden)
                unaccounted = true_value.get(group.total, 0.0) - shown
                return int(max(unaccounted, *(true_value[p] for p in hidden)))
            return int(sum(true_value[p] for p in hidden))
        union: set[str] = set()
        for part in hidden:
            union |= families.get(part, set())
        return len(union)

    changed = True
    while changed:
        changed = False
        for group in groups:
            if group.total not in cells or group.total in suppressed:
                continue
            hidden = [p for p in group.parts if p in suppressed]
            if not hidden or (len(hidden) >= 2 and behind(group, hidden) >= k):
                continue
            candidates = [
                p for p in group.parts if p in cells and p not in suppressed and true_value[p] > 0
            ]
            if candidates:
                suppressed.add(min(candidates, key=lambda p: (true_value[p], p)))
            else:
                suppressed.add(group.total)
            changed = True
    result: list[Cell] = []
    registered = KpiFigure.FAMILIES_REGISTERED.value
    for key in sorted(cells):
        cell = cells[key]
        hide = key in suppressed
        if not hide and key[2] in _COHORT_RATIO_NAMES:
            hide = (key[0], key[1], registered, "") in suppressed
        if hide and not cell.suppressed:
            cell = Cell(cell.bezirk, cell.period, cell.figure, cell.dimension, None, True)
        result.append(cell)
    return result


def changed_cells(
    cells: Iterable[Cell], published: Mapping[CellKey, tuple[float | None, bool]]
) -> list[Cell]:
    """The cells whose value or suppression differs from what was published."""
    return [cell for cell in cells if published.get(cell.key) != (cell.value, cell.suppressed)]


# --- incremental figures ---------------------------------------------------------------------
#
# A family's share of the figures is a pure function of its own facts (its case row, consents,
# facts and referrals). Applying events therefore means: compute the shares of the families
# the events touch before and after, and add the difference to the cells. A cell holds sums
# only (families, value, hits, weight and a histogram of the numbers its median needs), so
# publishing reads a year's cells, never a fact, and no cost grows with the history.

STOCK_DELTA = "open_escalations~delta"
"""Internal cell figure of the open-escalations stock: per area and month, how the number of
open episodes (``value``) and of families with one (``families``) changes at that month's
end. The stock of a month is the sum of the deltas up to it."""

_BIRTH_TO_VISIT = KpiFigure.MEDIAN_DAYS_BIRTH_TO_VISIT.value
_MEDIANS = figures_accumulating(Accumulation.MEDIAN)


@dataclass(slots=True)
class Share:
    """One family's part of one cell."""

    families: int = 1
    value: float = 0.0
    hits: int = 0
    weight: float = 0.0
    numbers: tuple[float, ...] = ()


Shares = dict[CellKey, Share]


@dataclass(slots=True)
class CellDelta:
    """What to add to one cell (and to its histogram)."""

    families: int = 0
    value: float = 0.0
    hits: int = 0
    weight: float = 0.0
    numbers: dict[float, int] = field(default_factory=dict)

    def is_zero(self) -> bool:
        return (
            not self.families
            and not self.value
            and not self.hits
            and not self.weight
            and not any(self.numbers.values())
        )


Part = tuple[str, str, str, str, float, int, float, float | None, bool]
"""One part of a family's share: (Bezirk, month, figure, dimension or "", value, hits,
weight, number or None, smallest). It counts the family in the four cells of that Bezirk
and month (and the city, and the year): ``value`` and ``weight`` add up, ``hits`` counts
the family once where it is 1, a ``number`` goes to the cell's median histogram, where
``smallest`` only the family's smallest number per cell (its first visit)."""


def family_parts(
    case: CaseFacts | None,
    consents: Iterable[ConsentFacts],
    facts: Sequence[Fact],
    referrals: Mapping[str, ReferralFacts],
) -> Iterator[Part]:
    """The parts of a family's share, escalations aside (:func:`_stock_shares`), by the same
    rules as :func:`compute_year`: the one statement of them that the live shares
    (:func:`family_shares`) and the replay's sums (``replay_cells``) both add up."""
    if case is not None and case.bezirk is not None and case.registered_month is not None:
        yield from _cohort_parts(case.bezirk, case.registered_month, case, consents, facts)
    channel = case.channel if case is not None else None
    for fact in facts:
        yield from _activity_parts(fact, channel, referrals)


def _cohort_parts(
    bezirk: str,
    month: str,
    case: CaseFacts,
    consents: Iterable[ConsentFacts],
    facts: Sequence[Fact],
) -> Iterator[Part]:
    yield (bezirk, month, _REGISTERED, "", 1.0, 0, 0.0, None, False)
    by_channel = _BY_CHANNEL.get(case.channel or "")
    if by_channel is not None:
        yield (bezirk, month, by_channel, "", 1.0, 0, 0.0, None, False)
    given = {c.scope for c in consents if c.given}
    for dimension, scope in CONSENT_DIMENSIONS.items():
        yield (bezirk, month, _CONSENT, dimension or "", 0.0, int(scope in given), 0.0, None, False)
    contacts = visited = 0
    for fact in facts:
        if fact.kind == FactKind.COMPLETED:
            contacts += 1
            visited = 1
        elif fact.kind == FactKind.FIRST_CONTACT:
            contacts += 1
    yield (bezirk, month, _REACH, "", 0.0, visited, 0.0, None, False)
    yield (bezirk, month, _CONTACTS, "", float(contacts), 0, 0.0, None, False)


def _activity_parts(
    fact: Fact, channel: str | None, referrals: Mapping[str, ReferralFacts]
) -> Iterator[Part]:
    kind, bezirk, month = fact.kind, fact.bezirk, fact.month
    if kind == FactKind.ESCALATED:
        return
    count_figure = _COUNTED.get(kind)
    if count_figure is not None:
        yield (bezirk, month, count_figure, "", 1.0, 0, 0.0, None, False)
        if kind == FactKind.REQUESTED:
            referral = referrals.get(fact.ref)
            status = referral.status if referral is not None else ReferralStatus.REQUESTED.value
            yield (
                bezirk,
                month,
                count_figure,
                f"module:{fact.dimension}",
                1.0,
                0,
                0.0,
                None,
                False,
            )
            yield (bezirk, month, count_figure, f"status:{status}", 1.0, 0, 0.0, None, False)
    days = fact.number if fact.number is not None else 0.0
    if kind == FactKind.COMPLETED and channel == "clinic":
        yield (bezirk, month, _BIRTH_TO_VISIT, "", 0.0, 0, 0.0, days, True)
    elif kind in (FactKind.ACCEPTED, FactKind.REJECTED):
        accepted = 1.0 if kind == FactKind.ACCEPTED else 0.0
        yield (bezirk, month, _ACCEPTANCE, "", accepted, 0, 1.0, None, False)
    elif kind == FactKind.FIRST_CONTACT:
        yield (bezirk, month, _HANDOVER_DAYS, "", 0.0, 0, 0.0, days, False)


_REGISTERED = KpiFigure.FAMILIES_REGISTERED.value
_BY_CHANNEL = {
    "clinic": KpiFigure.FAMILIES_REGISTERED_CLINIC.value,
    "move_in": KpiFigure.FAMILIES_REGISTERED_MOVE_IN.value,
}
_CONSENT = KpiFigure.CONSENT_RATE.value
_REACH = KpiFigure.REACH_RATE.value
_CONTACTS = KpiFigure.CONTACTS_PER_FAMILY.value
_ACCEPTANCE = KpiFigure.ACCEPTANCE_RATE.value
_HANDOVER_DAYS = KpiFigure.MEDIAN_DAYS_TO_WARM_HANDOVER.value
_COUNTED = {kind.value: figure.value for kind, figure in _ACTIVITY_COUNT.items()}


def family_shares(
    case_id: str,
    case: CaseFacts | None,
    consents: Iterable[ConsentFacts],
    facts: Iterable[Fact],
    referrals: Mapping[str, ReferralFacts],
    zone: ZoneInfo,
) -> Shares:
    """The family's share of every cell, by the same rules as :func:`compute_year`."""
    if case is not None and case.excluded:
        return {}  # a duplicate counts nowhere: the surviving case counts the family
    facts = list(facts)
    shares: Shares = {}
    for bezirk, month, figure, dimension, value, hits, weight, number, smallest in family_parts(
        case, consents, facts, referrals
    ):
        for area in (bezirk, STADT):
            for period in (month, month[:4]):
                share = shares.get((area, period, figure, dimension))
                if share is None:
                    share = shares[(area, period, figure, dimension)] = Share()
                share.value += value
                share.hits = max(share.hits, hits)
                share.weight += weight
                if number is not None:
                    if smallest:  # one value per family and cell: its first visit
                        share.numbers = (min((number, *share.numbers)),)
                    else:
                        share.numbers = (*share.numbers, number)
    shares.update(_stock_shares((f for f in facts if f.kind == FactKind.ESCALATED), zone))
    return shares


def _stock_shares(episodes: Iterable[Fact], zone: ZoneInfo) -> Shares:
    """Month-end deltas of open escalations. An episode is open at the end of month m when it
    began in m or earlier and ends in a later month (or not at all)."""
    changes: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    spans: dict[str, list[tuple[str, str | None]]] = defaultdict(list)
    for episode in episodes:
        if episode.at is None:
            continue
        start = episode.month
        end = None if episode.until is None else month_of(episode.until, zone)
        if end is not None and end <= start:
            continue  # closed within its month: never open at a month end
        for area in (episode.bezirk, STADT):
            spans[area].append((start, end))
            changes[(area, start)][0] += 1
            if end is not None:
                changes[(area, end)][0] -= 1
    # Families: +1 where the first of its open episodes begins, -1 where the last one ends.
    for area, intervals in spans.items():
        points = sorted({s for s, _ in intervals} | {e for _, e in intervals if e is not None})
        was_open = False
        for point in points:
            open_now = any(s <= point and (e is None or point < e) for s, e in intervals)
            if open_now != was_open:
                changes[(area, point)][1] += 1 if open_now else -1
                was_open = open_now
    return {
        (area, month, STOCK_DELTA, ""): Share(families=fams, value=float(value))
        for (area, month), (value, fams) in changes.items()
        if value or fams
    }


def cell_deltas(
    before: Mapping[str, Shares], after: Mapping[str, Shares]
) -> dict[CellKey, CellDelta]:
    """What changes in the cells when families' shares go from ``before`` to ``after``."""
    deltas: dict[CellKey, CellDelta] = {}

    def put(shares: Shares, sign: int) -> None:
        for key, share in shares.items():
            delta = deltas.get(key)
            if delta is None:
                delta = deltas[key] = CellDelta()
            delta.families += sign * share.families
            delta.value += sign * share.value
            delta.hits += sign * share.hits
            delta.weight += sign * share.weight
            for number in share.numbers:
                delta.numbers[number] = delta.numbers.get(number, 0) + sign

    for case_id in set(before) | set(after):
        old, new = before.get(case_id, {}), after.get(case_id, {})
        if old == new:
            continue
        put(old, -1)
        put(new, +1)
    for delta in deltas.values():
        delta.numbers = {n: c for n, c in delta.numbers.items() if c}
    return {key: delta for key, delta in deltas.items() if not delta.is_zero()}


@dataclass(slots=True)
class Accumulated:
    """A cell's sums over every family's share (as stored)."""

    families: int = 0
    value: float = 0.0
    hits: int = 0
    weight: float = 0.0
    numbers: dict[float, int] = field(default_factory=dict)

    def add(self, delta: CellDelta | Accumulated) -> None:
        self.families += delta.families
        self.value += delta.value
        self.hits += delta.hits
        self.weight += delta.weight
        for number, count in delta.numbers.items():
            self.numbers[number] = self.numbers.get(number, 0) + count


def accumulate(shares: Mapping[str, Shares]) -> dict[CellKey, Accumulated]:
    """The cells of all families' shares (what the stored cells hold after applying them)."""
    cells: dict[CellKey, Accumulated] = {}
    for key, delta in cell_deltas({}, shares).items():
        cells.setdefault(key, Accumulated()).add(delta)
    return cells


def median_of(histogram: Mapping[float, int]) -> float | None:
    """The median of a multiset given as value → count."""
    items = sorted((n, c) for n, c in histogram.items() if c > 0)
    total = sum(c for _, c in items)
    if not total:
        return None
    wanted = ((total - 1) // 2, total // 2)
    found: list[float] = []
    seen = 0
    for number, count in items:
        while len(found) < 2 and seen <= wanted[len(found)] < seen + count:
            found.append(number)
        seen += count
    return (found[0] + found[1]) / 2


def year_cells(
    year: int,
    horizon: str,
    layout: Layout,
    cells: Mapping[CellKey, Accumulated],
    stock_deltas: Mapping[tuple[str, str], Accumulated],
    figures: Collection[KpiFigure] | None = None,
) -> list[Cell]:
    """All cells of one year from the accumulated cells (its months and the year), the
    open-escalation stock from its month-end deltas (all months up to the year's end), then
    protected (:func:`protect`). Costs the number of cells, never the number of families.

    ``figures``: only the cells of these figures, which must be whole clusters
    (:func:`clusters_of`); they come out exactly as in the cells of every figure."""
    months = months_of_year(year, horizon)
    if not months:
        return []
    year_text = str(year)
    periods = [*months, year_text]
    # Stock: running sums of the deltas up to each month's end.
    running: dict[str, Accumulated] = defaultdict(Accumulated)
    stock: dict[tuple[str, str], Accumulated] = {}
    by_month = sorted(stock_deltas.items(), key=lambda item: item[0][1])
    position = 0
    for month in months:
        while position < len(by_month) and by_month[position][0][1] <= month:
            (area, _), delta = by_month[position]
            total = running[area]
            total.families += delta.families
            total.value += delta.value
            position += 1
        for area in layout.areas:
            now = running.get(area, Accumulated())
            stock[(area, month)] = Accumulated(families=now.families, value=now.value)
    for area in layout.areas:
        stock[(area, year_text)] = stock[(area, months[-1])]
    wanted = tuple(KpiFigure) if figures is None else tuple(f for f in KpiFigure if f in figures)
    columns = _columns(layout.modules, wanted)
    k = layout.k
    result: dict[CellKey, Cell] = {}
    sizes: dict[CellKey, int] = {}
    empty = Accumulated()
    for area in layout.areas:
        for period in periods:
            stocked = stock[area, period]
            for figure, name, dimension, is_stock, is_count in columns:
                key = (area, period, name, dimension or "")
                acc = stocked if is_stock else cells.get(key, empty)
                n = acc.families
                sizes[key] = n
                if is_count:
                    # A zero describes no family; 1 … k-1 families could be singled out.
                    hidden = 0 < n < k
                    value = None if hidden else acc.value
                    result[key] = Cell(area, period, figure, dimension, value, hidden)
                else:
                    result[key] = _cell(key, figure, acc, k)
    groups = _groups_of_year(layout, tuple(months), year_text)
    if figures is not None:
        # No group spans two clusters, and protect() settles each group in the same order
        # as among all groups: the clusters' cells come out as in the whole year.
        names = {figure.value for figure in wanted}
        groups = [group for group in groups if group.total[2] in names]
    return protect(result, groups, layout.k, sizes=sizes)


@functools.lru_cache(maxsize=64)
def _columns(
    modules: tuple[str, ...], figures: tuple[KpiFigure, ...]
) -> tuple[tuple[KpiFigure, str, str | None, bool, bool], ...]:
    # An area's period has these cells, in this order, on every pass: (figure, its name,
    # dimension, a stock count, suppressed as a count), worked out once per layout.
    return tuple(
        (
            figure,
            figure.value,
            dimension,
            figure in _STOCK_COUNTS,
            DEFINITIONS[figure].suppression is Suppression.COUNT,
        )
        for figure in figures
        for dimension in figure_dimensions(figure, modules)
    )


@functools.lru_cache(maxsize=64)
def _groups_of_year(layout: Layout, months: tuple[str, ...], year: str) -> list[Group]:
    # The same for every pass over a year until its months grow: built once.
    return groups_of_year(layout, list(months), year)


@functools.lru_cache(maxsize=16)
def _clusters(layout: Layout) -> dict[str, frozenset[KpiFigure]]:
    """Each figure's cluster: the figures its cells' suppression can depend on, i.e. joined
    by an additive group (:func:`groups_of_year`) or by a cohort ratio's base."""
    parent = {figure.value: figure.value for figure in KpiFigure}

    def root(name: str) -> str:
        while parent[name] != name:
            name = parent[name]
        return name

    def join(one: str, other: str) -> None:
        parent[root(one)] = root(other)

    months = months_of_year(2000, "2000-12")
    for group in groups_of_year(layout, months, "2000"):
        for part in group.parts:
            join(part[2], group.total[2])
    for ratio in _COHORT_RATIOS:
        join(ratio.value, KpiFigure.FAMILIES_REGISTERED.value)
    members: dict[str, set[KpiFigure]] = defaultdict(set)
    for figure in KpiFigure:
        members[root(figure.value)].add(figure)
    return {figure.value: frozenset(members[root(figure.value)]) for figure in KpiFigure}


def clusters_of(figures: Iterable[str], layout: Layout) -> frozenset[KpiFigure]:
    """The figures whose cells must be recomputed when the cells of ``figures`` changed:
    their whole clusters (``STOCK_DELTA`` stands for the open-escalation stock)."""
    clusters = _clusters(layout)
    found: set[KpiFigure] = set()
    for name in figures:
        found |= clusters[KpiFigure.OPEN_ESCALATIONS.value if name == STOCK_DELTA else name]
    return frozenset(found)


def changed_figures(
    before: Mapping[CellKey, Accumulated], after: Mapping[CellKey, Accumulated]
) -> set[str]:
    """The figures with a cell whose sums differ between ``before`` and ``after``."""
    empty = Accumulated()
    return {
        key[2]
        for key in before.keys() | after.keys()
        if before.get(key, empty) != after.get(key, empty)
    }


def _cell(key: CellKey, figure: KpiFigure, acc: Accumulated, k: int) -> Cell:
    n = acc.families
    value: float | None
    definition = DEFINITIONS[figure]
    if definition.suppression is Suppression.COUNT:
        value = acc.value
        # A zero describes no family; 1 … k-1 families could be singled out.
        suppressed = 0 < n < k
    else:
        value = _accumulated_value(figure, acc)
        suppressed = n < k or value is None
        if definition.accumulates is Accumulation.RATE:
            # A rate from a small numerator or denominator tells about single families.
            numerator, denominator = _rate_terms(figure, acc)
            suppressed = suppressed or numerator < k or denominator < k
    return Cell(
        bezirk=key[0],
        period=key[1],
        figure=figure,
        dimension=key[3] or None,
        value=None if suppressed else value,
        suppressed=suppressed,
    )


def _rate_terms(figure: KpiFigure, acc: Accumulated) -> tuple[float, float]:
    if figure is KpiFigure.ACCEPTANCE_RATE:
        return acc.value, acc.weight
    return float(acc.hits), float(acc.families)


def _accumulated_value(figure: KpiFigure, acc: Accumulated) -> float | None:
    n = acc.families
    accumulates = DEFINITIONS[figure].accumulates
    if accumulates is Accumulation.MEDIAN:
        found = median_of(acc.numbers)
        return None if found is None else round(float(found), 1)
    if accumulates is Accumulation.PER_FAMILY:
        return round(acc.value / n, 2) if n else None
    numerator, denominator = _rate_terms(figure, acc)
    return round(100.0 * numerator / denominator, 1) if denominator else None


def shares_of(snapshot: Snapshot, case_ids: Iterable[str], zone: ZoneInfo) -> dict[str, Shares]:
    """The shares of these families from the rows in ``snapshot`` (which must hold all of
    each family's rows: see :attr:`Needs.families`)."""
    wanted = set(case_ids)
    facts: dict[str, list[Fact]] = defaultdict(list)
    for fact in snapshot.facts.values():
        if fact.case_id in wanted:
            facts[fact.case_id].append(fact)
    consents: dict[str, list[ConsentFacts]] = defaultdict(list)
    for consent in snapshot.consents.values():
        if consent.case_id in wanted:
            consents[consent.case_id].append(consent)
    referrals: dict[str, dict[str, ReferralFacts]] = defaultdict(dict)
    for referral in snapshot.referrals.values():
        if referral.case_id in wanted:
            referrals[referral.case_id][referral.referral_id] = referral
    return {
        case_id: family_shares(
            case_id,
            snapshot.cases.get(case_id),
            consents.get(case_id, ()),
            facts.get(case_id, ()),
            referrals.get(case_id, {}),
            zone,
        )
        for case_id in wanted
    }


def families_of(event: EventModel) -> set[str]:
    """The families whose shares an event can change."""
    found: set[str] = set()
    for name in ("case_id", "merged_case_id"):
        value = getattr(event, name, None)
        if isinstance(value, str):
            found.add(value)
    return found
