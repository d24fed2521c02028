"""The seeded plan of a city year: who is born or moves in where and when, what each family
consents to, how screenings, welcome visits and referrals turn out, how the Träger answer,
and who withdraws a consent or asks to be erased.

The plan depends only on the city configuration, the seed and the scale, never on the
platform: the same arguments give the same plan (:func:`plan_digest` fingerprints it). What
the platform makes of it (case ids, appointment times) is recorded separately, in the
ground truth (:mod:`lotse_simulator.truth`).

Rates are typical of a German city's welcome-visit programme (Dortmund reports 85 % of
families reached): they are assumptions of the simulation, stated here once.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, date, datetime, time, timedelta
from typing import Any, Literal, TypeVar
from zoneinfo import ZoneInfo

from lotse_contracts.city import Municipality, Stadtbezirk
from lotse_contracts.events.intake import Indicator, SupportNeed
from lotse_contracts.events.partner import PartnerAnswer
from lotse_contracts.events.referrals import RejectionReason

T = TypeVar("T")

#: Births and move-ins of families with children under six a year, per city (the city
#: configuration has no such figures). Dortmund: about 5,500 births; Hamm: about 1,800.
YEARLY: dict[str, tuple[int, int]] = {"dortmund": (5_500, 500), "hamm": (1_800, 170)}
#: For a city not in the table (override the size with --families or --scale).
DEFAULT_YEARLY = (1_000, 100)

#: Birth clinics of the Babylotsen (their slugs are free identifiers of the clinic channel).
CLINICS = ("klinikum-nord", "klinikum-mitte", "st-josefs-hospital-hoerde", "knappschaft-brackel")

WELCOME_CONSENT_RATE = 0.90
SCREENING_RATE = 0.80  # of clinic families
SCREENING_DATA_USE_RATE = 0.75
NEED_WEIGHTS = {
    SupportNeed.NONE: 0.55,
    SupportNeed.GENERAL: 0.28,
    SupportNeed.INCREASED: 0.13,
    SupportNeed.ACUTE: 0.04,
}
#: Chance of a referral by support need (clinic) or after a completed visit (move-in).
REFERRAL_RATE = {
    SupportNeed.NONE: 0.04,
    SupportNeed.GENERAL: 0.15,
    SupportNeed.INCREASED: 0.45,
    SupportNeed.ACUTE: 0.70,
}
MOVE_IN_REFERRAL_RATE = 0.12
#: Modules wished for by need; the first one that a Träger offers in the Bezirk is used.
NEED_MODULES = {
    SupportNeed.NONE: ("fit-fuers-baby", "elternschule"),
    SupportNeed.GENERAL: ("elternschule", "fit-fuers-baby", "familienbildung"),
    SupportNeed.INCREASED: ("familienhebamme", "aufsuchende-elternberatung"),
    SupportNeed.ACUTE: ("familienhebamme", "hilfe-bevor-es-brennt", "aufsuchende-elternberatung"),
}
VisitOutcome = Literal["completed", "declined", "no_show_then_completed", "no_show_not_reached"]
VISIT_OUTCOMES: dict[VisitOutcome, float] = {
    "completed": 0.80,
    "declined": 0.08,
    "no_show_then_completed": 0.08,
    "no_show_not_reached": 0.04,
}
AnswerProfile = Literal["completed", "ongoing", "rejected", "received_only", "silent"]
ANSWER_PROFILES: dict[AnswerProfile, float] = {
    "completed": 0.58,
    "ongoing": 0.17,
    "rejected": 0.15,
    "received_only": 0.06,
    "silent": 0.04,
}
#: Share of referrals whose consent names no Träger ("the Familienbüro chooses"), and of those
#: the share the Familienbüro places (recording a consent naming the Träger first); the rest
#: stay open wishes until the Bezirksteam gets them as an escalation.
TRAEGERLESS_RATE = 0.15
TRAEGERLESS_PLACED_RATE = 0.6
WELCOME_WITHDRAWAL_RATE = 0.02
TRAEGER_WITHDRAWAL_RATE = 0.05  # of families with a referral
ERASURE_RATE = 0.015
#: Share of a Träger's monthly capacity the plan uses, so that the platform's capacity gate
#: never decides (the plan must not depend on it).
CAPACITY_SHARE = 0.8

FAMILY_NAMES = (
    "Müller", "Schmidt", "Yılmaz", "Kowalski", "Nowak", "Schneider", "Fischer", "Weber",
    "Meyer", "Wagner", "Becker", "Hoffmann", "Demir", "Kaya", "Schulz", "Koch", "Richter",
    "Klein", "Wolf", "Neumann", "Schwarz", "Popescu", "Haddad", "Ivanova", "Özdemir",
)  # fmt: skip
GIVEN_NAMES = ("Anna", "Mehmet", "Sofia", "Lukas", "Emma", "Noah", "Mia", "Elif", "Jonas", "Lea")
STREETS = ("Musterweg", "Hauptstraße", "Kirchstraße", "Am Markt", "Lindenallee", "Schulstraße")
LANGUAGES = {"de": 0.78, "tr": 0.07, "ar": 0.05, "pl": 0.04, "ro": 0.03, "en": 0.03}


@dataclass(frozen=True)
class AnswerStep:
    """One answer of the Träger, ``after_h`` hours after the referral was requested."""

    answer: PartnerAnswer
    after_h: float
    reason: RejectionReason | None = None


@dataclass(frozen=True)
class ReferralPlan:
    """A warm handover to one Träger's module and how the Träger answers it."""

    module: str
    traeger: str
    by: Literal["babylotse", "familienbuero"]
    profile: AnswerProfile
    answers: tuple[AnswerStep, ...]
    withdraw_after_h: float | None = None
    """The family withdraws the Träger-contact consent this long after the request."""
    traeger_named: Literal["at_consent", "by_familienbuero", "never"] = "at_consent"
    """Who names the Träger: the family's consent at the handover (``at_consent``); or the
    consent names none ("the Familienbüro chooses") and the handover waits as an open wish,
    until the Familienbüro records a consent naming ``traeger`` and places the wish
    ``choose_after_h`` hours later (``by_familienbuero``), or nobody does and it is
    escalated to the Bezirksteam (``never``)."""
    choose_after_h: float | None = None


