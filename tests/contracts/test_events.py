"""Event models: catalogue completeness, naming, documentation, round trips, parsing errors,
no personal data in clear, examples that fit the Dortmund configuration, upcasting."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, get_args

import pytest
from lotse_contracts import topics
from lotse_contracts.city import Municipality, load_city
from lotse_contracts.cloudevents import (
    STRUCTURED_CONTENT_TYPE,
    CloudEvent,
    from_kafka,
    to_kafka_binary,
    to_structured,
)
from lotse_contracts.events import (
    CATALOGUE,
    EventCatalogue,
    EventDataInvalid,
    EventModel,
    UnknownEventType,
    UnknownEventVersion,
    split_type,
)
from lotse_contracts.events.intake import CasesMerged
from lotse_contracts.events.referrals import AnswerRefused
from lotse_contracts.events.reporting import CITY_TOTAL, KpiUpdated
from lotse_contracts.personal import EncryptedBlock, PersonalData
from lotse_contracts.schemagen import render_schema
from pydantic import BaseModel, ConfigDict

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "contracts" / "schemas"
MODELS = sorted(CATALOGUE.models.items())
TYPES = [t for t, _ in MODELS]
PARTNER_ANSWER = "de.lotse.partner.referral-answer.v1"

#: What the design card names for each step of the chain (de.lotse.<domain>.<event>.v1).
REQUIRED_CHAIN = {
    "intake": [
        "family-registered",
        "needs-assessed",
        "consent-changed",
        "handover-requested",
        "family-erased",
        "cases-merged",  # possible duplicates are merged by the responsible Familienbüro
    ],
    "visits": [
        "visit-scheduled",
        "visit-rescheduled",
        "visit-completed",
        "visit-missed",
        "visit-declined",
        "visit-cancelled",
        "visit-overdue",
    ],
    "referrals": [
        "referral-requested",
        "referral-received",
        "referral-accepted",
        "referral-rejected",
        "referral-in-progress",
        "referral-completed",
        "referral-cancelled",
        "referral-escalated",
    ],
    "reporting": ["kpi-updated"],
}

#: Where each domain's events are published and who produces them.
DOMAIN_TOPIC = {
    "intake": topics.INTAKE,
    "visits": topics.VISITS,
    "referrals": topics.REFERRALS,
    "reporting": topics.REPORTING_KPIS,
    "partner": topics.partner_responses("{traeger}"),
}


# --- completeness ---------------------------------------------------------------------------


def test_catalogue_holds_every_chain_event() -> None:
    expected = {
        f"de.lotse.{domain}.{name}.v1" for domain, names in REQUIRED_CHAIN.items() for name in names
    }
    missing = expected - set(TYPES)
    assert not missing, f"chain events without a model: {sorted(missing)}"
    # Nothing else but the warm-handover confirmation and the Träger's answer.
    assert set(TYPES) - expected == {
        "de.lotse.referrals.referral-first-contact.v1",
        PARTNER_ANSWER,
        # No family lost (issue 18): wishes escalated, partners told of refused answers.
        "de.lotse.referrals.wish-escalated.v1",
        "de.lotse.referrals.answer-refused.v1",
    }


@pytest.mark.parametrize(("event_type", "model"), MODELS, ids=TYPES)
def test_every_model_has_an_example(event_type: str, model: type[EventModel]) -> None:
    example = model.example()
    assert type(example) is model
    assert example.event_type == event_type
    # The example is valid data, not a constructed-without-validation shortcut.
    assert model.model_validate(example.model_dump()) == example


def _documented(model: type[BaseModel], seen: set[type[BaseModel]]) -> Iterator[str]:
    """'Model.field' for every field without a description, nested models included."""
    if model in seen:
        return
    seen.add(model)
    for name, info in model.model_fields.items():
        if not (info.description or "").strip():
            yield f"{model.__name__}.{name}"
        for nested in _nested_models(info.annotation):
            yield from _documented(nested, seen)


def _nested_models(annotation: Any) -> Iterator[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
    for arg in get_args(annotation):
        yield from _nested_models(arg)


@pytest.mark.parametrize(("event_type", "model"), MODELS, ids=TYPES)
def test_every_field_is_described(event_type: str, model: type[EventModel]) -> None:
    assert list(_documented(model, set())) == []
    assert (model.__doc__ or "").strip(), f"{model.__name__} has no docstring"


def test_description_walk_reaches_nested_models() -> None:
    class Inner(BaseModel):
        model_config = ConfigDict(use_attribute_docstrings=True)

        documented: int = 0
        """Has one."""
        bare: int = 0

    class Outer(BaseModel):
        model_config = ConfigDict(use_attribute_docstrings=True)

        inner: list[Inner | None]
        """A list of optional inner models."""

    # The walk must go through list[...] and unions, or the test above proves nothing.
    assert list(_documented(Outer, set())) == ["Inner.bare"]


def test_nested_models_of_the_catalogue_are_walked() -> None:
    seen: set[type[BaseModel]] = set()
    for _, model in MODELS:
        list(_documented(model, seen))
    names = {m.__name__ for m in seen}
    assert {"Consent", "EncryptedBlock"} <= names


# --- naming, source, topic, envelope --------------------------------------------------------


@pytest.mark.parametrize(("event_type", "model"), MODELS, ids=TYPES)
def test_type_source_and_topic(event_type: str, model: type[EventModel]) -> None:
    domain, name, major = split_type(event_type)
    assert event_type == f"de.lotse.{domain}.{name}.v{major}"
    assert major >= 1
    assert model.topic == DOMAIN_TOPIC[domain]
    if domain == "partner":
        assert model.source == "/partner/{traeger}"
        assert model.topic == topics.partner_responses("{traeger}")
    else:
        assert model.source == f"/lotse/{domain}"
        assert domain in topics.SERVICES
        assert model.topic in (*topics.DOMAIN_TOPICS, topics.REPORTING_KPIS)
    assert model.schema_file() == f"/contracts/schemas/{event_type}.json"


def test_reporting_is_the_only_domain_outside_the_domain_topics() -> None:
    outside = {
        t
        for t, m in MODELS
        if m.topic not in topics.DOMAIN_TOPICS and m.topic != topics.partner_responses("{traeger}")
    }
    assert outside == {"de.lotse.reporting.kpi-updated.v1"}


@pytest.mark.parametrize(("event_type", "model"), MODELS, ids=TYPES)
def test_cloudevent_attributes(event_type: str, model: type[EventModel]) -> None:
    example = model.example()
    event = example.to_cloudevent(event_id="evt-1")
    data = example.model_dump(mode="json")
    assert event.type == event_type
    assert event.id == "evt-1"
    assert event.dataschema == model.schema_file()
    assert event.time is not None
    assert event.time.tzinfo is not None
    if isinstance(example, KpiUpdated):
        assert event.subject == example.cell()
        assert "case_id" not in data
    elif isinstance(example, CasesMerged):
        # Keyed by the case that goes away, so it follows that case's own events.
        assert event.subject == data["merged_case_id"]
    elif isinstance(example, AnswerRefused):
        # About a partner's own message, not a family: keyed by the refused event.
        assert event.subject == data["refused_event_id"]
    else:
        assert event.subject == data["case_id"]
    assert event.bezirk == (data.get(model.bezirk_field) if model.bezirk_field else None)
    assert event.traeger == (data.get(model.traeger_field) if model.traeger_field else None)
    if event_type == PARTNER_ANSWER:
        assert event.source == f"/partner/{data['traeger']}"
    else:
        assert event.source == model.source


@pytest.mark.parametrize(("event_type", "model"), MODELS, ids=TYPES)
def test_binary_kafka_round_trip_is_lossless(event_type: str, model: type[EventModel]) -> None:
    example = model.example()
    event = example.to_cloudevent(
        event_id="evt-42", time=datetime(2025, 3, 3, 8, 0, 0, 123456, tzinfo=UTC)
    )
    record = to_kafka_binary(event)
    # The key keeps one family's (or one KPI cell's) events in order.
    assert record.key == (event.subject or "").encode()
    headers = dict(record.headers)
    assert headers["ce_type"] == event_type.encode()
    back = from_kafka(record.value, record.headers)
    assert back == event
    parsed = CATALOGUE.parse(back)
    assert type(parsed) is model
    assert parsed == example
    assert parsed.model_dump(mode="json") == example.model_dump(mode="json")


@pytest.mark.parametrize(("event_type", "model"), MODELS, ids=TYPES)
def test_structured_round_trip(event_type: str, model: type[EventModel]) -> None:
    example = model.example()
    headers = [("content-type", STRUCTURED_CONTENT_TYPE.encode())]
    event = from_kafka(to_structured(example.to_cloudevent()), headers)
    assert CATALOGUE.parse(event) == example


# --- no personal data in clear -----------------------------------------------------------------

PERSONAL_NAMES = {
    "name",
    "names",
    "first_name",
    "last_name",
    "given_name",
    "given_names",
    "family_name",
    "surname",
    "full_name",
    "address",
    "street",
    "house_number",
    "postcode",
    "zip",
    "phone",
    "mobile",
    "email",
    "e_mail",
    "birth_date",
    "birth_dates",
    "date_of_birth",
    "birthday",
}


def _is_personal(prop: str) -> bool:
    lowered = prop.lower()
    return (
        lowered in PERSONAL_NAMES
        or lowered.endswith(("_name", "_names", "_address", "_phone", "_email"))
        or "birth_date" in lowered
        or "date_of_birth" in lowered
    )


def _personal_properties(node: Any, path: str = "$") -> Iterator[str]:
    """Property names anywhere in a schema that look personal, skipping encrypted blocks."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$defs" and isinstance(value, dict):
                for name, definition in value.items():
                    if name == EncryptedBlock.__name__:
                        continue  # opaque by construction: kid, alg, nonce, ciphertext
                    yield from _personal_properties(definition, f"{path}.$defs.{name}")
            elif key in ("properties", "patternProperties") and isinstance(value, dict):
                for prop, sub in value.items():
                    if _is_personal(prop):
                        yield f"{path}.{prop}"
                    yield from _personal_properties(sub, f"{path}.{prop}")
            else:
                yield from _personal_properties(value, f"{path}.{key}")
    elif isinstance(node, list):
        for index, item in enumerate(node):
            yield from _personal_properties(item, f"{path}[{index}]")


