"""City configuration: the packaged cities, lookups and validation of city files."""

from __future__ import annotations

from datetime import time
from pathlib import Path

import pytest
from lotse_contracts.city import (
    CityConfigError,
    InvalidPostcode,
    Municipality,
    PostcodeOutsideCity,
    UnknownBezirk,
    UnknownCity,
    UnknownTraeger,
    available_cities,
    load_city,
    parse_city,
)

DORTMUND_BEZIRKE = {
    "innenstadt-west": "Innenstadt-West",
    "innenstadt-nord": "Innenstadt-Nord",
    "innenstadt-ost": "Innenstadt-Ost",
    "eving": "Eving",
    "scharnhorst": "Scharnhorst",
    "brackel": "Brackel",
    "aplerbeck": "Aplerbeck",
    "hoerde": "Hörde",
    "hombruch": "Hombruch",
    "luetgendortmund": "Lütgendortmund",
    "huckarde": "Huckarde",
    "mengede": "Mengede",
}

DORTMUND_POSTCODES = {
    "innenstadt-west": ["44135", "44137", "44139"],
    "innenstadt-nord": ["44145", "44147"],
    "innenstadt-ost": ["44141", "44143"],
    "eving": ["44339"],
    "scharnhorst": ["44328", "44329"],
    "brackel": ["44309", "44319"],
    "aplerbeck": ["44287", "44289"],
    "hoerde": ["44263", "44265", "44267", "44269"],
    "hombruch": ["44225", "44227", "44229"],
    "luetgendortmund": ["44379", "44388"],
    "huckarde": ["44149", "44369"],
    "mengede": ["44357", "44359"],
}

# A minimal valid city; tests break one thing at a time.
MINIMAL = """
slug = "teststadt"
name = "Teststadt"

[familienbuero_defaults]
staff = 2
office_hours = [{ weekday = 1, start = "09:00", end = "12:00" }]
visit_hours = [{ weekday = 0, start = "09:00", end = "15:00" }]

[[modules]]
slug = "elternschule"
name = "Elternschule"

[[stadtbezirke]]
slug = "nord"
name = "Nord"
postcodes = ["12345"]
population_share = 0.6

[[stadtbezirke]]
slug = "sued"
name = "Süd"
postcodes = ["12346", "12347"]
population_share = 0.4

[[traeger]]
slug = "bildungswerk"
name = "Bildungswerk Teststadt e. V."
modules = ["elternschule"]
bezirke = ["*"]
capacity_per_month = 10
contact = "info@bildungswerk.example"
"""


@pytest.fixture(scope="module")
def dortmund() -> Municipality:
    return load_city("dortmund")


@pytest.fixture(scope="module")
def hamm() -> Municipality:
    return load_city("hamm")


def write(tmp_path: Path, text: str, name: str = "city.toml") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def problems_of(tmp_path: Path, text: str) -> str:
    with pytest.raises(CityConfigError) as info:
        load_city(write(tmp_path, text))
    return "\n".join(info.value.problems)


# --- packaged cities --------------------------------------------------------------------


def test_packaged_cities() -> None:
    assert available_cities() == ["dortmund", "hamm"]


def test_dortmund_has_its_twelve_bezirke(dortmund: Municipality) -> None:
    assert dortmund.slug == "dortmund"
    assert dortmund.state == "NW"
    assert dortmund.timezone == "Europe/Berlin"
    assert dortmund.welcome_visit_target_days == 14
    assert dortmund.reach_rate_reported == pytest.approx(0.85)
    assert {b.slug: b.name for b in dortmund.stadtbezirke} == DORTMUND_BEZIRKE


@pytest.mark.parametrize(
    ("bezirk", "postcode"),
    [(b, p) for b, codes in DORTMUND_POSTCODES.items() for p in codes],
)
def test_every_dortmund_postcode_maps(dortmund: Municipality, bezirk: str, postcode: str) -> None:
    assert dortmund.bezirk_for_postcode(postcode).slug == bezirk


def test_dortmund_postcode_table_is_complete(dortmund: Municipality) -> None:
    assert {b.slug: b.postcodes for b in dortmund.stadtbezirke} == DORTMUND_POSTCODES
    every = [p for b in dortmund.stadtbezirke for p in b.postcodes]
    assert len(every) == len(set(every))
    assert all("44135" <= p <= "44388" for p in every)


def test_postcode_is_normalised(dortmund: Municipality) -> None:
    assert dortmund.bezirk_for_postcode(" 44263 ").slug == "hoerde"


