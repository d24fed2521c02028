"""Generate the committed contract files from the event models.

``python -m lotse_contracts.schemagen`` writes, below ``contracts/``:

- ``schemas/<type>.json``: JSON Schema 2020-12 of each event's data, ``$id`` = its path
  below the contracts root (``/contracts/schemas/<type>.json``); a deployment serves it at
  ``<contracts base URL>/schemas/<type>.json``, the events' ``dataschema``;
- ``examples/<type>.json``: each model's example as a structured-mode CloudEvent (its
  ``dataschema`` under the example base ``https://lotse.example/contracts``);
- ``asyncapi.json``: the AsyncAPI 3.0.0 document of all channels. The event types of the
  audience feeds come from the packaged subscription registry (``subscriptions.toml``), so
  the document advertises exactly what is routed.

A published schema is never overwritten incompatibly: when a model's schema differs from the
committed one, the new schema is checked (FULL_TRANSITIVE) against the committed one and
every revision under ``schemas/history/<type>/``. If compatible, the committed schema moves
to the history first; if not, nothing is written and the run fails.

``--check`` writes nothing and exits 1 if any file would change or a change is incompatible
(the CI gate). ``--root DIR`` writes into another directory (used by the drift test).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from lotse_contracts import topics
from lotse_contracts.cloudevents import JSON_CONTENT_TYPE, STRUCTURED_CONTENT_TYPE
from lotse_contracts.compat import check_full_transitive
from lotse_contracts.events import CATALOGUE, EventCatalogue, EventModel
from lotse_contracts.events.base import EXAMPLE_CONTRACTS_BASE, SCHEMA_DIR, TYPE_PATTERN
from lotse_contracts.subscriptions import RegistryFile, read_registry_file

#: ``contracts/`` of the source checkout (this file is contracts/src/lotse_contracts/).
CONTRACTS_DIR = Path(__file__).resolve().parents[2]
JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
ASYNCAPI_VERSION = "3.0.0"
#: Version of the AsyncAPI document; keep in step with contracts/pyproject.toml.
API_VERSION = "1.0.0"
KAFKA_BINDING_VERSION = "0.4.0"
_EXAMPLE_NAMESPACE = uuid.UUID("6f1c2b4e-9a57-4d0e-8c3b-2e7a5d9f0b11")
_FALLBACK_EXAMPLE_TIME = datetime(2025, 3, 3, 8, 0, tzinfo=UTC)

_PROJECTION_NOTE = (
    " Each event's data is projected to the fields the subscription registry grants this "
    "audience; ce_dataschema is left out when the projection drops a field the schema requires."
)


# --- rendering ----------------------------------------------------------------------------


def dumps(document: Any, *, sort_keys: bool = True) -> str:
    """The committed text form: 2-space indent, UTF-8 as is, trailing newline."""
    return json.dumps(document, indent=2, sort_keys=sort_keys, ensure_ascii=False) + "\n"


def render_schema(model: type[EventModel]) -> dict[str, Any]:
    """JSON Schema 2020-12 of one event's data, identified by its dataschema path."""
    schema = model.model_json_schema(mode="validation")
    return {"$schema": JSON_SCHEMA_DIALECT, "$id": model.schema_file(), **schema}


def example_time(example: BaseModel) -> datetime:
    """When the example happened: its last top-level timestamp (``*_at`` by convention)."""
    stamps = [v for v in dict(example).values() if isinstance(v, datetime) and v.tzinfo]
    return stamps[-1] if stamps else _FALLBACK_EXAMPLE_TIME


def render_example(model: type[EventModel]) -> dict[str, Any]:
    """The model's example as a structured-mode CloudEvent with a stable id and time."""
    example = model.example()
    event = example.to_cloudevent(
        event_id=str(uuid.uuid5(_EXAMPLE_NAMESPACE, model.event_type)),
        time=example_time(example),
        schema_base=EXAMPLE_CONTRACTS_BASE,
    )
    document: dict[str, Any] = dict(event.attributes())
    document["data"] = event.data
    return document


def _required_in_model(model: type[EventModel], field_name: str | None) -> bool:
    return field_name is not None and model.model_fields[field_name].is_required()


