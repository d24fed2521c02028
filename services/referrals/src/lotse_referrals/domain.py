"""Pure rules of the referrals service: no I/O, no database, no clock of its own.

- The referral lifecycle follows the FHIR Task statuses (requested → received → accepted |
  rejected → in-progress → completed; cancelled by the requester while open). Who may take
  which step is part of the rule: the requesting side (Familienbüro, Babylotse, Bezirksteam;
  the system for consent withdrawals and erasures) requests and cancels, and only the
  addressed Träger (provider agency) receives, accepts, rejects, starts and completes.
  The first contact with the family is a marker, not a status: "warm handover" means
  accepted and first contact confirmed.
- The consent gate (§ 65 SGB VIII): contact data may be passed to a Träger only on a
  ``traeger_contact`` consent of the family that names that Träger and covers the module.
- Working days for escalations: weekends and the public holidays of the city's federal
  state do not count (NRW for Dortmund and Hamm).
- The offer catalogue's suggestions: Träger that offer a module in a Stadtbezirk (city
  district), free capacity first.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Iterable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from enum import StrEnum
from zoneinfo import ZoneInfo

from lotse_contracts.events.common import ConsentScope, ConsentState
from lotse_contracts.events.partner import PartnerAnswer
from lotse_contracts.events.referrals import PersonalField, ReferralStatus

# --- lifecycle ----------------------------------------------------------------------------


class Actor(StrEnum):
    """Which side of a referral acts: the requesting side, the addressed Träger, the system."""

    REQUESTER = "requester"
    TRAEGER = "traeger"
    SYSTEM = "system"


class Step(StrEnum):
    """A change to a referral after it was requested (the FHIR Task status it leads to,
    plus ``first-contact``, which confirms the warm handover without changing the status)."""

    RECEIVED = "received"
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    IN_PROGRESS = "in-progress"
    FIRST_CONTACT = "first-contact"
    COMPLETED = "completed"
    CANCELLED = "cancelled"

    @classmethod
    def from_answer(cls, answer: PartnerAnswer) -> Step:
        """The step a Träger's answer over Kafka asks for (same names)."""
        return cls(answer.value)


S = ReferralStatus
OPEN_STATUSES: frozenset[ReferralStatus] = frozenset(
    {S.REQUESTED, S.RECEIVED, S.ACCEPTED, S.IN_PROGRESS}
)
"""Statuses in which a referral is still running (and may be cancelled)."""
FINAL_STATUSES: frozenset[ReferralStatus] = frozenset({S.REJECTED, S.COMPLETED, S.CANCELLED})
FREES_A_PLACE: frozenset[Step] = frozenset({Step.REJECTED, Step.CANCELLED})
"""Steps after which the referral no longer holds a place of its Träger this month."""
AWAITING_ANSWER: frozenset[ReferralStatus] = frozenset({S.REQUESTED, S.RECEIVED})
"""Statuses in which the Träger still owes its decision (accept or reject): these escalate."""


@dataclass(frozen=True)
class _Rule:
    sources: frozenset[ReferralStatus]
    actors: frozenset[Actor]
    target: ReferralStatus | None  # None: the status stays (first contact)


_RULES: dict[Step, _Rule] = {
    Step.RECEIVED: _Rule(frozenset({S.REQUESTED}), frozenset({Actor.TRAEGER}), S.RECEIVED),
    Step.ACCEPTED: _Rule(
        frozenset({S.REQUESTED, S.RECEIVED}), frozenset({Actor.TRAEGER}), S.ACCEPTED
    ),
    Step.REJECTED: _Rule(
        frozenset({S.REQUESTED, S.RECEIVED}), frozenset({Actor.TRAEGER}), S.REJECTED
    ),
    Step.IN_PROGRESS: _Rule(frozenset({S.ACCEPTED}), frozenset({Actor.TRAEGER}), S.IN_PROGRESS),
    Step.FIRST_CONTACT: _Rule(
        frozenset({S.ACCEPTED, S.IN_PROGRESS}), frozenset({Actor.TRAEGER}), None
    ),
    Step.COMPLETED: _Rule(frozenset({S.IN_PROGRESS}), frozenset({Actor.TRAEGER}), S.COMPLETED),
    Step.CANCELLED: _Rule(OPEN_STATUSES, frozenset({Actor.REQUESTER, Actor.SYSTEM}), S.CANCELLED),
}