def test_postcode_outside_city_raises_clearly(dortmund: Municipality) -> None:
    with pytest.raises(PostcodeOutsideCity) as info:
        dortmund.bezirk_for_postcode("59065")
    assert info.value.postcode == "59065"
    assert info.value.city == "Dortmund"
    assert "59065" in str(info.value)
    assert "Dortmund" in str(info.value)
    assert isinstance(info.value, LookupError)


@pytest.mark.parametrize("bad", ["4426", "442633", "44a63", ""])
def test_malformed_postcode_raises(dortmund: Municipality, bad: str) -> None:
    with pytest.raises(InvalidPostcode, match="five digits"):
        dortmund.bezirk_for_postcode(bad)


def test_population_shares_sum_to_one(dortmund: Municipality, hamm: Municipality) -> None:
    for city in (dortmund, hamm):
        assert sum(b.population_share for b in city.stadtbezirke) == pytest.approx(1.0, abs=1e-6)


def test_dortmund_familienbuero_seed(dortmund: Municipality) -> None:
    office = dortmund.bezirk("hoerde").familienbuero
    assert office.name == "Familienbüro Hörde"
    assert [(w.weekday, w.start, w.end) for w in office.office_hours] == [
        (0, time(8, 0), time(10, 30)),
        (3, time(8, 0), time(10, 30)),
    ]
    assert {w.weekday for w in office.visit_hours} == {0, 1, 2, 3, 4}
    assert office.staff >= 1
    assert office.visit_minutes == 60
    assert office.travel_buffer_minutes == 30
    # Per-Bezirk settings override the city's defaults.
    assert dortmund.bezirk("innenstadt-nord").familienbuero.staff == 5
    assert dortmund.bezirk("eving").familienbuero.staff == 3


def test_familienbuero_slugs_match_visit_events(dortmund: Municipality) -> None:
    # Visit events name the office as familienbuero-<bezirk>.
    assert dortmund.bezirk("hoerde").familienbuero.slug == "familienbuero-hoerde"
    slugs = [b.familienbuero.slug for b in dortmund.stadtbezirke]
    assert len(set(slugs)) == 12


def test_time_windows_dump_as_hh_mm(dortmund: Municipality) -> None:
    dumped = dortmund.bezirk("eving").familienbuero.model_dump(mode="json")
    assert dumped["office_hours"][0] == {"weekday": 0, "start": "08:00", "end": "10:30"}


def test_dortmund_offers_every_module_in_every_bezirk(dortmund: Municipality) -> None:
    assert 6 <= len(dortmund.traeger) <= 10
    for module in dortmund.module_slugs:
        for bezirk in dortmund.bezirk_slugs:
            assert dortmund.traeger_offering(module, bezirk), (module, bezirk)


def test_modules_have_display_names(dortmund: Municipality) -> None:
    assert dortmund.module_slugs == [
        "elternschule",
        "aufsuchende-elternberatung",
        "familienhebamme",
        "erziehungsberatung",
        "fit-fuers-baby",
        "hilfe-bevor-es-brennt",
        "familienbildung",
    ]
    assert dortmund.module("fit-fuers-baby").name == "Fit fürs Baby"
    with pytest.raises(LookupError, match="no offer module"):
        dortmund.module("yoga")


def test_lookups_by_slug(dortmund: Municipality) -> None:
    assert dortmund.bezirk("luetgendortmund").name == "Lütgendortmund"
    midwives = dortmund.traeger_by_slug("hebammenzentrum-dortmund")
    assert midwives.city_wide
    assert midwives.serves("mengede")
    assert midwives.offers("familienhebamme")
    nord = dortmund.traeger_by_slug("familienbildungswerk-nord")
    assert nord.serves("eving")
    assert not nord.serves("hoerde")


def test_unknown_bezirk_and_traeger(dortmund: Municipality) -> None:
    with pytest.raises(UnknownBezirk, match="'hamm-mitte'") as bezirk_info:
        dortmund.bezirk("hamm-mitte")
    assert "hoerde" in str(bezirk_info.value)
    with pytest.raises(UnknownTraeger, match="'nobody'") as traeger_info:
        dortmund.traeger_by_slug("nobody")
    assert "hebammenzentrum-dortmund" in str(traeger_info.value)
    with pytest.raises(UnknownBezirk):
        dortmund.traeger_offering("elternschule", "nowhere")


