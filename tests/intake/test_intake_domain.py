"""Intake's pure rules: normalisation and the duplicate guard's keys, Stadtbezirk choice,
birth dates per channel, consents, which consent a handover rests on, urgency."""

from __future__ import annotations

from datetime import UTC, date, datetime

import pytest
from lotse_contracts.city import load_city
from lotse_contracts.events.common import ConsentScope, ConsentState
from lotse_contracts.events.common import Role as EventRole
from lotse_contracts.events.intake import BezirkSource, Channel, SupportNeed
from lotse_intake import domain
from lotse_intake.domain import ConsentRecord, ConsentTerms
from lotse_runtime.identity import Role, event_role
from lotse_runtime.refusal import Refusal

CITY = load_city("dortmund")
SECRET = b"s" * 32
TODAY = date(2025, 3, 3)


def keys(**changes: object) -> list[str]:
    values: dict[str, object] = {
        "family_name": "Müller-Lüdenscheidt",
        "birth_dates": [date(2025, 2, 27)],
        "street": "Hörder Bahnhofstraße",
        "house_number": "12a",
        "postcode": "44263",
    }
    values.update(changes)
    return domain.match_keys(secret=SECRET, **values)  # type: ignore[arg-type]


# -- normalisation and match keys ----------------------------------------------------------


@pytest.mark.parametrize(
    ("left", "right"),
    [
        ("Müller", "MUELLER"),
        ("Müller-Lüdenscheidt", "mueller lüdenscheidt"),
        ("  Groß  ", "gross"),
        ("GROSS", "Groß"),
        ("Çelik", "celik"),
        ("Yılmaz", "YILMAZ"),
        ("Şahin", "Sahin"),
        ("Ö z d e m i r", "oezdemir"),
        ("Mu\u0308ller", "Müller"),  # decomposed umlaut (macOS keyboards, PDFs)
    ],
)
def test_names_compare_without_case_umlauts_and_separators(left: str, right: str) -> None:
    assert domain.name_key(left) == domain.name_key(right)


def test_different_names_stay_different() -> None:
    assert domain.name_key("Müller") != domain.name_key("Muller")
    assert domain.name_key("Meier") != domain.name_key("Maier")


@pytest.mark.parametrize(
    "variant",
    [
        "Hörder Bahnhofstraße",
        "Hoerder Bahnhofstrasse",
        "hörder bahnhofstr.",
        "Hörder Bahnhofstr",
        "HÖRDER BAHNHOF-STRASSE",
        "Hörder  Bahnhof Str.",
    ],
)
def test_street_abbreviations_and_spellings_fold_together(variant: str) -> None:
    assert domain.street_key(variant) == domain.street_key("Hörder Bahnhofstraße")


def test_other_street_words_are_expanded_too() -> None:
    assert domain.street_key("Marktpl. 3") == domain.street_key("Marktplatz 3")
    assert domain.street_key("St.-Josef-Str.") == domain.street_key("Sankt-Josef-Straße")
    assert domain.street_key("Hauptstraße") != domain.street_key("Hauptweg")


def test_house_numbers_ignore_case_and_spaces() -> None:
    assert domain.house_number_key("12 A") == domain.house_number_key("12a")
    assert domain.house_number_key("12a") != domain.house_number_key("12b")


def test_match_keys_recognise_the_same_family_written_differently() -> None:
    assert keys() == keys(
        family_name="MUELLER LUEDENSCHEIDT",
        street="Hoerder Bahnhofstr.",
        house_number="12 A",
        postcode=" 44263 ",
    )


@pytest.mark.parametrize(
    "change",
    [
        {"family_name": "Schmidt"},
        {"birth_dates": [date(2025, 2, 28)]},
        {"street": "Faßstraße"},
        {"house_number": "14"},
        {"postcode": "44265"},
    ],
)
def test_match_keys_differ_when_any_part_differs(change: dict[str, object]) -> None:
    assert keys() != keys(**change)


def test_match_keys_are_keyed_hashes_without_plaintext() -> None:
    [key] = keys()
    assert len(key) == 64
    assert all(c in "0123456789abcdef" for c in key)
    other_secret = domain.match_keys(
        secret=b"t" * 32,
        family_name="Müller-Lüdenscheidt",
        birth_dates=[date(2025, 2, 27)],
        street="Hörder Bahnhofstraße",
        house_number="12a",
        postcode="44263",
    )
    assert other_secret != [key]  # without the secret, names cannot be tried out


def test_one_match_key_per_birth_date_and_twins_share_one() -> None:
    assert len(keys(birth_dates=[date(2025, 2, 27), date(2025, 2, 27)])) == 1
    assert len(keys(birth_dates=[date(2025, 2, 27), date(2023, 5, 1)])) == 2