def _committed_schemas() -> list[Path]:
    return sorted(SCHEMA_DIR.glob("*.json"))


def test_every_model_has_a_committed_schema() -> None:
    assert {p.stem for p in _committed_schemas()} == set(TYPES)


@pytest.mark.parametrize("path", _committed_schemas(), ids=lambda p: p.stem)
def test_no_personal_field_in_clear(path: Path) -> None:
    schema = json.loads(path.read_text(encoding="utf-8"))
    assert list(_personal_properties(schema)) == []
    # The plaintext models of the sealed blocks never become part of a published schema.
    assert not {"PersonalData", "Screening"} & set(schema.get("$defs", {}))


@pytest.mark.parametrize(("event_type", "model"), MODELS, ids=TYPES)
def test_no_personal_field_in_the_generated_schema(
    event_type: str, model: type[EventModel]
) -> None:
    assert list(_personal_properties(render_schema(model))) == []


def test_personal_scan_finds_clear_personal_fields() -> None:
    # The scan must fire on the plaintext model itself, or it could never fail.
    found = set(_personal_properties(PersonalData.model_json_schema()))
    assert {"$.family_name", "$.street", "$.phone", "$.email", "$.child_birth_dates"} <= found

    class Leaky(BaseModel):
        case_id: str
        contact: dict[str, str]
        mother_name: str

    assert list(_personal_properties({"$defs": {"X": Leaky.model_json_schema()}})) == [
        "$.$defs.X.mother_name"
    ]