def test_hamm_loads(hamm: Municipality) -> None:
    assert hamm.name == "Hamm"
    assert len(hamm.stadtbezirke) == 7
    assert hamm.reach_rate_reported == pytest.approx(0.68)
    assert 3 <= len(hamm.traeger) <= 4
    assert hamm.bezirk_for_postcode("59065").slug == "hamm-mitte"
    assert hamm.bezirk_for_postcode("59075").slug == "bockum-hoevel"
    # 59077 spans Pelkum and Herringen; it is assigned to Pelkum and shared by Herringen.
    assert hamm.bezirk_for_postcode("59077").slug == "pelkum"
    assert hamm.bezirk("herringen").shared_postcodes == ["59077"]
    with pytest.raises(PostcodeOutsideCity):
        hamm.bezirk_for_postcode("44135")
    for module in hamm.module_slugs:
        for bezirk in hamm.bezirk_slugs:
            assert hamm.traeger_offering(module, bezirk), (module, bezirk)


def test_unknown_city_lists_available() -> None:
    with pytest.raises(UnknownCity) as info:
        load_city("berlin")
    assert "dortmund" in str(info.value)
    assert "hamm" in str(info.value)
    assert info.value.available == ["dortmund", "hamm"]


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(CityConfigError, match="cannot read"):
        load_city(str(tmp_path / "nowhere.toml"))


def test_third_city_from_a_path(tmp_path: Path) -> None:
    city = load_city(write(tmp_path, MINIMAL, "teststadt.toml"))
    assert city.slug == "teststadt"
    assert city.state == "NW"
    assert city.timezone == "Europe/Berlin"
    assert city.welcome_visit_target_days == 14
    assert city.reach_rate_reported is None
    assert city.bezirk_for_postcode("12347").name == "Süd"
    assert city.bezirk("sued").familienbuero.name == "Familienbüro Süd"
    assert city.bezirk("sued").familienbuero.visit_minutes == 60
    assert city.zone().key == "Europe/Berlin"


def test_parse_city_from_text() -> None:
    assert parse_city(MINIMAL).name == "Teststadt"


# --- validation -------------------------------------------------------------------------


def test_invalid_toml(tmp_path: Path) -> None:
    assert "not valid TOML" in problems_of(tmp_path, MINIMAL + "\nslug = = 1\n")


def test_duplicate_bezirk_slug(tmp_path: Path) -> None:
    broken = MINIMAL.replace('slug = "sued"', 'slug = "nord"')
    assert "duplicate Stadtbezirk slug 'nord'" in problems_of(tmp_path, broken)


def test_duplicate_traeger_slug(tmp_path: Path) -> None:
    second = MINIMAL[MINIMAL.index("[[traeger]]") :]
    assert "duplicate Träger slug 'bildungswerk'" in problems_of(tmp_path, MINIMAL + second)


def test_duplicate_familienbuero_slug(tmp_path: Path) -> None:
    broken = MINIMAL.replace(
        "population_share = 0.4",
        'population_share = 0.4\nfamilienbuero = { slug = "familienbuero-nord" }',
    )
    assert "duplicate Familienbüro slug 'familienbuero-nord'" in problems_of(tmp_path, broken)


def test_duplicate_module_slug(tmp_path: Path) -> None:
    broken = MINIMAL + '\n[[modules]]\nslug = "elternschule"\nname = "Nochmal"\n'
    assert "duplicate module slug 'elternschule'" in problems_of(tmp_path, broken)


def test_postcode_in_two_bezirke(tmp_path: Path) -> None:
    broken = MINIMAL.replace('["12346", "12347"]', '["12345", "12347"]')
    assert "postcode 12345 is in two Stadtbezirke: nord and sued" in problems_of(tmp_path, broken)


def test_postcode_twice_in_one_bezirk(tmp_path: Path) -> None:
    broken = MINIMAL.replace('["12346", "12347"]', '["12346", "12346"]')
    assert "listed twice: 12346" in problems_of(tmp_path, broken)


@pytest.mark.parametrize("bad", ["1234", "123456", "12a45", "D-12345"])
def test_malformed_postcode(tmp_path: Path, bad: str) -> None:
    broken = MINIMAL.replace('["12345"]', f'["{bad}"]')
    text = problems_of(tmp_path, broken)
    assert "stadtbezirke[0] (nord).postcodes" in text
    assert "malformed postcode" in text
    assert repr(bad) in text


def test_traeger_naming_unknown_bezirk(tmp_path: Path) -> None:
    broken = MINIMAL.replace('bezirke = ["*"]', 'bezirke = ["nord", "west"]')
    assert "Träger bildungswerk: unknown Stadtbezirk(e) west" in problems_of(tmp_path, broken)


def test_traeger_wildcard_must_stand_alone(tmp_path: Path) -> None:
    broken = MINIMAL.replace('bezirke = ["*"]', 'bezirke = ["*", "nord"]')
    assert '"*" must be the only entry' in problems_of(tmp_path, broken)