def test_fingerprint_depends_on_every_part() -> None:
    base = domain.fingerprint(SECRET, "POST", "/cases", "{}")
    assert base == domain.fingerprint(SECRET, "POST", "/cases", "{}")
    assert base != domain.fingerprint(SECRET, "POST", "/cases", '{"a":1}')
    assert base != domain.fingerprint(SECRET, "POST", "/cases/x", "{}")
    # Parts are separated: moving a character from one part to the next changes the print.
    assert domain.fingerprint(SECRET, "ab", "c") != domain.fingerprint(SECRET, "a", "bc")


# -- Stadtbezirk -----------------------------------------------------------------------------


def test_bezirk_comes_from_the_postcode() -> None:
    choice = domain.choose_bezirk(CITY, "44263", None)
    assert (choice.bezirk, choice.source, choice.derived) == (
        "hoerde",
        BezirkSource.ADDRESS,
        "hoerde",
    )


def test_override_is_recorded_as_override() -> None:
    choice = domain.choose_bezirk(CITY, "44263", "aplerbeck")
    assert (choice.bezirk, choice.source, choice.derived) == (
        "aplerbeck",
        BezirkSource.OVERRIDE,
        "hoerde",
    )


def test_override_naming_the_derived_bezirk_changes_nothing() -> None:
    assert domain.choose_bezirk(CITY, "44263", "hoerde").source is BezirkSource.ADDRESS


@pytest.mark.parametrize(
    ("postcode", "override", "field", "words"),
    [
        ("4426", None, "address.postcode", "five digits"),
        ("10115", None, "address.postcode", "not in Dortmund"),
        ("10115", "hoerde", "address.postcode", "not in Dortmund"),
        ("44263", "hoerde-sued", "bezirk_override", "no Stadtbezirk 'hoerde-sued'"),
    ],
)
def test_bad_addresses_are_refused_naming_the_field(
    postcode: str, override: str | None, field: str, words: str
) -> None:
    with pytest.raises(Refusal) as refused:
        domain.choose_bezirk(CITY, postcode, override)
    assert refused.value.field == field
    assert words in refused.value.reason


def test_city_name_must_be_the_city() -> None:
    domain.check_city_name(None, CITY)
    domain.check_city_name("Dortmund", CITY)
    domain.check_city_name("dortmund-hörde", CITY)
    with pytest.raises(Refusal) as refused:
        domain.check_city_name("Bochum", CITY)
    assert refused.value.field == "address.city"


# -- children --------------------------------------------------------------------------------


def check(channel: Channel, *born: date) -> None:
    domain.check_birth_dates(channel, list(born), TODAY, clinic_max_age_days=365)


def test_birth_dates_in_the_future_are_refused() -> None:
    check(Channel.CLINIC, TODAY)
    with pytest.raises(Refusal) as refused:
        check(Channel.CLINIC, date(2025, 2, 1), date(2025, 3, 4))
    assert refused.value.field == "children.1.birth_date"
    assert "in the future" in refused.value.reason


def test_clinic_registrations_are_for_recent_births() -> None:
    check(Channel.CLINIC, date(2024, 3, 3))
    with pytest.raises(Refusal) as refused:
        check(Channel.CLINIC, date(2015, 2, 27))
    assert "check the year" in refused.value.reason


def test_move_in_covers_children_under_six() -> None:
    check(Channel.MOVE_IN, date(2019, 3, 4), date(2022, 1, 1))
    with pytest.raises(Refusal) as refused:
        check(Channel.MOVE_IN, date(2022, 1, 1), date(2019, 3, 3))
    assert refused.value.field == "children.1.birth_date"
    assert "six or older" in refused.value.reason


def test_leap_day_birthdays_reach_six_on_28_february() -> None:
    domain.check_birth_dates(
        Channel.MOVE_IN, [date(2020, 2, 29)], date(2026, 2, 27), clinic_max_age_days=1
    )
    with pytest.raises(Refusal):
        domain.check_birth_dates(
            Channel.MOVE_IN, [date(2020, 2, 29)], date(2026, 2, 28), clinic_max_age_days=1
        )


def test_youngest_child_and_visit_target() -> None:
    assert domain.days_since_birth([date(2022, 1, 1), date(2025, 2, 27)], TODAY) == 4
    # Counted as visits counts it: from the birth for a clinic family, from the registration
    # for a family moving in (issue 18: intake and visits named different days).
    assert domain.visit_target_date(Channel.CLINIC, TODAY, 4, CITY) == date(2025, 3, 13)
    assert domain.visit_target_date(Channel.MOVE_IN, TODAY, 400, CITY) == date(2025, 3, 17)


