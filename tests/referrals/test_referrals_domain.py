"""The pure rules of the referrals service: lifecycle with actor rules, consent gate,
disclosure fields, working days with NRW holidays, escalation, catalogue suggestions."""

from __future__ import annotations

from datetime import date

import pytest
from lotse_contracts.events.common import ConsentScope, ConsentState
from lotse_contracts.events.referrals import PersonalField, ReferralStatus
from lotse_referrals.domain import (
    CONTACT_FIELDS,
    FINAL_STATUSES,
    Actor,
    ConsentView,
    Offer,
    Step,
    TransitionRefused,
    WorkingCalendar,
    answer_due_by,
    apply_step,
    consent_problem,
    disclosure_fields,
    escalation_due,
    offer_problem,
    pick,
    suggest,
    warm_handover_done,
)

S = ReferralStatus

# (from, step) -> to, for the addressed Träger; cancellation for the requester.
LEGAL: dict[tuple[ReferralStatus, Step], ReferralStatus] = {
    (S.REQUESTED, Step.RECEIVED): S.RECEIVED,
    (S.REQUESTED, Step.ACCEPTED): S.ACCEPTED,
    (S.REQUESTED, Step.REJECTED): S.REJECTED,
    (S.RECEIVED, Step.ACCEPTED): S.ACCEPTED,
    (S.RECEIVED, Step.REJECTED): S.REJECTED,
    (S.ACCEPTED, Step.IN_PROGRESS): S.IN_PROGRESS,
    (S.ACCEPTED, Step.FIRST_CONTACT): S.ACCEPTED,
    (S.IN_PROGRESS, Step.FIRST_CONTACT): S.IN_PROGRESS,
    (S.IN_PROGRESS, Step.COMPLETED): S.COMPLETED,
    (S.REQUESTED, Step.CANCELLED): S.CANCELLED,
    (S.RECEIVED, Step.CANCELLED): S.CANCELLED,
    (S.ACCEPTED, Step.CANCELLED): S.CANCELLED,
    (S.IN_PROGRESS, Step.CANCELLED): S.CANCELLED,
}


def _owner(step: Step) -> Actor:
    return Actor.REQUESTER if step is Step.CANCELLED else Actor.TRAEGER


@pytest.mark.parametrize(("status", "step"), sorted(LEGAL, key=str))
def test_every_legal_step_leads_to_its_status(status: ReferralStatus, step: Step) -> None:
    assert (
        apply_step(status, step, _owner(step), first_contact_confirmed=False)
        == LEGAL[(status, step)]
    )


ILLEGAL = [(s, step) for s in ReferralStatus for step in Step if (s, step) not in LEGAL]


@pytest.mark.parametrize(("status", "step"), ILLEGAL, ids=[f"{s}-{t}" for s, t in ILLEGAL])
def test_every_illegal_step_is_refused_with_a_reason(status: ReferralStatus, step: Step) -> None:
    with pytest.raises(TransitionRefused) as refused:
        apply_step(status, step, _owner(step), first_contact_confirmed=False)
    reason = refused.value.reason
    assert step.value in reason
    if status in FINAL_STATUSES:
        assert "final" in reason
    else:
        assert "only possible from" in reason
        assert status.value in reason


@pytest.mark.parametrize(
    "step", [Step.RECEIVED, Step.ACCEPTED, Step.REJECTED, Step.IN_PROGRESS, Step.COMPLETED]
)
@pytest.mark.parametrize("actor", [Actor.REQUESTER, Actor.SYSTEM])
def test_only_the_traeger_answers(step: Step, actor: Actor) -> None:
    # From a status where the Träger could take the step: the actor alone is the reason.
    source = next(s for (s, t) in LEGAL if t is step)
    with pytest.raises(TransitionRefused, match="only the addressed Träger"):
        apply_step(source, step, actor, first_contact_confirmed=False)