def test_sealed_block_is_skipped_but_only_the_block() -> None:
    schema: dict[str, Any] = {
        "$defs": {
            "EncryptedBlock": {"properties": {"email": {}}},
            "Other": {"properties": {"phone": {}}},
        }
    }
    assert list(_personal_properties(schema)) == ["$.$defs.Other.phone"]


# --- parsing: unknown type, unknown major, invalid data ----------------------------------------


def _event(event_type: str, data: Any) -> CloudEvent:
    return CloudEvent(id="evt-9", source="/lotse/visits", type=event_type, data=data)


def _overdue_data(**changes: Any) -> dict[str, Any]:
    data = CATALOGUE.model_for("de.lotse.visits.visit-overdue.v1").example().model_dump(mode="json")
    data.update(changes)
    return data


def test_unknown_event_type() -> None:
    with pytest.raises(
        UnknownEventType, match=r"'de\.lotse\.visits\.visit-forgotten\.v1' is unknown"
    ):
        CATALOGUE.parse(_event("de.lotse.visits.visit-forgotten.v1", _overdue_data()))


def test_malformed_event_type() -> None:
    with pytest.raises(UnknownEventType, match=r"does not follow de\.lotse\."):
        CATALOGUE.parse(_event("com.example.visit-overdue", _overdue_data()))