def test_local_date_is_the_city_day() -> None:
    late_evening_utc = datetime(2025, 3, 2, 23, 30, tzinfo=UTC)  # 00:30 on 3 March in Dortmund
    assert domain.local_date(late_evening_utc, CITY) == date(2025, 3, 3)


# -- channel, clinic, roles ------------------------------------------------------------------


def test_babylotse_registers_for_own_clinic() -> None:
    assert domain.resolve_clinic(Channel.CLINIC, Role.babylotse, "klinik-a", None) == "klinik-a"
    assert (
        domain.resolve_clinic(Channel.CLINIC, Role.babylotse, "klinik-a", "klinik-a") == "klinik-a"
    )
    with pytest.raises(Refusal):
        domain.resolve_clinic(Channel.CLINIC, Role.babylotse, "klinik-a", "klinik-b")


def test_services_name_the_clinic_and_move_ins_have_none() -> None:
    assert domain.resolve_clinic(Channel.CLINIC, Role.service, None, "klinik-b") == "klinik-b"
    with pytest.raises(Refusal):
        domain.resolve_clinic(Channel.CLINIC, Role.service, None, None)
    assert domain.resolve_clinic(Channel.MOVE_IN, Role.service, None, None) is None
    with pytest.raises(Refusal):
        domain.resolve_clinic(Channel.MOVE_IN, Role.service, None, "klinik-b")


def test_event_roles() -> None:
    assert event_role(Role.babylotse) is EventRole.BABYLOTSE
    assert domain.registrar_role(Role.babylotse, Channel.CLINIC) is EventRole.BABYLOTSE
    assert domain.registrar_role(Role.service, Channel.MOVE_IN) is EventRole.CITIZENS_OFFICE
    assert domain.registrar_role(Role.service, Channel.CLINIC) is EventRole.SYSTEM
    assert event_role(Role.dpo) is EventRole.SYSTEM


# -- consents --------------------------------------------------------------------------------


def test_valid_consents_pass() -> None:
    domain.check_consents(
        [
            ConsentTerms(ConsentScope.WELCOME_VISIT),
            ConsentTerms(ConsentScope.SCREENING_DATA_USE),
            ConsentTerms(
                ConsentScope.TRAEGER_CONTACT, "hebammenzentrum-dortmund", "familienhebamme"
            ),
            ConsentTerms(ConsentScope.TRAEGER_CONTACT, None, "elternschule"),
        ],
        CITY,
        "hoerde",
    )


@pytest.mark.parametrize(
    ("terms", "field", "words"),
    [
        (
            ConsentTerms(ConsentScope.TRAEGER_CONTACT, "hebammen-ag", "familienhebamme"),
            "consents.0.traeger",
            "no Träger 'hebammen-ag'",
        ),
        (
            ConsentTerms(ConsentScope.TRAEGER_CONTACT, "hebammenzentrum-dortmund", None),
            "consents.0.purpose",
            "name the module",
        ),
        (
            ConsentTerms(ConsentScope.TRAEGER_CONTACT, "hebammenzentrum-dortmund", "yoga"),
            "consents.0.purpose",
            "no offer module 'yoga'",
        ),
        (
            ConsentTerms(ConsentScope.TRAEGER_CONTACT, "hebammenzentrum-dortmund", "elternschule"),
            "consents.0.traeger",
            "does not offer elternschule",
        ),
        (
            ConsentTerms(ConsentScope.TRAEGER_CONTACT, "familienforum-west", "elternschule"),
            "consents.0.traeger",
            "does not serve the Stadtbezirk hoerde",
        ),
        (
            ConsentTerms(ConsentScope.WELCOME_VISIT, "hebammenzentrum-dortmund"),
            "consents.0.traeger",
            "only a traeger_contact consent",
        ),
        (
            ConsentTerms(ConsentScope.SCREENING_DATA_USE, None, "elternschule"),
            "consents.0.purpose",
            "only a traeger_contact consent",
        ),
    ],
)
def test_bad_consents_name_the_field(terms: ConsentTerms, field: str, words: str) -> None:
    with pytest.raises(Refusal) as refused:
        domain.check_consents([terms], CITY, "hoerde")
    assert refused.value.field == field
    assert words in refused.value.reason


def test_a_consent_listed_twice_is_refused() -> None:
    visit = ConsentTerms(ConsentScope.WELCOME_VISIT)
    with pytest.raises(Refusal) as refused:
        domain.check_consents([visit, visit], CITY, "hoerde")
    assert refused.value.field == "consents.1"