def test_only_the_requesting_side_cancels() -> None:
    with pytest.raises(TransitionRefused, match="only the requesting side may cancel"):
        apply_step(S.ACCEPTED, Step.CANCELLED, Actor.TRAEGER, first_contact_confirmed=False)
    assert (
        apply_step(S.ACCEPTED, Step.CANCELLED, Actor.SYSTEM, first_contact_confirmed=False)
        is S.CANCELLED
    )


def test_first_contact_is_confirmed_once() -> None:
    with pytest.raises(TransitionRefused, match="already confirmed"):
        apply_step(S.IN_PROGRESS, Step.FIRST_CONTACT, Actor.TRAEGER, first_contact_confirmed=True)


def test_warm_handover_needs_acceptance_and_first_contact() -> None:
    assert warm_handover_done(S.ACCEPTED, True)
    assert warm_handover_done(S.COMPLETED, True)
    assert not warm_handover_done(S.ACCEPTED, False)
    assert not warm_handover_done(S.CANCELLED, True)


# --- consent gate ---------------------------------------------------------------------------

CASE = "3f6c1a9e-8b2d-4c71-9e55-2a7d0f4b8c13"


def consent(**changes: object) -> ConsentView:
    values: dict[str, object] = {
        "consent_id": "7d3b1f5a-9c2e-4d86-b4a0-3e6f8c2d1b97",
        "case_id": CASE,
        "scope": ConsentScope.TRAEGER_CONTACT,
        "traeger": "hebammenzentrum-dortmund",
        "purpose": "familienhebamme",
        "state": ConsentState.GIVEN,
    }
    values.update(changes)
    return ConsentView(**values)  # type: ignore[arg-type]


def problem(c: ConsentView | None, traeger: str = "hebammenzentrum-dortmund") -> str | None:
    return consent_problem(c, case_id=CASE, traeger=traeger, module="familienhebamme")


def test_a_given_consent_for_this_traeger_and_purpose_covers_the_referral() -> None:
    assert problem(consent()) is None
    assert problem(consent(purpose=None)) is None  # all modules of the named Träger


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"state": ConsentState.WITHDRAWN}, "withdrawn"),
        ({"scope": ConsentScope.WELCOME_VISIT}, "scope welcome_visit"),
        ({"traeger": "elternberatung-unterwegs"}, "covers Träger elternberatung-unterwegs"),
        ({"traeger": None}, "names no Träger"),
        ({"purpose": "elternschule"}, "purpose elternschule"),
        ({"case_id": "00000000-0000-4000-8000-000000000000"}, "another case"),
    ],
)
def test_a_consent_that_does_not_cover_says_why(changes: dict[str, object], reason: str) -> None:
    found = problem(consent(**changes))
    assert found is not None
    assert reason in found


def test_no_consent_at_all() -> None:
    assert problem(None) == "no consent with this id is known for the case"


# --- disclosure -----------------------------------------------------------------------------


def test_disclosure_holds_covered_fields_the_family_gave() -> None:
    present = ["family_name", "phone", "child_given_names", "child_birth_dates", "postcode"]
    assert disclosure_fields(CONTACT_FIELDS, None, present) == [
        PersonalField.FAMILY_NAME,
        PersonalField.POSTCODE,
        PersonalField.PHONE,
    ]


def test_disclosure_may_be_narrowed_but_never_widened() -> None:
    present = ["family_name", "phone", "email"]
    assert disclosure_fields(CONTACT_FIELDS, [PersonalField.PHONE], present) == [
        PersonalField.PHONE
    ]
    with pytest.raises(ValueError, match="does not cover child_birth_dates"):
        disclosure_fields(CONTACT_FIELDS, [PersonalField.CHILD_BIRTH_DATES], present)


# --- working days ---------------------------------------------------------------------------

NRW = WorkingCalendar.for_region("DE", "NW")


def test_weekends_and_nrw_holidays_are_no_working_days() -> None:
    assert not NRW.is_working_day(date(2025, 4, 18))  # Karfreitag (Good Friday)
    assert not NRW.is_working_day(date(2025, 4, 21))  # Ostermontag
    assert not NRW.is_working_day(date(2025, 6, 19))  # Fronleichnam: NRW, not everywhere
    assert not NRW.is_working_day(date(2025, 11, 1))  # Allerheiligen (a Saturday anyway)
    assert not NRW.is_working_day(date(2025, 3, 8))  # Saturday
    assert NRW.is_working_day(date(2025, 3, 7))
    berlin = WorkingCalendar.for_region("DE", "BE")
    assert berlin.is_working_day(date(2025, 6, 19))


