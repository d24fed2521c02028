"""Ground truth: what the simulator did to the platform and what must follow from it.

One JSON file per run (:func:`save` / :func:`load`). For every family: the case id the
platform gave it, its consents and which were withdrawn, its welcome visits with the outcome
recorded, its referral with the Träger's answers, an erasure; and the state each of them must
end in (:attr:`ReferralTruth.expected_status`, :meth:`FamilyTruth.expects_open_visit`).
The expected key figures per Stadtbezirk and month (:func:`expected_kpis`) are computed from
these records alone, by the reporting service's attribution rules: registrations count in
the month of registration, visits and referrals in the month they happened (a no-show in
the month of the missed appointment), all in the city's time zone.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from lotse_contracts.figures import CITY_TOTAL, Accumulation, KpiFigure, figures_accumulating

#: Count figures the checker compares with the published ones: the flows, as declared.
CHECKED_FIGURES = figures_accumulating(Accumulation.COUNT)

OPEN_REFERRAL = frozenset({"requested", "received", "accepted", "in-progress"})
#: The referral status a Träger's answer leads to (first contact keeps the status).
ANSWER_STATUS = {
    "received": "received",
    "accepted": "accepted",
    "rejected": "rejected",
    "in-progress": "in-progress",
    "completed": "completed",
}


@dataclass
class ConsentTruth:
    consent_id: str
    scope: str
    traeger: str | None = None
    purpose: str | None = None
    given_at: str = ""
    withdrawn_at: str | None = None

    @property
    def state(self) -> str:
        return "withdrawn" if self.withdrawn_at else "given"


@dataclass
class VisitTruth:
    visit_id: str
    starts_at: str
    scheduled_at: str
    status: str = "scheduled"
    """scheduled, completed, missed, declined or cancelled — as the simulator left it."""
    closed_at: str | None = None


@dataclass
class AnswerTruth:
    answer: str
    at: str
    reason: str | None = None


@dataclass
class ReferralTruth:
    module: str
    traeger: str
    consent_id: str
    handover_id: str
    referral_id: str | None = None
    requested_at: str | None = None
    answers: list[AnswerTruth] = field(default_factory=list)
    cancelled_at: str | None = None
    expected_status: str = "requested"
    first_contact: bool = False
    traeger_named: str = "at_consent"
    """at_consent, by_familienbuero or never (plan.ReferralPlan.traeger_named); unless
    at_consent the handover named no Träger and waited as an open wish."""
    wish_id: str | None = None
    """The platform's wish for the handover, as the simulator saw it while it waited."""

    def apply_answer(self, answer: AnswerTruth) -> None:
        self.answers.append(answer)
        if answer.answer == "first-contact":
            self.first_contact = True
        else:
            self.expected_status = ANSWER_STATUS[answer.answer]

    def cancel(self, at: str) -> None:
        if self.referral_id is not None and self.expected_status in OPEN_REFERRAL:
            self.expected_status = "cancelled"
            self.cancelled_at = at


@dataclass
class FamilyTruth:
    key: str
    case_id: str
    channel: str
    bezirk: str
    registered_at: str
    consents: list[ConsentTruth] = field(default_factory=list)
    visits: list[VisitTruth] = field(default_factory=list)
    visit_outcome_planned: str | None = None
    referral: ReferralTruth | None = None
    erased_at: str | None = None

    def consent(self, scope: str) -> ConsentTruth | None:
        found = [c for c in self.consents if c.scope == scope]
        return found[-1] if found else None

    @property
    def welcome_consent_in_force(self) -> bool:
        consent = self.consent("welcome_visit")
        return consent is not None and consent.withdrawn_at is None

    def expects_open_visit(self) -> bool:
        """Whether a scheduled visit may remain: never for erased or withdrawn families."""
        return self.erased_at is None and self.welcome_consent_in_force

    def open_visit(self) -> VisitTruth | None:
        found = [v for v in self.visits if v.status == "scheduled"]
        return found[-1] if found else None


@dataclass
class Truth:
    city: str
    seed: int
    year: int
    plan_digest: str
    families: list[FamilyTruth] = field(default_factory=list)
    started_at: str = ""
    finished_at: str = ""
    sim_started_at: str = ""
    sim_finished_at: str = ""
    problems: list[str] = field(default_factory=list)
    """What the platform refused or never did while the simulator drove it."""
    expected_kpis: list[dict[str, Any]] = field(default_factory=list)

    def family(self, key: str) -> FamilyTruth:
        for family in self.families:
            if family.key == key:
                return family
        raise KeyError(key)


# -- expected key figures ------------------------------------------------------------------------


def _month(moment: str, zone: ZoneInfo) -> str:
    return datetime.fromisoformat(moment).astimezone(zone).strftime("%Y-%m")


def expected_kpis(truth: Truth, zone: ZoneInfo) -> dict[tuple[str, str, str], float]:
    """(bezirk or ``stadt``, period ``YYYY-MM`` or ``YYYY``, figure) → count."""
    counts: Counter[tuple[str, str, str]] = Counter()

    def count(bezirk: str, moment: str | None, figure: KpiFigure) -> None:
        if moment is None:
            return
        month = _month(moment, zone)
        for area in (bezirk, CITY_TOTAL):
            for period in (month, month[:4]):
                counts[(area, period, figure.value)] += 1

    for family in truth.families:
        count(family.bezirk, family.registered_at, KpiFigure.FAMILIES_REGISTERED)
        count(
            family.bezirk,
            family.registered_at,
            KpiFigure.FAMILIES_REGISTERED_CLINIC
            if family.channel == "clinic"
            else KpiFigure.FAMILIES_REGISTERED_MOVE_IN,
        )
        for visit in family.visits:
            count(family.bezirk, visit.scheduled_at, KpiFigure.VISITS_OFFERED)
            if visit.status == "completed":
                count(family.bezirk, visit.closed_at, KpiFigure.VISITS_COMPLETED)
            elif visit.status == "declined":
                count(family.bezirk, visit.closed_at, KpiFigure.VISITS_DECLINED)
            elif visit.status == "missed":
                count(family.bezirk, visit.starts_at, KpiFigure.VISITS_MISSED)
        referral = family.referral
        if referral is not None and referral.referral_id is not None:
            count(family.bezirk, referral.requested_at, KpiFigure.REFERRALS_REQUESTED)
            for answer in referral.answers:
                if answer.answer == "accepted":
                    count(family.bezirk, answer.at, KpiFigure.REFERRALS_ACCEPTED)
    return dict(counts)


# -- files ---------------------------------------------------------------------------------------


def save(truth: Truth, path: Path, zone: ZoneInfo) -> None:
    truth.expected_kpis = [
        {"bezirk": b, "period": p, "figure": f, "value": v}
        for (b, p, f), v in sorted(expected_kpis(truth, zone).items())
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(truth), indent=1, ensure_ascii=False) + "\n")


def load(path: Path) -> Truth:
    raw = json.loads(path.read_text())
    families = []
    for item in raw.pop("families"):
        referral = item.pop("referral")
        families.append(
            FamilyTruth(
                consents=[ConsentTruth(**c) for c in item.pop("consents")],
                visits=[VisitTruth(**v) for v in item.pop("visits")],
                referral=None
                if referral is None
                else ReferralTruth(
                    answers=[AnswerTruth(**a) for a in referral.pop("answers")], **referral
                ),
                **item,
            )
        )
    return Truth(families=families, **raw)
