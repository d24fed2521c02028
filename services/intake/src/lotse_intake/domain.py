"""Intake's rules, free of I/O: who may register on which channel, how the Stadtbezirk (city
district) is found, which birth dates and consents make sense, how the duplicate guard
recognises a family, and which consent a warm handover rests on.

Every refusal is the runtime's :class:`~lotse_runtime.refusal.Refusal` naming the request
field and a reason a clinic worker understands (HTTP 422), or a :class:`Conflict` with the
stored state (409); the runtime answers both in the platform's one error shape. A reason
never repeats a personal value (name, address, birth date), so that it is safe wherever an
error ends up.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from enum import StrEnum

from lotse_contracts.city import (
    InvalidPostcode,
    Municipality,
    PostcodeOutsideCity,
    UnknownBezirk,
    UnknownTraeger,
)
from lotse_contracts.events.common import ConsentScope, ConsentState
from lotse_contracts.events.common import Role as EventRole
from lotse_contracts.events.intake import (
    BezirkSource,
    Channel,
    SupportNeed,
    welcome_visit_target,
)
from lotse_runtime.identity import Role, event_role
from lotse_runtime.inputs import BEFORE_REGISTRATION, CLOCK_SKEW
from lotse_runtime.refusal import Conflict, Refusal

#: Move-in notices (from the citizens' office) cover families with children under six.
MOVE_IN_MAX_AGE_YEARS = 6
#: What the contract allows for ``days_since_birth_at_registration``.
MAX_AGE_DAYS = 6 * 366


class DuplicateStatus(StrEnum):
    """State of a possible duplicate: open until the responsible Familienbüro merges the
    two cases or dismisses the flag (two families after all)."""

    OPEN = "open"
    MERGED = "merged"
    DISMISSED = "dismissed"


# -- who registers on which channel ---------------------------------------------------------

#: Clinic registrations come from a Babylotse (or a clinic system calling as a service);
#: move-in notices from the citizens' office (a service) or a Familienbüro entering one.
CHANNEL_ROLES: dict[Channel, frozenset[Role]] = {
    Channel.CLINIC: frozenset({Role.babylotse, Role.service}),
    Channel.MOVE_IN: frozenset({Role.service, Role.familienbuero}),
}


def registrar_role(role: Role, channel: Channel) -> EventRole:
    """The role a registration's events name: a service registering a move-in notice is the
    citizens' office; otherwise the platform's one role map (``identity.event_role``)."""
    acts_as = EventRole.CITIZENS_OFFICE if channel is Channel.MOVE_IN else None
    return event_role(role, service_acts_as=acts_as)


def resolve_clinic(
    channel: Channel, caller_role: Role, caller_clinic: str | None, clinic_id: str | None
) -> str | None:
    """The clinic a registration belongs to: a Babylotse's own clinic, or the one a
    service names. Move-in notices have none."""
    if channel is Channel.MOVE_IN:
        if clinic_id is not None:
            raise Refusal("clinic_id", "a move-in notice comes from no clinic: leave it out")
        return None
    if caller_role is Role.babylotse:
        if clinic_id is not None and clinic_id != caller_clinic:
            raise Refusal(
                "clinic_id",
                "a Babylotse registers families for their own clinic only "
                f"({caller_clinic}); leave clinic_id out or use that one",
            )
        return caller_clinic
    if clinic_id is None:
        raise Refusal("clinic_id", "name the birth clinic for a clinic registration")
    return clinic_id


# -- children ------------------------------------------------------------------------------------


def _years_later(day: date, years: int) -> date:
    try:
        return day.replace(year=day.year + years)
    except ValueError:  # 29 February
        return day.replace(year=day.year + years, day=28)


def check_birth_dates(
    channel: Channel, birth_dates: Sequence[date], today: date, *, clinic_max_age_days: int
) -> None:
    """Birth dates must lie in the past and fit the channel (newborns / under six)."""
    for index, born in enumerate(birth_dates):
        field = f"children.{index}.birth_date"
        if born > today:
            raise Refusal(
                field,
                "this birth date lies in the future; register the family after the birth",
            )
        age_days = (today - born).days
        if channel is Channel.CLINIC and age_days > clinic_max_age_days:
            raise Refusal(
                field,
                f"this child is {age_days} days old: a clinic registration "
                f"is for a birth within the last {clinic_max_age_days} days; check the year",
            )
        if channel is Channel.MOVE_IN and today >= _years_later(born, MOVE_IN_MAX_AGE_YEARS):
            raise Refusal(
                field,
                "this child is six or older: a move-in notice covers children under six only",
            )


def days_since_birth(birth_dates: Iterable[date], today: date) -> int:
    """Age in days of the youngest child."""
    return min((today - born).days for born in birth_dates)


def visit_target_date(
    channel: Channel, registered_on: date, days_since_birth: int, city: Municipality
) -> date:
    """The day by which the welcome visit should have happened (the city's target, counted
    as visits counts it: from the birth for clinic families, see ``welcome_visit_target``)."""
    return welcome_visit_target(
        channel, registered_on, days_since_birth, city.welcome_visit_target_days
    )


def local_date(moment: datetime, city: Municipality) -> date:
    """The calendar day of ``moment`` in the city (birth dates are local dates)."""
    return moment.astimezone(city.zone()).date()


def check_not_future(field: str, moment: datetime, now: datetime) -> None:
    """A recorded moment (consent given, screening done) cannot lie ahead."""
    # A minute of slack for clocks of clients that run slightly ahead.
    if moment > now + CLOCK_SKEW:
        raise Refusal(field, "lies in the future; give the time it actually happened")


def check_recorded(field: str, moment: datetime, now: datetime, registered_at: datetime) -> None:
    """A consent given or a screening done for a family: not in the future, and not longer
    before the family's registration than ``BEFORE_REGISTRATION`` (lotse_runtime.inputs;
    at registration, ``registered_at`` is now)."""
    check_not_future(field, moment, now)
    if moment < registered_at - BEFORE_REGISTRATION:
        raise Refusal(
            field,
            f"lies more than {BEFORE_REGISTRATION.days} days before the family's registration; "
            "give the time it actually happened",
        )


# -- address and Stadtbezirk ---------------------------------------------------------------------


@dataclass(frozen=True)
class BezirkChoice:
    """The Stadtbezirk of a case and how it was found."""

    bezirk: str
    source: BezirkSource
    derived: str
    """The Stadtbezirk the postcode gives (differs from ``bezirk`` after an override)."""


def check_city_name(city_name: str | None, city: Municipality) -> None:
    """An address naming another city is a mistake even with a postcode of ours."""
    if city_name is None:
        return
    given, ours = fold(city_name), fold(city.name)
    if not given.startswith(ours):
        raise Refusal(
            "address.city",
            f"this is not {city.name}: Lotse {city.name} registers families living in "
            f"{city.name} only",
        )


def choose_bezirk(city: Municipality, postcode: str, override: str | None) -> BezirkChoice:
    """The Stadtbezirk from the postcode, or the explicitly named one (recorded as such).

    The postcode must belong to the city even with an override: the override corrects the
    district of an address on a district border, it does not admit families living elsewhere.
    """
    try:
        derived = city.bezirk_for_postcode(postcode).slug
    except InvalidPostcode:
        raise Refusal("address.postcode", "a postcode has five digits, e.g. 44137") from None
    except PostcodeOutsideCity:
        raise Refusal(
            "address.postcode",
            f"this postcode is not in {city.name}; check the address "
            "(families living elsewhere belong to their own city's programme)",
        ) from None
    if override is None:
        return BezirkChoice(bezirk=derived, source=BezirkSource.ADDRESS, derived=derived)
    try:
        chosen = city.bezirk(override).slug
    except UnknownBezirk:
        raise Refusal(
            "bezirk_override",
            f"{city.name} has no Stadtbezirk {override!r}; known: {', '.join(city.bezirk_slugs)}",
        ) from None
    source = BezirkSource.OVERRIDE if chosen != derived else BezirkSource.ADDRESS
    return BezirkChoice(bezirk=chosen, source=source, derived=derived)


# -- consents ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConsentTerms:
    """What one consent covers: scope, and for ``traeger_contact`` the Träger and purpose."""

    scope: ConsentScope
    traeger: str | None = None
    purpose: str | None = None


def _at(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def check_consent(terms: ConsentTerms, city: Municipality, bezirk: str, field: str) -> None:
    """A consent must be complete and name what exists: the Träger (provider agency) must be
    one of the city, offer the purpose module and serve the family's Stadtbezirk."""
    if terms.scope is not ConsentScope.TRAEGER_CONTACT:
        if terms.traeger is not None:
            raise Refusal(
                _at(field, "traeger"),
                f"only a traeger_contact consent names a Träger, not {terms.scope}",
            )
        if terms.purpose is not None:
            raise Refusal(
                _at(field, "purpose"),
                f"only a traeger_contact consent names a purpose, not {terms.scope}",
            )
        return
    if terms.purpose is None:
        raise Refusal(
            _at(field, "purpose"),
            "a traeger_contact consent is for one purpose: name the module, e.g. familienhebamme",
        )
    if terms.purpose not in city.module_slugs:
        raise Refusal(
            _at(field, "purpose"),
            f"{city.name} has no offer module {terms.purpose!r}; "
            f"known: {', '.join(city.module_slugs)}",
        )
    if terms.traeger is None:
        return  # the Familienbüro picks a Träger offering the purpose in the Bezirk
    try:
        traeger = city.traeger_by_slug(terms.traeger)
    except UnknownTraeger:
        raise Refusal(
            _at(field, "traeger"),
            f"{city.name} has no Träger {terms.traeger!r}; known: {', '.join(city.traeger_slugs)}",
        ) from None
    if not traeger.offers(terms.purpose):
        raise Refusal(
            _at(field, "traeger"),
            f"{traeger.name} does not offer {terms.purpose}; "
            f"it offers {', '.join(traeger.modules)}",
        )
    if not traeger.serves(bezirk):
        raise Refusal(
            _at(field, "traeger"), f"{traeger.name} does not serve the Stadtbezirk {bezirk}"
        )