def test_answer_due_date_skips_the_easter_weekend() -> None:
    # Requested Thursday 17 April 2025: Fri 18 (holiday), Sat, Sun, Mon 21 (holiday) do not
    # count; 3 working days end on Thursday 24 April.
    thursday = date(2025, 4, 17)
    due = answer_due_by(thursday, urgent=False, days=3, urgent_days=1, calendar=NRW)
    assert due == date(2025, 4, 24)
    assert answer_due_by(thursday, urgent=True, days=3, urgent_days=1, calendar=NRW) == date(
        2025, 4, 22
    )
    assert NRW.working_days_between(thursday, date(2025, 4, 25)) == 4


def test_escalation_happens_after_the_due_day_once_and_only_while_waiting() -> None:
    due = date(2025, 4, 24)
    assert not escalation_due(S.REQUESTED, due, date(2025, 4, 24), already_escalated=False)
    assert escalation_due(S.REQUESTED, due, date(2025, 4, 25), already_escalated=False)
    assert escalation_due(S.RECEIVED, due, date(2025, 4, 25), already_escalated=False)
    assert not escalation_due(S.RECEIVED, due, date(2025, 4, 25), already_escalated=True)
    assert not escalation_due(S.ACCEPTED, due, date(2025, 4, 25), already_escalated=False)


# --- catalogue ------------------------------------------------------------------------------


def offer(slug: str, capacity: int, used: int, **changes: object) -> Offer:
    values: dict[str, object] = {
        "traeger": slug,
        "name": slug.title(),
        "modules": ("elternschule",),
        "bezirke": ("hoerde",),
        "capacity_per_month": capacity,
        "used_this_month": used,
    }
    values.update(changes)
    return Offer(**values)  # type: ignore[arg-type]


def test_suggestions_match_bezirk_and_module_free_capacity_first() -> None:
    offers = [
        offer("full", 10, 10),
        offer("some", 10, 8),
        offer("plenty", 20, 2),
        offer("citywide", 5, 0, bezirke=("*",)),
        offer("elsewhere", 50, 0, bezirke=("eving",)),
        offer("other-module", 50, 0, modules=("familienhebamme",)),
        offer("paused", 50, 0, active=False),
    ]
    ranked = suggest(offers, bezirk="hoerde", module="elternschule")
    assert [o.traeger for o in ranked] == ["plenty", "citywide", "some", "full"]
    assert ranked[-1].free_capacity == 0


def test_offer_problems_name_the_reason() -> None:
    hoerde = offer("a", 1, 0)
    assert offer_problem(hoerde, traeger="a", bezirk="hoerde", module="elternschule") is None
    assert "unknown Träger" in str(offer_problem(None, traeger="x", bezirk="h", module="m"))
    assert "does not offer familienhebamme" in str(
        offer_problem(hoerde, traeger="a", bezirk="hoerde", module="familienhebamme")
    )
    assert "in Stadtbezirk eving" in str(
        offer_problem(hoerde, traeger="a", bezirk="eving", module="elternschule")
    )
    paused = offer("a", 1, 0, active=False)
    assert "no referrals" in str(
        offer_problem(paused, traeger="a", bezirk="hoerde", module="elternschule")
    )


def test_pick_takes_the_best_acceptable_offer_with_free_places() -> None:
    ranked = suggest(
        [offer("plenty", 20, 2), offer("some", 10, 8), offer("full", 10, 10)],
        bezirk="hoerde",
        module="elternschule",
    )
    assert pick(ranked, lambda o: True) == ranked[0]
    assert pick(ranked, lambda o: o.traeger != "plenty") == ranked[1]
    assert pick(ranked, lambda o: o.traeger == "full") is None