#: The verdict headers of a dead letter (the runtime's consumer writes them; the names are
#: checked against it in tests/contracts).
DEAD_LETTER_HEADERS: dict[str, str] = {
    "lotse_dlq_reason": "Why the record was refused, in words (at most 1000 characters).",
    "lotse_dlq_stage": "Where it failed: envelope, type, schema, duplicate, rejected, routing "
    "or handler.",
    "lotse_dlq_error": "The exception type for handler failures; empty otherwise.",
    "lotse_dlq_topic": "The topic the record was read from.",
    "lotse_dlq_partition": "Its partition (decimal).",
    "lotse_dlq_offset": "Its offset (decimal).",
    "lotse_dlq_consumer": "The consumer group that refused it.",
    "lotse_dlq_attempts": "How often the handler was tried (decimal).",
    "lotse_dlq_time": "When it was dead-lettered (ISO 8601, UTC).",
    "lotse_dlq_size": "Size of the original value in bytes (decimal).",
    "lotse_dlq_sha256": "SHA-256 of the original value (hex).",
    "lotse_dlq_value": "original: the value is the record's; reference: no value, the "
    "record is named by topic, partition, offset, size and hash.",
    "lotse_dlq_headers": "omitted: the original headers did not fit and were left out.",
}


def dataschema_pattern(event_type: str) -> str:
    """What a ``ce_dataschema`` of ``event_type`` looks like: any contracts base URL (or, on
    events written before the URI, the repository path) followed by /schemas/<type>.json.
    Only dots are escaped: a type is [a-z0-9.-], and ECMAScript rejects an escaped hyphen."""
    legacy = SCHEMA_DIR.removesuffix("/schemas")
    name = event_type.replace(".", "\\.")
    return f"^(?:https?://[^\\s]+|{legacy})/schemas/{name}\\.json$"


def _message(model: type[EventModel]) -> dict[str, Any]:
    """AsyncAPI message: binary-mode CloudEvents headers plus the data schema as payload."""
    required = ["ce_subject", "ce_time", "ce_dataschema"]
    if _required_in_model(model, model.bezirk_field):
        required.append("ce_bezirk")
    if _required_in_model(model, model.traeger_field):
        required.append("ce_traeger")
    source: dict[str, Any] = (
        {"type": "string", "pattern": "^/partner/[a-z0-9]+(-[a-z0-9]+)*$"}
        if "{traeger}" in model.source
        else {"type": "string", "const": model.source}
    )
    is_kpi = model.topic == topics.REPORTING_KPIS
    key_description = (
        "The cell <bezirk>/<period>/<figure>[/<dimension>] (same as ce_subject); the topic "
        "is compacted on it."
        if is_kpi
        else "The pseudonymous case id (same as ce_subject), so one family's events stay in order."
    )
    return {
        "name": model.event_type,
        "title": model.__name__,
        "summary": (model.__doc__ or "").strip().splitlines()[0],
        "contentType": JSON_CONTENT_TYPE,
        "headers": {
            "type": "object",
            "allOf": [
                {"$ref": "#/components/schemas/CloudEventsBinaryHeaders"},
                {
                    "type": "object",
                    "properties": {
                        "ce_type": {"type": "string", "const": model.event_type},
                        "ce_source": source,
                        "ce_dataschema": {
                            "type": "string",
                            "pattern": dataschema_pattern(model.event_type),
                        },
                    },
                    "required": required,
                },
            ],
        },
        "payload": {"$ref": f"./schemas/{model.event_type}.json"},
        "bindings": {
            "kafka": {
                "key": {"type": "string", "description": key_description},
                "bindingVersion": KAFKA_BINDING_VERSION,
            }
        },
    }