def check_consents(terms: Sequence[ConsentTerms], city: Municipality, bezirk: str) -> None:
    """Every consent of a registration is valid and none is listed twice."""
    seen: set[ConsentTerms] = set()
    for index, consent in enumerate(terms):
        check_consent(consent, city, bezirk, f"consents.{index}")
        if consent in seen:
            raise Refusal(f"consents.{index}", "this consent is listed twice")
        seen.add(consent)


@dataclass(frozen=True)
class ConsentRecord:
    """A stored consent as the handover rule sees it."""

    consent_id: str
    terms: ConsentTerms
    state: ConsentState


def consent_for_handover(
    consents: Iterable[ConsentRecord], module: str, traeger: str | None, consent_id: str | None
) -> ConsentRecord:
    """The given ``traeger_contact`` consent a handover rests on (§ 65 SGB VIII).

    A consent naming the Träger covers a handover to it; a consent naming only the purpose
    covers a handover to any Träger offering it (chosen by the Familienbüro). A handover
    without a Träger needs such an unnamed consent.
    """
    candidates = [
        c
        for c in consents
        if c.terms.scope is ConsentScope.TRAEGER_CONTACT and c.terms.purpose == module
    ]
    if consent_id is not None:
        chosen = next((c for c in candidates if c.consent_id == consent_id), None)
        if chosen is None:
            raise Refusal(
                "consent_id",
                f"this case has no traeger_contact consent {consent_id} for the module {module}",
            )
        if chosen.state is not ConsentState.GIVEN:
            raise Conflict("consent_id", "this consent was withdrawn")
        if chosen.terms.traeger not in (None, traeger):
            raise Refusal(
                "consent_id",
                f"this consent covers the Träger {chosen.terms.traeger} only, not "
                f"{traeger or 'a Träger chosen by the Familienbüro'}",
            )
        return chosen
    given = [c for c in candidates if c.state is ConsentState.GIVEN]
    exact = [c for c in given if c.terms.traeger == traeger]
    if exact:
        return exact[0]
    named_only = False
    if traeger is not None:
        general = [c for c in given if c.terms.traeger is None]
        if general:
            return general[0]
        reason = (
            f"the family has not consented to passing its contact data to {traeger} for "
            f"{module}; record that consent first"
        )
    else:
        named = sorted({c.terms.traeger for c in given if c.terms.traeger})
        named_only = bool(named)
        reason = (
            f"the family consented to {module} only with {', '.join(named)}: name that Träger"
            if named
            else f"the family has not consented to passing its contact data for {module}; "
            "record a traeger_contact consent first"
        )
    field = "traeger" if traeger or named_only else "module"
    raise Conflict(field, reason)