@dataclass(frozen=True)
class ScreeningPlan:
    support_need: SupportNeed
    indicators: tuple[Indicator, ...]
    wished_modules: tuple[str, ...]


@dataclass(frozen=True)
class FamilyPlan:
    """One family of the simulated year."""

    key: str
    channel: Literal["clinic", "move_in"]
    bezirk: str
    postcode: str
    clinic_id: str | None
    registered_at: datetime
    child_birth_date: date
    children: int
    family_name: str
    parent_given_name: str
    street: str
    house_number: str
    language: str
    welcome_consent: bool
    screening_data_use: bool
    screening: ScreeningPlan | None
    visit_outcome: VisitOutcome | None
    referral: ReferralPlan | None
    withdraw_welcome_after_h: float | None = None
    erase_after_days: float | None = None
    bezirk_override: bool = False


@dataclass(frozen=True)
class CityPlan:
    city: str
    seed: int
    year: int
    families: tuple[FamilyPlan, ...] = field(default_factory=tuple)

    def to_json(self) -> dict[str, Any]:
        plain: dict[str, Any] = _plain(asdict(self))
        return plain


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, datetime | date):
        return value.isoformat()
    return value


def plan_digest(plan: CityPlan) -> str:
    """SHA-256 of the plan's canonical JSON: equal digests, equal plans."""
    text = json.dumps(plan.to_json(), sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def yearly_figures(city: Municipality) -> tuple[int, int]:
    """Births and move-ins of families with children under six in a year."""
    return YEARLY.get(city.slug, DEFAULT_YEARLY)


def _weighted(rng: random.Random, weights: dict[T, float]) -> T:
    return rng.choices(list(weights), weights=list(weights.values()))[0]


def _daytime(rng: random.Random, day: date, zone: ZoneInfo, start_h: int, end_h: int) -> datetime:
    """A moment on ``day`` between the local hours, to the minute, in UTC."""
    minute = rng.randrange(start_h * 60, end_h * 60)
    local = datetime.combine(day, time(minute // 60, minute % 60), zone)
    return local.astimezone(UTC)


def within_day(moment: datetime, zone: ZoneInfo, start_h: int = 8, end_h: int = 18) -> datetime:
    """Move a moment into local working hours (next morning if after ``end_h``): the
    simulator never acts near midnight, so a month boundary never splits an action from the
    platform's record of it."""
    local = moment.astimezone(zone)
    if local.hour >= end_h:
        local = datetime.combine(local.date() + timedelta(days=1), time(start_h), zone)
    elif local.hour < start_h:
        local = datetime.combine(local.date(), time(start_h), zone)
    return local.astimezone(UTC)


def make_plan(
    city: Municipality,
    *,
    seed: int,
    year: int,
    families: int | None = None,
    scale: float = 1.0,
) -> CityPlan:
    """A city year: ``families`` in total (births and move-ins in the yearly ratio), or the
    city's yearly figures times ``scale``; spread over the Stadtbezirke by population share
    and over the year uniformly by day."""
    rng = random.Random(seed)
    zone = city.zone()
    births, move_ins = yearly_figures(city)
    if families is None:
        n_births, n_moves = round(births * scale), round(move_ins * scale)
    else:
        n_moves = round(families * move_ins / (births + move_ins))
        n_births = families - n_moves
    clinic: list[Literal["clinic", "move_in"]] = ["clinic"]
    move_in: list[Literal["clinic", "move_in"]] = ["move_in"]
    channels = clinic * n_births + move_in * n_moves
    rng.shuffle(channels)
    days = (date(year + 1, 1, 1) - date(year, 1, 1)).days
    moments = sorted(
        _daytime(rng, date(year, 1, 1) + timedelta(days=rng.randrange(days)), zone, 8, 17)
        for _ in channels
    )
    bezirke = city.stadtbezirke
    shares = [b.population_share for b in bezirke]
    capacity_used: dict[tuple[str, str], int] = {}
    plans = []
    for index, (channel, registered_at) in enumerate(zip(channels, moments, strict=True)):
        bezirk = rng.choices(bezirke, weights=shares)[0]
        family = _family(rng, city, zone, index, channel, bezirk, registered_at, capacity_used)
        plans.append(_choose_traeger_later(family, seed))
    return CityPlan(city=city.slug, seed=seed, year=year, families=tuple(plans))


def _choose_traeger_later(family: FamilyPlan, seed: int) -> FamilyPlan:
    """Make some handovers Träger-less (see :attr:`ReferralPlan.traeger_named`). A draw of
    its own per family, so that the rest of the plan is the same as without them."""
    referral = family.referral
    if referral is None:
        return family
    rng = random.Random(f"{seed}/{family.key}/traeger-named")
    if rng.random() >= TRAEGERLESS_RATE:
        return family
    if rng.random() < TRAEGERLESS_PLACED_RATE:
        chosen = replace(
            referral, traeger_named="by_familienbuero", choose_after_h=rng.uniform(2, 72)
        )
    else:
        # No referral ever: no answers, nothing to withdraw from the Träger.
        chosen = replace(referral, traeger_named="never", answers=(), withdraw_after_h=None)
    return replace(family, referral=chosen)


def _family(
    rng: random.Random,
    city: Municipality,
    zone: ZoneInfo,
    index: int,
    channel: Literal["clinic", "move_in"],
    bezirk: Stadtbezirk,
    registered_at: datetime,
    capacity_used: dict[tuple[str, str], int],
) -> FamilyPlan:
    local_day = registered_at.astimezone(zone).date()
    if channel == "clinic":
        birth = local_day - timedelta(days=rng.randint(0, 4))
        clinic: str | None = rng.choice(CLINICS)
        children = 2 if rng.random() < 0.015 else 1  # twins
    else:
        birth = local_day - timedelta(days=rng.randint(30, 6 * 365 - 30))
        clinic = None
        children = rng.choice((1, 1, 1, 2, 2, 3))
    welcome = rng.random() < WELCOME_CONSENT_RATE
    screening: ScreeningPlan | None = None
    data_use = False
    if channel == "clinic" and rng.random() < SCREENING_RATE:
        need = _weighted(rng, NEED_WEIGHTS)
        indicators = tuple(
            sorted(
                rng.sample(list(Indicator), k=rng.randint(1, 3) if need != SupportNeed.NONE else 0)
            )
        )
        wished = tuple(m for m in NEED_MODULES[need] if m in city.module_slugs)[:2]
        screening = ScreeningPlan(need, indicators, wished)
        data_use = rng.random() < SCREENING_DATA_USE_RATE
    outcome: VisitOutcome | None = None
    if welcome:
        chosen: VisitOutcome = _weighted(rng, VISIT_OUTCOMES)
        outcome = chosen
    referral = _referral(rng, city, zone, channel, bezirk, registered_at, screening, outcome)
    if referral is not None:
        month = registered_at.astimezone(zone).strftime("%Y-%m")
        key = (referral.traeger, month)
        capacity = city.traeger_by_slug(referral.traeger).capacity_per_month
        if capacity_used.get(key, 0) + 1 > capacity * CAPACITY_SHARE:
            referral = None
        else:
            capacity_used[key] = capacity_used.get(key, 0) + 1
    withdraw_welcome = (
        rng.uniform(0.5, 3.0) if welcome and rng.random() < WELCOME_WITHDRAWAL_RATE else None
    )
    erase = rng.uniform(20, 150) if rng.random() < ERASURE_RATE else None
    return FamilyPlan(
        key=f"F{index + 1:05d}",
        channel=channel,
        bezirk=bezirk.slug,
        # A Bezirk whose postcodes all span several Bezirke is named explicitly.
        postcode=rng.choice(bezirk.postcodes or bezirk.shared_postcodes),
        bezirk_override=not bezirk.postcodes,
        clinic_id=clinic,
        registered_at=registered_at,
        child_birth_date=birth,
        children=children,
        family_name=rng.choice(FAMILY_NAMES),
        parent_given_name=rng.choice(GIVEN_NAMES),
        street=rng.choice(STREETS),
        # Unique per family, so the duplicate guard never merges two planned families.
        house_number=f"{index + 1}",
        language=_weighted(rng, LANGUAGES),
        welcome_consent=welcome,
        screening_data_use=data_use,
        screening=screening,
        visit_outcome=outcome,
        referral=referral,
        withdraw_welcome_after_h=withdraw_welcome,
        erase_after_days=erase,
    )


def _referral(
    rng: random.Random,
    city: Municipality,
    zone: ZoneInfo,
    channel: str,
    bezirk: Stadtbezirk,
    registered_at: datetime,
    screening: ScreeningPlan | None,
    outcome: VisitOutcome | None,
) -> ReferralPlan | None:
    if channel == "clinic":
        if screening is None or rng.random() >= REFERRAL_RATE[screening.support_need]:
            return None
        modules = screening.wished_modules
        by: Literal["babylotse", "familienbuero"] = "babylotse"
    else:
        if outcome not in ("completed", "no_show_then_completed"):
            return None
        if rng.random() >= MOVE_IN_REFERRAL_RATE:
            return None
        modules = NEED_MODULES[rng.choice((SupportNeed.GENERAL, SupportNeed.INCREASED))]
        by = "familienbuero"
    for module in modules:
        offering = sorted(
            t.slug for t in city.traeger if t.offers(module) and t.serves(bezirk.slug)
        )
        if offering:
            traeger = rng.choice(offering)
            break
    else:
        return None
    profile = _weighted(rng, ANSWER_PROFILES)
    answers = _answers(rng, profile)
    withdraw = rng.uniform(24, 24 * 30) if rng.random() < TRAEGER_WITHDRAWAL_RATE else None
    return ReferralPlan(module, traeger, by, profile, answers, withdraw)


def _answers(rng: random.Random, profile: AnswerProfile) -> tuple[AnswerStep, ...]:
    """The Träger's answers with realistic delays (hours after the request): receipt within
    a day, a decision within about a working week, first contact within two weeks, the
    module running for one to three months."""
    if profile == "silent":
        return ()
    at = rng.uniform(1, 24)
    steps = [AnswerStep(PartnerAnswer.RECEIVED, at)]
    if profile == "received_only":
        return tuple(steps)
    at += rng.uniform(24, 24 * 8)
    if profile == "rejected":
        reason = rng.choice(
            [
                RejectionReason.NO_CAPACITY,
                RejectionReason.FAMILY_UNREACHABLE,
                RejectionReason.FAMILY_DECLINED,
                RejectionReason.NOT_ELIGIBLE,
            ]
        )
        return (*steps, AnswerStep(PartnerAnswer.REJECTED, at, reason))
    steps.append(AnswerStep(PartnerAnswer.ACCEPTED, at))
    at += rng.uniform(24 * 2, 24 * 14)
    steps.append(AnswerStep(PartnerAnswer.FIRST_CONTACT, at))
    at += rng.uniform(1, 24 * 2)
    steps.append(AnswerStep(PartnerAnswer.IN_PROGRESS, at))
    if profile == "completed":
        at += rng.uniform(24 * 30, 24 * 90)
        steps.append(AnswerStep(PartnerAnswer.COMPLETED, at))
    return tuple(steps)