NAMED = ConsentRecord(
    "c-named",
    ConsentTerms(ConsentScope.TRAEGER_CONTACT, "hebammenzentrum-dortmund", "familienhebamme"),
    ConsentState.GIVEN,
)
GENERAL = ConsentRecord(
    "c-general",
    ConsentTerms(ConsentScope.TRAEGER_CONTACT, None, "elternschule"),
    ConsentState.GIVEN,
)
WITHDRAWN = ConsentRecord(
    "c-withdrawn",
    ConsentTerms(ConsentScope.TRAEGER_CONTACT, "familienberatung-sued", "erziehungsberatung"),
    ConsentState.WITHDRAWN,
)
VISIT = ConsentRecord("c-visit", ConsentTerms(ConsentScope.WELCOME_VISIT), ConsentState.GIVEN)
ALL = [VISIT, NAMED, GENERAL, WITHDRAWN]


def test_handover_rests_on_the_matching_consent() -> None:
    assert (
        domain.consent_for_handover(ALL, "familienhebamme", "hebammenzentrum-dortmund", None)
        is NAMED
    )
    assert domain.consent_for_handover(ALL, "elternschule", None, None) is GENERAL
    # A consent for the purpose without a named Träger covers a chosen one as well.
    assert (
        domain.consent_for_handover(ALL, "elternschule", "familienbildung-sued-ost", None)
        is GENERAL
    )
    assert (
        domain.consent_for_handover(ALL, "familienhebamme", "hebammenzentrum-dortmund", "c-named")
        is NAMED
    )


@pytest.mark.parametrize(
    ("module", "traeger", "consent_id", "field", "status", "words"),
    [
        ("erziehungsberatung", "familienberatung-sued", None, "traeger", 409, "not consented"),
        ("aufsuchende-elternberatung", None, None, "module", 409, "not consented"),
        ("familienhebamme", None, None, "traeger", 409, "name that Träger"),
        (
            "erziehungsberatung",
            "familienberatung-sued",
            "c-withdrawn",
            "consent_id",
            409,
            "withdrawn",
        ),
        (
            "familienhebamme",
            "hebammenzentrum-dortmund",
            "c-visit",
            "consent_id",
            422,
            "no traeger_contact",
        ),
        ("familienhebamme", None, "c-named", "consent_id", 422, "covers the Träger"),
    ],
)
def test_handover_without_fitting_consent_is_refused(
    module: str, traeger: str | None, consent_id: str | None, field: str, status: int, words: str
) -> None:
    with pytest.raises(Refusal) as refused:
        domain.consent_for_handover(ALL, module, traeger, consent_id)
    assert (refused.value.field, refused.value.status) == (field, status)
    assert words in refused.value.reason


def test_handover_target_must_exist_and_serve_the_bezirk() -> None:
    domain.check_handover_target(CITY, "hoerde", "familienhebamme", None)
    domain.check_handover_target(CITY, "hoerde", "familienhebamme", "hebammenzentrum-dortmund")
    for module, traeger, field in [
        ("yoga", None, "module"),
        ("elternschule", "nobody", "traeger"),
        ("elternschule", "hebammenzentrum-dortmund", "traeger"),
        ("elternschule", "familienforum-west", "traeger"),
    ]:
        with pytest.raises(Refusal) as refused:
            domain.check_handover_target(CITY, "hoerde", module, traeger)
        assert refused.value.field == field


def test_urgency() -> None:
    assert domain.is_urgent(None, SupportNeed.ACUTE, screening_use=True)
    assert not domain.is_urgent(None, SupportNeed.ACUTE, screening_use=False)
    assert not domain.is_urgent(None, SupportNeed.INCREASED, screening_use=True)
    assert domain.is_urgent(True, None, screening_use=False)
    assert not domain.is_urgent(False, SupportNeed.ACUTE, screening_use=True)


def test_modules_must_be_the_citys_and_duplicates_drop() -> None:
    assert domain.check_modules(CITY, ["elternschule", "elternschule"], "wished_modules") == [
        "elternschule"
    ]
    with pytest.raises(Refusal) as refused:
        domain.check_modules(CITY, ["elternschule", "yoga"], "wished_modules")
    assert refused.value.field == "wished_modules.1"


def test_recorded_moments_may_not_lie_ahead() -> None:
    now = datetime(2025, 3, 3, 9, 0, tzinfo=UTC)
    domain.check_not_future("given_at", now, now)
    with pytest.raises(Refusal) as refused:
        domain.check_not_future("given_at", datetime(2025, 3, 4, tzinfo=UTC), now)
    assert refused.value.field == "given_at"