def _cloudevents_headers() -> dict[str, Any]:
    def text(description: str, **extra: Any) -> dict[str, Any]:
        return {"type": "string", "description": description, **extra}

    return {
        "type": "object",
        "description": (
            "CloudEvents 1.0 Kafka protocol binding, binary content mode: each context "
            "attribute is a header ce_<name> with a UTF-8 value; the record value is the "
            "JSON data. content-type carries datacontenttype."
        ),
        "required": ["ce_specversion", "ce_id", "ce_source", "ce_type"],
        "properties": {
            "ce_specversion": text("CloudEvents version.", const="1.0"),
            "ce_id": text("Unique per source; source + id is the deduplication key.", minLength=1),
            "ce_source": text("Producer: /lotse/<service> or /partner/<traeger>.", minLength=1),
            "ce_type": text("de.lotse.<domain>.<event>.v<major>.", pattern=TYPE_PATTERN.pattern),
            "ce_subject": text("The pseudonymous case id (key figures: the cell)."),
            "ce_time": text("When the fact happened (RFC 3339).", format="date-time"),
            "ce_dataschema": text(
                "URI of the JSON Schema of the data: <contracts base URL>/schemas/<type>.json, "
                "served read-only by every Lotse service (the base is the deployment's "
                "LOTSE_CONTRACTS_BASE_URL, e.g. https://lotse.example/contracts; the "
                "AsyncAPI document is <base>/asyncapi.json). Events written before it was a "
                "URI carry the path /contracts/schemas/<type>.json; readers accept both.",
                format="uri-reference",
            ),
            "ce_datacontenttype": text("Media type of the data.", const=JSON_CONTENT_TYPE),
            "ce_bezirk": text("Extension: Stadtbezirk (city district) slug."),
            "ce_traeger": text("Extension: slug of the Träger (provider agency)."),
            "content-type": text("Media type of the data.", const=JSON_CONTENT_TYPE),
            "traceparent": text(
                "W3C Trace Context of the producing operation.",
                pattern="^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$",
            ),
            "tracestate": text("W3C Trace Context vendor state."),
        },
    }


@dataclass(frozen=True)
class _Channel:
    key: str
    address: str
    description: str
    types: tuple[str, ...]
    action: str
    parameter: tuple[str, str, tuple[str, ...]] | None = None
    compacted: bool = False


# Longer than 60 lines on purpose: the AsyncAPI channel documents, field by field as the spec
# orders them.
def _channels(catalogue: EventCatalogue, registry: RegistryFile) -> list[_Channel]:
    models = catalogue.models

    def on_topic(topic: str) -> tuple[str, ...]:
        return tuple(sorted(t for t, m in models.items() if m.topic == topic))

    bezirk = ("bezirk", "Stadtbezirk (city district) slug.", ("innenstadt-west", "hoerde"))
    traeger = (
        "traeger",
        "Slug of the Träger (provider agency).",
        ("hebammenzentrum-dortmund", "familienbildung-sued-ost"),
    )
    service = ("service", "The Lotse service that dead-lettered the record.", topics.SERVICES)
    return [
        _Channel(
            "intake",
            topics.INTAKE,
            "Intake: registrations, consent, screening, handovers, erasure.",
            on_topic(topics.INTAKE),
            "send",
        ),
        _Channel(
            "visits",
            topics.VISITS,
            "Welcome visits (Willkommensbesuche) of the Familienbüros.",
            on_topic(topics.VISITS),
            "send",
        ),
        _Channel(
            "referrals",
            topics.REFERRALS,
            "Referral lifecycle (FHIR Task statuses).",
            on_topic(topics.REFERRALS),
            "send",
        ),
        _Channel(
            "reportingKpis",
            topics.REPORTING_KPIS,
            "Anonymised key figures per Bezirk and period; compacted on the cell key.",
            on_topic(topics.REPORTING_KPIS),
            "send",
            compacted=True,
        ),
        _Channel(
            "deadLetters",
            topics.dead_letter("{service}"),
            "Records a service could not process, unchanged, with the error in headers.",
            (),
            "send",
            service,
        ),
        _Channel(
            "bezirkFeed",
            topics.bezirk_feed("{bezirk}"),
            "A Bezirksteam's (district coordination team's) feed: its own Bezirk's events."
            + _PROJECTION_NOTE,
            tuple(registry.feed_types("bezirksteam")),
            "send",
            bezirk,
        ),
        _Channel(
            "partnerReferrals",
            topics.partner_referrals("{traeger}"),
            "Referrals addressed to one Träger; Lotse writes, only that Träger reads."
            + _PROJECTION_NOTE,
            tuple(registry.feed_types("traeger")),
            "send",
            traeger,
        ),
        _Channel(
            "partnerResponses",
            topics.partner_responses("{traeger}"),
            "A Träger's answers to its referrals; only that Träger writes, Lotse reads.",
            on_topic(topics.partner_responses("{traeger}")),
            "receive",
            traeger,
        ),
    ]