def test_unknown_major_version() -> None:
    with pytest.raises(UnknownEventVersion) as info:
        CATALOGUE.parse(_event("de.lotse.visits.visit-overdue.v2", _overdue_data()))
    assert not isinstance(info.value, UnknownEventType)
    assert "major version 2 is unknown" in str(info.value)
    assert "de.lotse.visits.visit-overdue.v1" in str(info.value)


def test_invalid_data_names_the_field() -> None:
    with pytest.raises(EventDataInvalid) as info:
        CATALOGUE.parse(_event("de.lotse.visits.visit-overdue.v1", _overdue_data(days_overdue=0)))
    assert info.value.reason.startswith("days_overdue: ")
    assert "greater than or equal to 1" in info.value.reason


def test_missing_field_names_the_field() -> None:
    data = _overdue_data()
    del data["familienbuero"]
    with pytest.raises(EventDataInvalid, match="familienbuero: Field required"):
        CATALOGUE.parse(_event("de.lotse.visits.visit-overdue.v1", data))


def test_nested_field_is_named_by_its_path() -> None:
    model = CATALOGUE.model_for("de.lotse.intake.family-registered.v1")
    data = model.example().model_dump(mode="json")
    data["consents"][1]["scope"] = "everything"
    with pytest.raises(EventDataInvalid, match=r"consents\.1\.scope: Input should be"):
        CATALOGUE.parse(_event(model.event_type, data))


def test_cross_field_rule_is_invalid_data() -> None:
    model = CATALOGUE.model_for("de.lotse.intake.family-registered.v1")
    data = model.example().model_dump(mode="json")
    data["channel"] = "move_in"  # but clinic_id is still set
    with pytest.raises(EventDataInvalid, match="clinic_id is required for channel 'clinic'"):
        CATALOGUE.parse(_event(model.event_type, data))


@pytest.mark.parametrize("data", [None, ["a"], "text", 3])
def test_non_object_data_is_invalid(data: Any) -> None:
    with pytest.raises(EventDataInvalid, match="must be a JSON object"):
        CATALOGUE.parse(_event("de.lotse.visits.visit-overdue.v1", data))


def test_many_errors_are_summarised() -> None:
    with pytest.raises(EventDataInvalid) as info:
        CATALOGUE.parse(_event("de.lotse.visits.visit-scheduled.v1", {}))
    assert info.value.reason.count(";") == 5
    assert info.value.reason.endswith("more")


def test_unknown_fields_are_ignored() -> None:
    # A reader of an older revision keeps working when optional fields are added.
    parsed = CATALOGUE.parse(
        _event("de.lotse.visits.visit-overdue.v1", _overdue_data(added_in_1_1="x"))
    )
    assert "added_in_1_1" not in parsed.model_dump()


# --- upcasting, with a throwaway catalogue -------------------------------------------------------


def _throwaway() -> EventCatalogue:
    catalogue = EventCatalogue()

    @catalogue.register
    class ThingV2(EventModel):
        """Second major: the count is now a list of labels."""

        event_type: ClassVar[str] = "de.lotse.testing.thing.v2"
        topic: ClassVar[str] = "lotse.testing"
        source: ClassVar[str] = "/lotse/testing"
        bezirk_field: ClassVar[str | None] = None

        case_id: str
        labels: list[str]

    @catalogue.upcaster("de.lotse.testing.thing.v1", "de.lotse.testing.thing.v2")
    def _v1_to_v2(data: dict[str, Any]) -> dict[str, Any]:
        count = data.pop("count")
        return {**data, "labels": [f"item-{i}" for i in range(count)]}

    @catalogue.upcaster("de.lotse.testing.thing.v0", "de.lotse.testing.thing.v1")
    def _v0_to_v1(data: dict[str, Any]) -> dict[str, Any]:
        return {"case_id": data["case"], "count": data["n"]}

    return catalogue


def test_upcaster_turns_an_old_major_into_the_current_model() -> None:
    catalogue = _throwaway()
    event = CloudEvent(
        id="1",
        source="/lotse/testing",
        type="de.lotse.testing.thing.v1",
        data={"case_id": "c-1", "count": 2},
    )
    parsed = catalogue.parse(event)
    assert parsed.event_type == "de.lotse.testing.thing.v2"
    assert parsed.model_dump() == {"case_id": "c-1", "labels": ["item-0", "item-1"]}
    # The upcaster worked on a copy: the event itself is unchanged.
    assert event.data == {"case_id": "c-1", "count": 2}


def test_upcasters_chain() -> None:
    catalogue = _throwaway()
    event = CloudEvent(
        id="1", source="/x", type="de.lotse.testing.thing.v0", data={"case": "c-0", "n": 1}
    )
    assert catalogue.parse(event).model_dump() == {"case_id": "c-0", "labels": ["item-0"]}


