"""FULL_TRANSITIVE compatibility of schema revisions within a major version."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from lotse_contracts.compat import check_compatible, check_full_transitive
from lotse_contracts.schemagen import CONTRACTS_DIR, history_entries

FIXTURES = Path(__file__).parent / "fixtures"
SCHEMAS = CONTRACTS_DIR / "schemas"
REGISTERED = "de.lotse.intake.family-registered.v1"


def _load(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture
def published() -> dict[str, Any]:
    schema: dict[str, Any] = _load(SCHEMAS / f"{REGISTERED}.json")
    return schema


def _changed(schema: dict[str, Any]) -> dict[str, Any]:
    return copy.deepcopy(schema)


# --- the broken fixture ---------------------------------------------------------------------


def test_broken_fixture_is_refused_with_readable_reasons(published: dict[str, Any]) -> None:
    broken = _load(FIXTURES / "broken-family-registered.v1.json")
    violations = check_full_transitive([published], broken, labels=[f"schemas/{REGISTERED}.json"])
    assert violations == [
        f'against schemas/{REGISTERED}.json: $.children_count: type changed from ["integer"] '
        'to ["string"]',
        f"against schemas/{REGISTERED}.json: $.household_size: required property added",
    ]


def test_broken_fixture_default_labels(published: dict[str, Any]) -> None:
    broken = _load(FIXTURES / "broken-family-registered.v1.json")
    violations = check_full_transitive([published, published], broken)
    assert len(violations) == 4
    assert violations[0].startswith("against version 1: $.children_count")
    assert violations[2].startswith("against version 2: $.children_count")


def test_labels_must_match_the_history(published: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="labels must name every history entry"):
        check_full_transitive([published], published, labels=["a", "b"])


# --- what passes ----------------------------------------------------------------------------


def test_identical_schema_passes(published: dict[str, Any]) -> None:
    assert check_compatible(published, _changed(published)) == []


def test_adding_an_optional_property_passes(published: dict[str, Any]) -> None:
    new = _changed(published)
    new["properties"]["household_size"] = {
        "type": "integer",
        "minimum": 1,
        "description": "Optional, added in a minor revision.",
    }
    assert check_full_transitive([published], new) == []


def test_documentation_changes_pass(published: dict[str, Any]) -> None:
    new = _changed(published)
    new["description"] = "Reworded."
    new["properties"]["bezirk"]["description"] = "Reworded too."
    new["properties"]["bezirk"]["examples"] = ["hoerde"]
    new["$defs"]["Consent"]["title"] = "A consent"
    assert check_compatible(published, new) == []


def test_renamed_definition_with_same_content_passes(published: dict[str, Any]) -> None:
    new = _changed(published)
    new["$defs"]["ConsentRecord"] = new["$defs"].pop("Consent")
    new["properties"]["consents"]["items"] = {"$ref": "#/$defs/ConsentRecord"}
    assert check_compatible(published, new) == []


# --- what fails -----------------------------------------------------------------------------


def test_removing_a_property_fails(published: dict[str, Any]) -> None:
    new = _changed(published)
    del new["properties"]["preferred_language"]
    assert check_compatible(published, new) == ["$.preferred_language: property removed"]


def test_removing_a_required_property_fails(published: dict[str, Any]) -> None:
    new = _changed(published)
    del new["properties"]["children_count"]
    new["required"].remove("children_count")
    # One reason per property, not one per symptom.
    assert check_compatible(published, new) == ["$.children_count: property removed"]


def test_adding_a_required_property_fails(published: dict[str, Any]) -> None:
    new = _changed(published)
    new["properties"]["household_size"] = {"type": "integer"}
    new["required"].append("household_size")
    assert check_compatible(published, new) == ["$.household_size: required property added"]


def test_making_an_optional_property_required_fails(published: dict[str, Any]) -> None:
    new = _changed(published)
    new["required"].append("preferred_language")
    assert check_compatible(published, new) == ["$.preferred_language: property became required"]


def test_narrowing_an_enum_fails(published: dict[str, Any]) -> None:
    new = _changed(published)
    new["$defs"]["Channel"]["enum"] = ["clinic"]
    violations = check_compatible(published, new)
    assert violations == ['$.channel: enum value(s) removed: "move_in"']


def test_widening_an_enum_fails_too(published: dict[str, Any]) -> None:
    # Old readers would meet a value they cannot handle: a new major version.
    new = _changed(published)
    new["$defs"]["Channel"]["enum"].append("youth_office")
    assert check_compatible(published, new) == ['$.channel: enum value(s) added: "youth_office"']


def test_enum_in_a_nested_definition_fails(published: dict[str, Any]) -> None:
    new = _changed(published)
    new["$defs"]["ConsentScope"]["enum"].remove("screening_data_use")
    assert check_compatible(published, new) == [
        '$.consents[].scope: enum value(s) removed: "screening_data_use"'
    ]


def test_changing_a_type_fails(published: dict[str, Any]) -> None:
    new = _changed(published)
    new["properties"]["days_since_birth_at_registration"]["type"] = "number"
    assert check_compatible(published, new) == [
        '$.days_since_birth_at_registration: type changed from ["integer"] to ["number"]'
    ]


def test_tightening_a_bound_fails(published: dict[str, Any]) -> None:
    new = _changed(published)
    new["properties"]["children_count"]["maximum"] = 10
    assert check_compatible(published, new) == ["$.children_count: maximum changed from 20 to 10"]


def test_changing_a_pattern_fails(published: dict[str, Any]) -> None:
    new = _changed(published)
    new["properties"]["case_id"]["pattern"] = "^[0-9a-f-]+$"
    [violation] = check_compatible(published, new)
    assert violation.startswith("$.case_id: pattern changed from ")


def test_closing_the_object_fails(published: dict[str, Any]) -> None:
    new = _changed(published)
    new["additionalProperties"] = False
    assert check_compatible(published, new) == ["$: additionalProperties set to false"]


def test_changing_a_conditional_rule_fails(published: dict[str, Any]) -> None:
    new = _changed(published)
    new["then"] = {"required": ["clinic_id", "preferred_language"]}
    assert check_compatible(published, new) != []


def test_every_violation_is_reported(published: dict[str, Any]) -> None:
    new = _changed(published)
    del new["properties"]["preferred_language"]
    new["properties"]["children_count"]["type"] = "string"
    new["$defs"]["Channel"]["enum"] = ["clinic"]
    assert len(check_compatible(published, new)) == 3


def test_transitive_means_every_revision(published: dict[str, Any]) -> None:
    # r2 added an optional field, r3 drops it again: fine against r1, not against r2.
    r2 = _changed(published)
    r2["properties"]["household_size"] = {"type": "integer"}
    r3 = _changed(published)
    assert check_compatible(published, r3) == []
    assert check_full_transitive([published, r2], r3) == [
        "against version 2: $.household_size: property removed"
    ]


# --- the committed schemas and their history ------------------------------------------------


def _schemas_with_history() -> list[str]:
    history = SCHEMAS / "history"
    return sorted(p.name for p in history.iterdir() if p.is_dir()) if history.is_dir() else []


def test_history_exists_for_revised_schemas() -> None:
    # The referral schemas were revised (documentation only) after v1 was published.
    assert "de.lotse.referrals.referral-requested.v1" in _schemas_with_history()


@pytest.mark.parametrize("event_type", _schemas_with_history())
def test_committed_schema_is_compatible_with_its_history(event_type: str) -> None:
    current = SCHEMAS / f"{event_type}.json"
    assert current.is_file(), f"history for {event_type} without a current schema"
    entries = history_entries(CONTRACTS_DIR, event_type)
    assert entries, f"empty history folder for {event_type}"
    # Revisions are numbered 1, 2, ... without gaps.
    assert [int(p.stem) for p in entries] == list(range(1, len(entries) + 1))
    history = [_load(p) for p in entries]
    labels = [str(p.relative_to(CONTRACTS_DIR)) for p in entries]
    assert check_full_transitive(history, _load(current), labels=labels) == []
    # Every published revision describes the same event.
    assert {h["$id"] for h in history} == {_load(current)["$id"]}


def test_history_revisions_are_compatible_with_each_other() -> None:
    for event_type in _schemas_with_history():
        revisions = [_load(p) for p in history_entries(CONTRACTS_DIR, event_type)]
        for index in range(1, len(revisions)):
            assert check_full_transitive(revisions[:index], revisions[index]) == [], event_type