def test_traeger_naming_unknown_module(tmp_path: Path) -> None:
    broken = MINIMAL.replace('modules = ["elternschule"]', 'modules = ["elternschule", "yoga"]')
    assert "Träger bildungswerk: unknown module(s) yoga" in problems_of(tmp_path, broken)


def test_office_hours_ending_before_start(tmp_path: Path) -> None:
    broken = MINIMAL.replace('start = "09:00", end = "12:00"', 'start = "12:00", end = "09:00"')
    text = problems_of(tmp_path, broken)
    assert "familienbuero.office_hours[0]" in text
    assert "ends at 09:00, which is not after its start 12:00" in text


def test_overlapping_visit_hours(tmp_path: Path) -> None:
    broken = MINIMAL.replace(
        'visit_hours = [{ weekday = 0, start = "09:00", end = "15:00" }]',
        'visit_hours = [{ weekday = 0, start = "09:00", end = "15:00" },'
        ' { weekday = 0, start = "14:00", end = "16:00" }]',
    )
    assert "visit hours overlap on weekday 0" in problems_of(tmp_path, broken)


@pytest.mark.parametrize("bad", ["9:00", "24:00", "09:00:00", "noon"])
def test_malformed_time(tmp_path: Path, bad: str) -> None:
    broken = MINIMAL.replace('start = "09:00", end = "12:00"', f'start = "{bad}", end = "12:00"')
    assert "is not HH:MM" in problems_of(tmp_path, broken)


def test_weekday_out_of_range(tmp_path: Path) -> None:
    broken = MINIMAL.replace("weekday = 1,", "weekday = 7,")
    assert "office_hours[0].weekday" in problems_of(tmp_path, broken)


def test_shares_not_summing_to_one(tmp_path: Path) -> None:
    broken = MINIMAL.replace("population_share = 0.4", "population_share = 0.3")
    assert "population shares sum to 0.900, not 1.0" in problems_of(tmp_path, broken)


def test_unknown_key_is_rejected(tmp_path: Path) -> None:
    broken = MINIMAL.replace("[familienbuero_defaults]", "[familienbuero_defaults]\nstaf = 3")
    assert "staf: Extra inputs are not permitted" in problems_of(tmp_path, broken)


def test_bad_slug_and_timezone(tmp_path: Path) -> None:
    broken = MINIMAL.replace('slug = "nord"', 'slug = "Nörd"').replace(
        'name = "Teststadt"', 'name = "Teststadt"\ntimezone = "Berlin time"'
    )
    text = problems_of(tmp_path, broken)
    assert "stadtbezirke[0] (Nörd).slug" in text
    assert "'Berlin time' is not an IANA time zone name" in text


def test_shared_postcode_must_belong_to_another_bezirk(tmp_path: Path) -> None:
    broken = MINIMAL.replace(
        'postcodes = ["12345"]', 'postcodes = ["12345"]\nshared_postcodes = ["99999"]'
    )
    assert "shared postcode 99999 is not assigned" in problems_of(tmp_path, broken)


def test_bezirk_without_any_postcode(tmp_path: Path) -> None:
    broken = MINIMAL.replace('postcodes = ["12345"]', "postcodes = []")
    assert "has neither postcodes nor shared_postcodes" in problems_of(tmp_path, broken)


def test_all_problems_reported_at_once(tmp_path: Path) -> None:
    broken = (
        MINIMAL.replace("population_share = 0.4", "population_share = 0.1")
        .replace('bezirke = ["*"]', 'bezirke = ["west"]')
        .replace('modules = ["elternschule"]', 'modules = ["yoga"]')
    )
    with pytest.raises(CityConfigError) as info:
        load_city(write(tmp_path, broken, "broken.toml"))
    assert len(info.value.problems) == 3
    message = str(info.value)
    assert message.startswith(f"city configuration {tmp_path / 'broken.toml'} is invalid:")
    assert "unknown Stadtbezirk(e) west" in message
    assert "unknown module(s) yoga" in message
    assert "population shares" in message


def test_municipality_built_in_code_is_validated_too() -> None:
    with pytest.raises(ValueError, match="population shares"):
        Municipality.model_validate(
            {
                "slug": "x",
                "name": "X",
                "modules": [{"slug": "a", "name": "A"}],
                "stadtbezirke": [
                    {
                        "slug": "one",
                        "name": "One",
                        "postcodes": ["11111"],
                        "population_share": 0.5,
                        "familienbuero": {
                            "staff": 1,
                            "visit_hours": [{"weekday": 0, "start": "09:00", "end": "10:00"}],
                        },
                    }
                ],
            }
        )