def check_handover_target(
    city: Municipality, bezirk: str, module: str, traeger: str | None
) -> None:
    """The module must exist; a named Träger must offer it in the family's Stadtbezirk."""
    if module not in city.module_slugs:
        raise Refusal(
            "module",
            f"{city.name} has no offer module {module!r}; known: {', '.join(city.module_slugs)}",
        )
    if traeger is None:
        if not city.traeger_offering(module, bezirk):
            raise Refusal("module", f"no Träger offers {module} in the Stadtbezirk {bezirk}")
        return
    try:
        found = city.traeger_by_slug(traeger)
    except UnknownTraeger:
        raise Refusal(
            "traeger",
            f"{city.name} has no Träger {traeger!r}; known: {', '.join(city.traeger_slugs)}",
        ) from None
    if not found.offers(module):
        raise Refusal("traeger", f"{found.name} does not offer {module}")
    if not found.serves(bezirk):
        raise Refusal("traeger", f"{found.name} does not serve the Stadtbezirk {bezirk}")


def is_urgent(requested: bool | None, latest_need: SupportNeed | None, screening_use: bool) -> bool:
    """A handover is urgent when the requester says so, or when the latest screening found
    an acute need and the family allowed its screening to be used for referrals."""
    if requested is not None:
        return requested
    return screening_use and latest_need is SupportNeed.ACUTE


# -- screening -----------------------------------------------------------------------------------