# Longer than 60 lines on purpose: the AsyncAPI document, section by section as the spec orders
# them.
def render_asyncapi(
    catalogue: EventCatalogue = CATALOGUE, registry: RegistryFile | None = None
) -> dict[str, Any]:
    """The AsyncAPI 3.0.0 document, from Lotse's point of view (send / receive).

    ``registry`` (default: the packaged subscription registry) says which event types the
    audience feeds carry.
    """
    models = catalogue.models
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    for channel in _channels(catalogue, registry or read_registry_file()):
        unknown = [t for t in channel.types if t not in models]
        if unknown:
            raise ValueError(f"channel {channel.key} lists unknown event types: {unknown}")
        messages = {t: {"$ref": f"#/components/messages/{t}"} for t in channel.types}
        if not channel.types:
            messages = {"DeadLetter": {"$ref": "#/components/messages/DeadLetter"}}
        entry: dict[str, Any] = {
            "address": channel.address,
            "description": channel.description,
            "messages": messages,
        }
        if channel.parameter is not None:
            name, description, examples = channel.parameter
            entry["parameters"] = {name: {"description": description, "examples": list(examples)}}
        if channel.compacted:
            entry["bindings"] = {
                "kafka": {
                    "topicConfiguration": {"cleanup.policy": ["compact"]},
                    "bindingVersion": KAFKA_BINDING_VERSION,
                }
            }
        channels[channel.key] = entry
        verb = "send" if channel.action == "send" else "receive"
        operations[f"{verb}{channel.key[0].upper()}{channel.key[1:]}"] = {
            "action": channel.action,
            "channel": {"$ref": f"#/channels/{channel.key}"},
            "summary": f"Lotse {'publishes to' if verb == 'send' else 'consumes'} "
            f"{channel.address}.",
            "messages": [{"$ref": f"#/channels/{channel.key}/messages/{k}"} for k in messages],
        }
    component_messages: dict[str, Any] = {t: _message(m) for t, m in sorted(models.items())}
    component_messages["DeadLetter"] = {
        "name": "dead-letter",
        "title": "DeadLetter",
        "summary": "A record that failed processing: original value and headers, plus the "
        "error headers of the dead-letter handler.",
        "headers": {
            "type": "object",
            "description": "The original record's headers (ce_* and others), unless "
            "lotse_dlq_headers says they were omitted, plus these verdict headers (UTF-8).",
            "properties": {
                name: {"type": "string", "description": text}
                for name, text in DEAD_LETTER_HEADERS.items()
            },
            "required": [
                "lotse_dlq_reason",
                "lotse_dlq_stage",
                "lotse_dlq_topic",
                "lotse_dlq_partition",
                "lotse_dlq_offset",
                "lotse_dlq_value",
            ],
            "additionalProperties": {"type": "string"},
        },
        "payload": {
            "description": "The original record value, unchanged (lotse_dlq_value "
            "original), or none when only a reference fits (lotse_dlq_value reference)."
        },
    }
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": "Lotse events",
            "version": API_VERSION,
            "description": (
                "Events of Lotse, the case-coordination platform of a municipal prevention "
                "chain for families (Familienbüros, Babylotsen, Träger). CloudEvents 1.0 "
                "over Kafka in binary content mode; structured mode "
                f"({STRUCTURED_CONTENT_TYPE}) is accepted on input. No personal data travels "
                "in clear: it is sealed per family (see the EncryptedBlock schema)."
            ),
        },
        "defaultContentType": JSON_CONTENT_TYPE,
        "channels": channels,
        "operations": operations,
        "components": {
            "schemas": {"CloudEventsBinaryHeaders": _cloudevents_headers()},
            "messages": component_messages,
        },
    }


def generate(catalogue: EventCatalogue = CATALOGUE) -> dict[str, str]:
    """Every generated file: path relative to ``contracts/`` → committed text."""
    files: dict[str, str] = {}
    for event_type, model in sorted(catalogue.models.items()):
        files[f"schemas/{event_type}.json"] = dumps(render_schema(model))
        # Attribute order (specversion, id, ... data) reads better than sorted keys.
        files[f"examples/{event_type}.json"] = dumps(render_example(model), sort_keys=False)
    files["asyncapi.json"] = dumps(render_asyncapi(catalogue))
    return files