class TransitionRefused(ValueError):
    """A step that the state machine or the actor rules do not allow; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _names(statuses: Iterable[ReferralStatus]) -> str:
    order = list(ReferralStatus)
    return " or ".join(s.value for s in sorted(statuses, key=order.index))


def apply_step(
    status: ReferralStatus, step: Step, actor: Actor, *, first_contact_confirmed: bool
) -> ReferralStatus:
    """The status after ``step``; raises :class:`TransitionRefused` with the reason when the
    step is illegal from ``status`` or not ``actor``'s to take."""
    rule = _RULES[step]
    if actor not in rule.actors:
        if Actor.TRAEGER in rule.actors:
            raise TransitionRefused(
                f"only the addressed Träger may set {step.value}; "
                "the requesting side may only cancel"
            )
        raise TransitionRefused(
            "only the requesting side may cancel a referral; "
            "a Träger rejects it (before accepting) or completes it instead"
        )
    if status in FINAL_STATUSES:
        raise TransitionRefused(
            f"the referral is {status.value}, which is final: {step.value} is no longer possible"
        )
    if status not in rule.sources:
        raise TransitionRefused(
            f"{step.value} is only possible from {_names(rule.sources)}; "
            f"the referral is {status.value}"
        )
    if step is Step.FIRST_CONTACT and first_contact_confirmed:
        raise TransitionRefused("the first contact of this referral is already confirmed")
    return rule.target or status


def warm_handover_done(status: ReferralStatus, first_contact_confirmed: bool) -> bool:
    """Accepted (or further on) and the first contact confirmed."""
    return first_contact_confirmed and status in (S.ACCEPTED, S.IN_PROGRESS, S.COMPLETED)


# --- consent gate (§ 65 SGB VIII) ----------------------------------------------------------


@dataclass(frozen=True)
class ConsentView:
    """What the gate needs to know of one consent of the family."""

    consent_id: str
    case_id: str
    scope: ConsentScope
    traeger: str | None
    purpose: str | None
    state: ConsentState


def consent_problem(
    consent: ConsentView | None, *, case_id: str, traeger: str, module: str
) -> str | None:
    """Why ``consent`` does not allow passing the family's contact data to ``traeger`` for
    ``module``, or None when it does.

    The consent must be the family's own, in force, of scope ``traeger_contact`` and name
    the Träger: § 65 SGB VIII needs a named recipient, so a consent without a Träger covers
    nobody. A consent without a purpose covers every module of the named Träger; one with a
    purpose covers that module only.
    """
    if consent is None:
        return "no consent with this id is known for the case"
    if consent.case_id != case_id:
        return "the consent belongs to another case"
    if consent.scope is not ConsentScope.TRAEGER_CONTACT:
        return f"the consent has scope {consent.scope.value}, not traeger_contact"
    if consent.state is not ConsentState.GIVEN:
        return "the consent was withdrawn"
    if consent.traeger is None:
        return "the consent names no Träger; passing contact data needs a named recipient"
    if consent.traeger != traeger:
        return f"the consent covers Träger {consent.traeger}, not {traeger}"
    if consent.purpose is not None and consent.purpose != module:
        return f"the consent covers the purpose {consent.purpose}, not {module}"
    return None


def covering_consents(
    consents: Iterable[ConsentView], *, case_id: str, traeger: str, module: str
) -> list[ConsentView]:
    """The consents of a case that cover this Träger and module."""
    return [
        c
        for c in consents
        if consent_problem(c, case_id=case_id, traeger=traeger, module=module) is None
    ]


# --- disclosure ---------------------------------------------------------------------------

CONTACT_FIELDS: tuple[PersonalField, ...] = (
    PersonalField.FAMILY_NAME,
    PersonalField.PARENT_GIVEN_NAMES,
    PersonalField.STREET,
    PersonalField.HOUSE_NUMBER,
    PersonalField.POSTCODE,
    PersonalField.CITY,
    PersonalField.PHONE,
    PersonalField.EMAIL,
)
"""What a ``traeger_contact`` consent covers: the data needed to contact the family. The
children's names and birth dates are not contact data and are not passed on."""


def disclosure_fields(
    covered: Iterable[PersonalField],
    wanted: Iterable[PersonalField] | None,
    present: Iterable[str],
) -> list[PersonalField]:
    """The fields a disclosure contains: those the consent covers, narrowed to the ones the
    requester chose (if any), and only those the family actually gave. Raises
    ``ValueError`` naming wanted fields the consent does not cover."""
    covered_set = set(covered)
    chosen = covered_set if wanted is None else set(wanted)
    outside = sorted(f.value for f in chosen - covered_set)
    if outside:
        raise ValueError(f"the consent does not cover {', '.join(outside)}")
    have = set(present)
    return [f for f in PersonalField if f in chosen and f.value in have]