def check_modules(city: Municipality, modules: Sequence[str], field: str) -> list[str]:
    """Wished-for modules must be modules of the city; duplicates are dropped."""
    for index, module in enumerate(modules):
        if module not in city.module_slugs:
            raise Refusal(
                f"{field}.{index}",
                f"{city.name} has no offer module {module!r}; "
                f"known: {', '.join(city.module_slugs)}",
            )
    return list(dict.fromkeys(modules))


# -- duplicate guard -----------------------------------------------------------------------------

_GERMAN = str.maketrans({"ä": "ae", "ö": "oe", "ü": "ue", "ß": "ss"})
# Letters without a Unicode decomposition, as they are typed on a German keyboard.
_UNDECOMPOSABLE = str.maketrans(
    {"ı": "i", "ł": "l", "đ": "d", "ø": "o", "æ": "ae", "œ": "oe", "þ": "th"}
)
# Abbreviations a clerk types for street types; applied to whole words after folding.
_STREET_WORDS = [
    (re.compile(r"str\.?(?![a-z])"), "strasse"),  # Hauptstr. / Hauptstr / Haupt Str.
    (re.compile(r"(?<![a-z])st\.[\s-]*(?=[a-z])"), "sankt "),  # St.-Josef-Straße
    (re.compile(r"pl\.(?![a-z])"), "platz"),  # Marktpl.
]
_NOT_ALNUM = re.compile(r"[^a-z0-9]+")


def fold(text: str) -> str:
    """Case, umlauts and ß folded, other accents dropped: "Müller" == "MUELLER",
    "Yılmaz" == "YILMAZ", "Çelik" == "Celik"."""
    text = unicodedata.normalize("NFC", text).casefold().translate(_GERMAN)
    text = text.translate(_UNDECOMPOSABLE)
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c))


def name_key(name: str) -> str:
    """A name for comparison: folded, separators (space, hyphen, dot) ignored."""
    return _NOT_ALNUM.sub("", fold(name))


def street_key(street: str) -> str:
    """A street for comparison: folded, abbreviations written out, separators ignored, so
    "Hauptstr. " == "Haupt-Straße" == "hauptstrasse"."""
    folded = fold(street)
    for pattern, replacement in _STREET_WORDS:
        folded = pattern.sub(replacement, folded)
    return _NOT_ALNUM.sub("", folded)


def house_number_key(number: str) -> str:
    """ "12 a" == "12A" == "12a"."""
    return _NOT_ALNUM.sub("", fold(number))


def match_keys(
    *,
    secret: bytes,
    family_name: str,
    birth_dates: Iterable[date],
    street: str,
    house_number: str,
    postcode: str,
) -> list[str]:
    """Keyed hashes (HMAC-SHA256) identifying a family, one per child birth date.

    Only these are stored, so the guard still works once personal fields are encrypted, and
    a leaked table cannot be reversed by trying names and birthdays without the secret.
    """
    keys: list[str] = []
    for born in birth_dates:
        text = "|".join(
            [
                "v1",
                name_key(family_name),
                born.isoformat(),
                street_key(street),
                house_number_key(house_number),
                postcode.strip(),
            ]
        )
        digest = hmac.new(secret, text.encode("utf-8"), hashlib.sha256).hexdigest()
        if digest not in keys:
            keys.append(digest)
    return keys


def fingerprint(secret: bytes, *parts: str) -> str:
    """Keyed hash of a request (method, path, canonical body) for Idempotency-Key checks:
    equal requests are recognised without keeping their (personal) content."""
    mac = hmac.new(secret, b"lotse-intake-request-v1", hashlib.sha256)
    for part in parts:
        mac.update(b"\x00" + part.encode("utf-8"))
    return mac.hexdigest()


def disclosure_refusal(
    consent: ConsentRecord | None, traeger: str, *, erased: bool
) -> Refusal | None:
    """Why no disclosure of the family may be sealed for, or its key released to,
    ``traeger`` on the strength of ``consent`` (§ 65 SGB VIII), or None when it may.

    The consent must be the family's, in force, of scope ``traeger_contact`` and name that
    Träger: passing data needs a named recipient. Checked at sealing and again at every key
    release, so a withdrawal or an erasure closes the disclosure at once.
    """
    if erased:
        return Refusal("case_id", "the family's data was erased", status=410)
    if consent is None:
        return Conflict("consent_id", "this case has no such consent")
    if consent.terms.scope is not ConsentScope.TRAEGER_CONTACT:
        return Conflict("consent_id", "the consent is not a traeger_contact consent")
    if consent.state is not ConsentState.GIVEN:
        return Conflict("consent_id", "the consent was withdrawn")
    if consent.terms.traeger != traeger:
        return Conflict("traeger", f"the consent does not name the Träger {traeger}")
    return None