# --- planning and writing -----------------------------------------------------------------


@dataclass
class Plan:
    """What a run would do: files to write, schemas to archive, incompatibilities."""

    writes: dict[str, str] = field(default_factory=dict)
    archives: dict[str, str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


def next_major(event_type: str) -> str:
    """``de.lotse.x.y.v1`` → ``de.lotse.x.y.v2``."""
    match = re.fullmatch(r"(?P<stem>.+)\.v(?P<major>[0-9]+)", event_type)
    if match is None:
        raise ValueError(f"not a versioned event type: {event_type}")
    return f"{match['stem']}.v{int(match['major']) + 1}"


def history_entries(root: Path, event_type: str) -> list[Path]:
    """Published revisions of a schema, oldest first (``history/<type>/<n>.json``)."""
    directory = root / "schemas" / "history" / event_type
    if not directory.is_dir():
        return []
    numbered = [p for p in directory.glob("*.json") if p.stem.isdigit()]
    return sorted(numbered, key=lambda p: int(p.stem))


def _load(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def plan(root: Path, catalogue: EventCatalogue = CATALOGUE) -> Plan:
    """Compare the generated files with what is under ``root``."""
    result = Plan()
    for relative, text in generate(catalogue).items():
        path = root / relative
        current = path.read_text(encoding="utf-8") if path.exists() else None
        if current == text:
            continue
        if relative.startswith("schemas/"):
            event_type = relative.removeprefix("schemas/").removesuffix(".json")
            if not _plan_schema(root, event_type, current, text, result):
                continue
        result.writes[relative] = text
    return result


def _plan_schema(root: Path, event_type: str, current: str | None, text: str, out: Plan) -> bool:
    """Check a changed schema; record archive or error. True if it may be written."""
    entries = history_entries(root, event_type)
    published: list[Any] = [_load(p) for p in entries]
    labels = [str(p.relative_to(root)) for p in entries]
    if current is not None:
        if json.loads(current) == json.loads(text):
            return True  # formatting only: nothing was published differently
        published.append(json.loads(current))
        labels.append(f"schemas/{event_type}.json")
    violations = check_full_transitive(published, json.loads(text), labels=labels)
    if violations:
        details = "\n".join(f"    - {v}" for v in violations)
        out.errors.append(
            f"{event_type}: incompatible with its published schema; publish a new major "
            f"version ({next_major(event_type)}) with an upcaster instead:\n{details}"
        )
        return False
    if current is not None:
        number = int(entries[-1].stem) + 1 if entries else 1
        out.archives[f"schemas/{event_type}.json"] = f"schemas/history/{event_type}/{number}.json"
    return True


def apply(root: Path, result: Plan) -> None:
    """Archive the superseded schemas, then write the new files."""
    for source, target in result.archives.items():
        (root / target).parent.mkdir(parents=True, exist_ok=True)
        (root / target).write_text((root / source).read_text(encoding="utf-8"), encoding="utf-8")
    for relative, text in result.writes.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(text, encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m lotse_contracts.schemagen")
    parser.add_argument("--check", action="store_true", help="write nothing; fail on drift")
    parser.add_argument("--root", type=Path, default=CONTRACTS_DIR, help="the contracts/ dir")
    args = parser.parse_args(argv)
    root: Path = args.root
    result = plan(root)
    for error in result.errors:
        print(f"error: {error}", file=sys.stderr)
    if args.check:
        _report("would change", result.writes, root)
        _report("would archive", result.archives, root)
        clean = not (result.writes or result.errors)
        print("contracts are up to date" if clean else "contracts are out of date")
        return 0 if clean else 1
    if result.errors:
        print("nothing written", file=sys.stderr)
        return 1
    apply(root, result)
    _report("archived", result.archives, root)
    _report("wrote", result.writes, root)
    if not result.writes:
        print("contracts are up to date")
    return 0


def _report(verb: str, paths: Iterable[str], root: Path) -> None:
    for relative in paths:
        print(f"{verb}: {root / relative}")


if __name__ == "__main__":
    raise SystemExit(main())