def test_current_major_is_parsed_without_upcasting() -> None:
    catalogue = _throwaway()
    event = CloudEvent(
        id="1",
        source="/x",
        type="de.lotse.testing.thing.v2",
        data={"case_id": "c-2", "labels": []},
    )
    assert catalogue.parse(event).model_dump() == {"case_id": "c-2", "labels": []}


def test_no_upcaster_means_unknown_version() -> None:
    catalogue = _throwaway()
    event = CloudEvent(id="1", source="/x", type="de.lotse.testing.thing.v3", data={})
    with pytest.raises(UnknownEventVersion, match="major version 3 is unknown"):
        catalogue.parse(event)


def test_upcasted_data_is_still_validated() -> None:
    catalogue = _throwaway()
    event = CloudEvent(
        id="1", source="/x", type="de.lotse.testing.thing.v1", data={"count": 1}
    )  # no case_id
    with pytest.raises(EventDataInvalid, match="case_id: Field required"):
        catalogue.parse(event)


def test_upcaster_refuses_non_object_data() -> None:
    catalogue = _throwaway()
    event = CloudEvent(id="1", source="/x", type="de.lotse.testing.thing.v1", data=[1])
    with pytest.raises(EventDataInvalid, match="must be a JSON object"):
        catalogue.parse(event)


def test_upcaster_cycle_is_detected() -> None:
    catalogue = EventCatalogue()
    catalogue.upcaster("de.lotse.testing.loop.v1", "de.lotse.testing.loop.v2")(lambda d: d)
    catalogue.upcaster("de.lotse.testing.loop.v2", "de.lotse.testing.loop.v1")(lambda d: d)
    event = CloudEvent(id="1", source="/x", type="de.lotse.testing.loop.v1", data={})
    with pytest.raises(UnknownEventVersion, match="upcaster cycle"):
        catalogue.parse(event)


def test_register_refuses_duplicates_and_bad_names() -> None:
    catalogue = EventCatalogue()

    class Thing(EventModel):
        """A thing."""

        event_type: ClassVar[str] = "de.lotse.testing.thing.v1"
        topic: ClassVar[str] = "lotse.testing"
        source: ClassVar[str] = "/lotse/testing"

    class Badly(Thing):
        """Badly named."""

        event_type: ClassVar[str] = "de.lotse.Testing.thing"

    catalogue.register(Thing)
    with pytest.raises(ValueError, match="registered twice"):
        catalogue.register(Thing)
    with pytest.raises(UnknownEventType):
        catalogue.register(Badly)
    assert list(catalogue.models) == ["de.lotse.testing.thing.v1"]
    # The throwaway catalogues never leak into the real one.
    assert not [t for t in CATALOGUE.models if ".testing." in t]


# --- examples fit the Dortmund configuration -----------------------------------------------------


@pytest.fixture(scope="module")
def dortmund() -> Municipality:
    return load_city("dortmund")


def _values(node: Any, key: str) -> Iterator[Any]:
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key and v is not None:
                yield v
            yield from _values(v, key)
    elif isinstance(node, list):
        for item in node:
            yield from _values(item, key)


@pytest.mark.parametrize(("event_type", "model"), MODELS, ids=TYPES)
def test_example_uses_dortmund_members(
    event_type: str, model: type[EventModel], dortmund: Municipality
) -> None:
    data = model.example().model_dump(mode="json")
    for bezirk in _values(data, "bezirk"):
        assert bezirk in [*dortmund.bezirk_slugs, CITY_TOTAL], bezirk
    for traeger in _values(data, "traeger"):
        assert traeger in dortmund.traeger_slugs, f"{event_type}: unknown Träger {traeger}"
    for module in [*_values(data, "module"), *_values(data, "purpose")]:
        assert module in dortmund.module_slugs, module
    for office in _values(data, "familienbuero"):
        assert office == dortmund.bezirk(data["bezirk"]).familienbuero.slug
    if "traeger" in data and "module" in data:
        # The Träger really offers that module in that Bezirk.
        offering = dortmund.traeger_offering(data["module"], data["bezirk"])
        assert data["traeger"] in [t.slug for t in offering]
    event = model.example().to_cloudevent()
    if event.traeger is not None:
        assert event.traeger in dortmund.traeger_slugs
    if event.bezirk is not None:
        assert event.bezirk in dortmund.bezirk_slugs
