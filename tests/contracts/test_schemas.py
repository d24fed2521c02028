"""Generated contract files: no drift, valid JSON Schemas, examples that validate, AsyncAPI."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator, FormatChecker
from jsonschema.exceptions import SchemaError
from lotse_contracts import topics
from lotse_contracts.city import load_city
from lotse_contracts.cloudevents import STRUCTURED_CONTENT_TYPE, from_kafka
from lotse_contracts.events import CATALOGUE
from lotse_contracts.events.base import EXAMPLE_CONTRACTS_BASE
from lotse_contracts.schemagen import CONTRACTS_DIR, main, plan
from lotse_contracts.subscriptions import load_registry, read_registry_file

REPO = Path(__file__).resolve().parents[2]
SCHEMAS = sorted((CONTRACTS_DIR / "schemas").glob("*.json"))
HISTORY = sorted((CONTRACTS_DIR / "schemas" / "history").glob("*/*.json"))
EXAMPLES = sorted((CONTRACTS_DIR / "examples").glob("*.json"))
REGISTERED = "de.lotse.intake.family-registered.v1"


def _load(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def test_contracts_dir_is_the_checkout() -> None:
    assert CONTRACTS_DIR == REPO / "contracts"
    assert len(SCHEMAS) == len(EXAMPLES) == len(CATALOGUE.models)


# --- drift ---------------------------------------------------------------------------------


def test_committed_files_are_up_to_date() -> None:
    result = plan(CONTRACTS_DIR)
    assert result.errors == []
    assert sorted(result.writes) == [], "run: uv run python -m lotse_contracts.schemagen"
    assert result.archives == {}


def test_check_command_passes_on_the_checkout() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "lotse_contracts.schemagen", "--check"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "contracts are up to date" in done.stdout


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    """A private copy of the generated contract files to break."""
    root = tmp_path / "contracts"
    shutil.copytree(CONTRACTS_DIR / "schemas", root / "schemas")
    shutil.copytree(CONTRACTS_DIR / "examples", root / "examples")
    shutil.copy(CONTRACTS_DIR / "asyncapi.json", root / "asyncapi.json")
    return root


def _check(root: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    status = main(["--check", "--root", str(root)])
    captured = capsys.readouterr()
    return status, captured.out + captured.err


def test_check_detects_a_changed_example(copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _check(copy, capsys) == (0, "contracts are up to date\n")
    example = copy / "examples" / f"{REGISTERED}.json"
    document = _load(example)
    document["data"]["children_count"] = 2
    example.write_text(json.dumps(document, indent=2), encoding="utf-8")
    status, output = _check(copy, capsys)
    assert status == 1
    assert f"would change: {example}" in output
    assert "contracts are out of date" in output
    # --check wrote nothing; a normal run repairs the file.
    assert _load(example)["data"]["children_count"] == 2
    assert main(["--root", str(copy)]) == 0
    assert example.read_text(encoding="utf-8") == (
        CONTRACTS_DIR / "examples" / f"{REGISTERED}.json"
    ).read_text(encoding="utf-8")
    capsys.readouterr()
    assert _check(copy, capsys)[0] == 0


def test_check_detects_a_missing_file(copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (copy / "asyncapi.json").unlink()
    status, output = _check(copy, capsys)
    assert status == 1
    assert f"would change: {copy / 'asyncapi.json'}" in output


def _history(root: Path) -> list[str]:
    """The archived revisions of the family-registered schema, oldest first."""
    folder = root / "schemas" / "history" / REGISTERED
    if not folder.exists():
        return []
    return sorted((p.name for p in folder.iterdir()), key=lambda name: int(name.split(".")[0]))


def test_formatting_only_change_is_rewritten_without_archiving(
    copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    schema = copy / "schemas" / f"{REGISTERED}.json"
    history = _history(copy)
    schema.write_text(json.dumps(_load(schema)), encoding="utf-8")  # same JSON, one line
    assert _check(copy, capsys)[0] == 1
    assert main(["--root", str(copy)]) == 0
    assert _history(copy) == history


def test_compatible_change_archives_the_published_revision(
    copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Pretend the committed revision said something else in a description: the generated
    # one is a compatible new revision, so the committed text moves to the history.
    schema = copy / "schemas" / f"{REGISTERED}.json"
    published = _load(schema)
    published["properties"]["bezirk"]["description"] = "An older wording."
    schema.write_text(json.dumps(published, indent=2), encoding="utf-8")
    history = _history(copy)
    status, output = _check(copy, capsys)
    assert status == 1
    assert f"would archive: {schema}" in output
    assert main(["--root", str(copy)]) == 0
    archived = copy / "schemas" / "history" / REGISTERED / f"{len(history) + 1}.json"
    assert _history(copy) == [*history, archived.name]
    assert _load(archived) == published
    assert schema.read_text(encoding="utf-8") == (
        CONTRACTS_DIR / "schemas" / schema.name
    ).read_text(encoding="utf-8")


def test_incompatible_change_is_refused(copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The committed revision had a field the model no longer has: regenerating would remove a
    # published property, so nothing may be written.
    schema = copy / "schemas" / f"{REGISTERED}.json"
    published = _load(schema)
    published["properties"]["household_size"] = {"type": "integer"}
    before = json.dumps(published, indent=2)
    schema.write_text(before, encoding="utf-8")
    history = _history(copy)
    status, output = _check(copy, capsys)
    assert status == 1
    assert f"error: {REGISTERED}: incompatible with its published schema" in output
    assert "de.lotse.intake.family-registered.v2" in output
    assert "$.household_size: property removed" in output
    assert main(["--root", str(copy)]) == 1
    assert schema.read_text(encoding="utf-8") == before
    assert _history(copy) == history


def test_history_is_checked_too(copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # An older revision in the history binds as much as the committed one.
    history = copy / "schemas" / "history" / REGISTERED
    history.mkdir(parents=True, exist_ok=True)
    older = _load(copy / "schemas" / f"{REGISTERED}.json")
    older["properties"]["household_size"] = {"type": "integer"}
    (history / "1.json").write_text(json.dumps(older), encoding="utf-8")
    schema = copy / "schemas" / f"{REGISTERED}.json"
    current = _load(schema)
    current["properties"]["bezirk"]["description"] = "Changed wording."
    schema.write_text(json.dumps(current, indent=2), encoding="utf-8")
    status, output = _check(copy, capsys)
    assert status == 1
    assert f"against schemas/history/{REGISTERED}/1.json: $.household_size" in output


# --- JSON Schema validity -----------------------------------------------------------------------


@pytest.mark.parametrize("path", SCHEMAS + HISTORY, ids=lambda p: str(p.relative_to(CONTRACTS_DIR)))
def test_schema_is_valid_json_schema(path: Path) -> None:
    schema = _load(path)
    Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"


@pytest.mark.parametrize("path", SCHEMAS, ids=lambda p: p.stem)
def test_schema_identity(path: Path) -> None:
    schema = _load(path)
    assert schema["$id"] == f"/contracts/schemas/{path.name}"
    assert schema["$id"] == CATALOGUE.model_for(path.stem).schema_file()
    assert schema["type"] == "object"


def test_check_schema_would_catch_a_broken_schema() -> None:
    with pytest.raises(SchemaError):
        Draft202012Validator.check_schema({"type": "integer", "minimum": "zero"})


# --- examples -----------------------------------------------------------------------------------


def _validator_for(example: dict[str, Any]) -> Draft202012Validator:
    path = REPO / "contracts" / example["dataschema"].removeprefix(EXAMPLE_CONTRACTS_BASE + "/")
    return Draft202012Validator(_load(path), format_checker=FormatChecker())


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_validates_against_its_schema(path: Path) -> None:
    example = _load(path)
    assert example["type"] == path.stem
    assert example["dataschema"] == f"{EXAMPLE_CONTRACTS_BASE}/schemas/{path.stem}.json"
    errors = [e.message for e in _validator_for(example).iter_errors(example["data"])]
    assert errors == []


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_is_a_valid_structured_cloudevent(path: Path) -> None:
    headers = [("content-type", STRUCTURED_CONTENT_TYPE.encode())]
    event = from_kafka(path.read_bytes(), headers)
    model = CATALOGUE.model_for(event.type)
    assert CATALOGUE.parse(event) == model.example()


def test_schema_validation_rejects_broken_examples() -> None:
    example = _load(CONTRACTS_DIR / "examples" / f"{REGISTERED}.json")
    validator = _validator_for(example)
    data = example["data"]
    missing = {k: v for k, v in data.items() if k != "case_id"}
    assert not validator.is_valid(missing)
    assert not validator.is_valid({**data, "case_id": "not-a-uuid"})
    assert not validator.is_valid({**data, "children_count": 0})
    # The cross-field rule is in the schema too: clinic_id only for the clinic channel.
    assert not validator.is_valid({**data, "channel": "move_in"})
    without_clinic = {k: v for k, v in data.items() if k != "clinic_id"}
    assert validator.is_valid({**without_clinic, "channel": "move_in"})
    # Unknown fields are allowed (forward compatibility).
    assert validator.is_valid({**data, "added_later": True})


def test_kpi_schema_carries_the_suppression_rule() -> None:
    example = _load(CONTRACTS_DIR / "examples" / "de.lotse.reporting.kpi-updated.v1.json")
    validator = _validator_for(example)
    data = example["data"]
    assert validator.is_valid(data)
    assert not validator.is_valid({**data, "suppressed": True})
    suppressed = {k: v for k, v in data.items() if k != "value"}
    assert validator.is_valid({**suppressed, "suppressed": True})


# --- AsyncAPI ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def asyncapi() -> dict[str, Any]:
    document: dict[str, Any] = _load(CONTRACTS_DIR / "asyncapi.json")
    return document


def _addresses(document: dict[str, Any]) -> dict[str, str]:
    return {c["address"]: key for key, c in document["channels"].items()}


def _channel_types(document: dict[str, Any], address: str) -> list[str]:
    channel = document["channels"][_addresses(document)[address]]
    return sorted(channel["messages"])


def test_asyncapi_version(asyncapi: dict[str, Any]) -> None:
    assert asyncapi["asyncapi"] == "3.0.0"
    assert asyncapi["info"]["version"]
    assert asyncapi["defaultContentType"] == "application/json"


def test_asyncapi_names_every_topic(asyncapi: dict[str, Any]) -> None:
    addresses = set(_addresses(asyncapi))
    assert set(topics.DOMAIN_TOPICS) <= addresses
    assert topics.REPORTING_KPIS in addresses
    assert topics.dead_letter("{service}") in addresses
    assert topics.bezirk_feed("{bezirk}") in addresses
    assert topics.partner_referrals("{traeger}") in addresses
    assert topics.partner_responses("{traeger}") in addresses


def test_asyncapi_parameters(asyncapi: dict[str, Any]) -> None:
    channels = asyncapi["channels"]
    by_address = _addresses(asyncapi)
    dlq = channels[by_address[topics.dead_letter("{service}")]]
    assert dlq["parameters"]["service"]["examples"] == list(topics.SERVICES)
    feed = channels[by_address[topics.bezirk_feed("{bezirk}")]]
    assert "bezirk" in feed["parameters"]
    partner = channels[by_address[topics.partner_referrals("{traeger}")]]
    assert "traeger" in partner["parameters"]
    kpis = channels[by_address[topics.REPORTING_KPIS]]
    assert kpis["bindings"]["kafka"]["topicConfiguration"]["cleanup.policy"] == ["compact"]


def test_asyncapi_names_every_message(asyncapi: dict[str, Any]) -> None:
    messages = asyncapi["components"]["messages"]
    assert set(CATALOGUE.models) <= set(messages)
    on_channels = {t for c in asyncapi["channels"].values() for t in c["messages"]}
    assert set(CATALOGUE.models) <= on_channels
    for event_type, model in CATALOGUE.models.items():
        message = messages[event_type]
        assert message["name"] == event_type
        assert message["payload"] == {"$ref": f"./schemas/{event_type}.json"}
        assert (CONTRACTS_DIR / "schemas" / f"{event_type}.json").is_file()
        header_types = [
            part["properties"]["ce_type"]["const"]
            for part in message["headers"]["allOf"]
            if "properties" in part
        ]
        assert header_types == [event_type]
        assert model.__name__ == message["title"]


def test_asyncapi_references_resolve(asyncapi: dict[str, Any]) -> None:
    messages = asyncapi["components"]["messages"]
    for key, channel in asyncapi["channels"].items():
        for name, ref in channel["messages"].items():
            assert ref == {"$ref": f"#/components/messages/{name}"}
            assert name in messages, (key, name)
    for operation in asyncapi["operations"].values():
        channel_key = operation["channel"]["$ref"].removeprefix("#/channels/")
        assert channel_key in asyncapi["channels"]
        for ref in operation["messages"]:
            prefix = f"#/channels/{channel_key}/messages/"
            assert ref["$ref"].startswith(prefix)
            assert ref["$ref"].removeprefix(prefix) in asyncapi["channels"][channel_key]["messages"]


def test_asyncapi_domain_channels_carry_their_events(asyncapi: dict[str, Any]) -> None:
    for topic in (*topics.DOMAIN_TOPICS, topics.REPORTING_KPIS):
        expected = sorted(t for t, m in CATALOGUE.models.items() if m.topic == topic)
        assert _channel_types(asyncapi, topic) == expected


def test_asyncapi_feeds_match_the_subscription_registry(asyncapi: dict[str, Any]) -> None:
    registry = read_registry_file()
    assert _channel_types(asyncapi, topics.bezirk_feed("{bezirk}")) == sorted(
        registry.feed_types("bezirksteam")
    )
    assert _channel_types(asyncapi, topics.partner_referrals("{traeger}")) == sorted(
        registry.feed_types("traeger")
    )
    assert _channel_types(asyncapi, topics.partner_responses("{traeger}")) == [
        "de.lotse.partner.referral-answer.v1"
    ]
    # Special-category data is never advertised on a feed.
    for address in (topics.bezirk_feed("{bezirk}"), topics.partner_referrals("{traeger}")):
        assert "de.lotse.intake.needs-assessed.v1" not in _channel_types(asyncapi, address)


def test_asyncapi_directions(asyncapi: dict[str, Any]) -> None:
    actions = {
        asyncapi["channels"][op["channel"]["$ref"].removeprefix("#/channels/")]["address"]: op[
            "action"
        ]
        for op in asyncapi["operations"].values()
    }
    assert actions[topics.partner_responses("{traeger}")] == "receive"
    assert actions[topics.partner_referrals("{traeger}")] == "send"
    assert all(actions[t] == "send" for t in topics.DOMAIN_TOPICS)


# --- the partner README stays true -------------------------------------------------------------


def test_readme_names_only_real_types_topics_and_groups() -> None:
    text = (CONTRACTS_DIR / "README.md").read_text(encoding="utf-8")
    dortmund = load_city("dortmund")
    registry = load_registry(dortmund)
    for event_type in set(re.findall(r"de\.lotse\.[a-z]+\.[a-z-]+\.v[0-9]+", text)):
        assert event_type in CATALOGUE.models, event_type
    partner_topics = set(re.findall(r"lotse\.partner\.([a-z0-9-]+)\.(?:referrals|responses)", text))
    assert partner_topics, "the README shows no concrete partner topic"
    for slug in partner_topics:
        assert slug in dortmund.traeger_slugs, slug
        audience = registry.audience(f"traeger-{slug}")
        for group in re.findall(r'group_id="([^"]+)"', text):
            assert group in audience.consumer_groups
    for source in re.findall(r"/partner/([a-z0-9-]+)", text):
        assert source in dortmund.traeger_slugs
    assert STRUCTURED_CONTENT_TYPE in text


def test_the_asyncapi_documents_every_dead_letter_header_the_runtime_writes() -> None:
    from lotse_contracts.schemagen import DEAD_LETTER_HEADERS
    from lotse_runtime import consumer

    written = {
        value
        for name, value in vars(consumer).items()
        if name.startswith("DLQ_") and isinstance(value, str) and value.startswith("lotse_dlq_")
    }
    assert written == set(DEAD_LETTER_HEADERS)


def test_asyncapi_dataschema_header_takes_any_base_and_the_old_path(
    asyncapi: dict[str, Any],
) -> None:
    """A deployment names its own contracts base URL; events written before the URI carry
    the repository path. The header's pattern admits both, and only the event's own schema."""
    event_type = "de.lotse.referrals.referral-requested.v1"
    message = asyncapi["components"]["messages"][event_type]
    [_, own] = message["headers"]["allOf"]
    pattern = re.compile(own["properties"]["ce_dataschema"]["pattern"])
    for good in (
        f"https://lotse.example/contracts/schemas/{event_type}.json",
        f"http://127.0.0.1:8003/contracts/schemas/{event_type}.json",
        f"/contracts/schemas/{event_type}.json",
    ):
        assert pattern.match(good), good
    for bad in (
        f"https://lotse.example/contracts/schemas/{event_type.replace('.v1', '.v2')}.json",
        f"/elsewhere/schemas/{event_type}.json",
        f"{event_type}.json",
    ):
        assert not pattern.match(bad), bad