# --- working days and escalation ----------------------------------------------------------


class WorkingCalendar:
    """Monday to Friday without public holidays."""

    def __init__(self, holidays: Container[date]) -> None:
        self._holidays = holidays

    @classmethod
    def for_region(cls, country: str = "DE", subdivision: str | None = "NW") -> WorkingCalendar:
        """The public holidays of a country (and federal state) from the ``holidays`` package,
        which computes them for any year (Easter-dependent ones included)."""
        import holidays

        return cls(holidays.country_holidays(country, subdiv=subdivision))

    def is_working_day(self, day: date) -> bool:
        return day.weekday() < 5 and day not in self._holidays

    def add_working_days(self, start: date, days: int) -> date:
        """The ``days``-th working day after ``start`` (``start`` itself does not count)."""
        if days < 0:
            raise ValueError("days must not be negative")
        current = start
        counted = 0
        while counted < days:
            current += timedelta(days=1)
            if self.is_working_day(current):
                counted += 1
        return current

    def working_days_between(self, start: date, end: date) -> int:
        """Working days after ``start`` up to and including ``end`` (0 if end <= start)."""
        count = 0
        current = start
        while current < end:
            current += timedelta(days=1)
            if self.is_working_day(current):
                count += 1
        return count


def local_date(moment: datetime, zone: ZoneInfo) -> date:
    """The calendar day of an aware moment in the city's time zone."""
    return moment.astimezone(zone).date()


def answer_due_by(
    requested_on: date, *, urgent: bool, days: int, urgent_days: int, calendar: WorkingCalendar
) -> date:
    """Last day for the Träger's decision: N working days after the request day."""
    return calendar.add_working_days(requested_on, urgent_days if urgent else days)


def wish_escalation_due(
    created_on: date, today: date, *, days: int, calendar: WorkingCalendar
) -> bool:
    """Whether an open wish is to be escalated: still open after ``days`` working days."""
    return today > calendar.add_working_days(created_on, days)


def escalation_due(
    status: ReferralStatus, due_by: date, today: date, *, already_escalated: bool
) -> bool:
    """Whether a referral must be escalated now: still waiting for the decision after its
    last day for an answer, and not escalated before (an escalation happens once)."""
    return not already_escalated and status in AWAITING_ANSWER and today > due_by


# --- offer catalogue ----------------------------------------------------------------------


@dataclass(frozen=True)
class Offer:
    """One Träger as the catalogue holds it, with its load in the current month."""

    traeger: str
    name: str
    modules: tuple[str, ...]
    bezirke: tuple[str, ...]
    capacity_per_month: int
    used_this_month: int
    active: bool = True

    @property
    def free_capacity(self) -> int:
        return max(0, self.capacity_per_month - self.used_this_month)

    def serves(self, bezirk: str) -> bool:
        return "*" in self.bezirke or bezirk in self.bezirke

    def offers(self, module: str) -> bool:
        return module in self.modules


def suggest(offers: Iterable[Offer], *, bezirk: str, module: str) -> list[Offer]:
    """Active Träger offering ``module`` in ``bezirk``: free capacity first (most free
    places first), then those without free places; ties by name."""
    matching = [o for o in offers if o.active and o.offers(module) and o.serves(bezirk)]
    return sorted(matching, key=lambda o: (o.free_capacity == 0, -o.free_capacity, o.name))


def offer_problem(offer: Offer | None, *, traeger: str, bezirk: str, module: str) -> str | None:
    """Why a referral of a family in ``bezirk`` to ``traeger`` for ``module`` cannot be
    made from the catalogue's point of view (capacity aside), or None."""
    if offer is None:
        return f"unknown Träger {traeger}"
    if not offer.active:
        return f"Träger {traeger} takes no referrals at present"
    if not offer.offers(module):
        return f"Träger {traeger} does not offer {module}"
    if not offer.serves(bezirk):
        return f"Träger {traeger} does not offer {module} in Stadtbezirk {bezirk}"
    return None


def month_start(today: date) -> date:
    return today.replace(day=1)


def pick(candidates: Sequence[Offer], acceptable: Callable[[Offer], bool]) -> Offer | None:
    """The first suggestion with free capacity that ``acceptable`` allows (e.g. consent)."""
    for offer in candidates:
        if offer.free_capacity > 0 and acceptable(offer):
            return offer
    return None
