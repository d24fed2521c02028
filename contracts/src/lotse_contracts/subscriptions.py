"""The subscription registry: who may see which events, with which fields, on which topics.

One TOML file (``lotse_contracts/subscriptions.toml``) declares every audience of the
platform and is the single source for two things:

- **routing**: which event types go to a Bezirksteam's feed (``lotse.bezirk.<slug>``) or to a
  Träger's referral feed (``lotse.partner.<slug>.referrals``), filtered by the event's
  ``bezirk`` / ``traeger`` extension attribute, and which top-level data fields survive the
  trip (data minimisation; purpose limitation under § 64 SGB VIII);
- **access control**: which topics each audience reads and writes and which consumer groups
  it uses, so the Kafka ACLs can be rendered from the same file and nobody can read a topic
  that is not theirs.

Audience kinds:

``bezirksteam``
    One audience per Stadtbezirk (city district) of the configured city: the district's
    coordination team. Reads its own feed only.
``traeger``
    One audience per Träger (provider agency): reads the referrals addressed to it and writes
    its answers to its own responses topic.
``dashboard``
    Dashboards and the Jugendhilfeplanung (youth welfare planning): anonymised key figures
    from ``lotse.reporting.kpis`` only; no routed events.
``service``
    The platform's own services (intake, visits, referrals, reporting): the domain topics
    they consume and the topics they write.

Routing ownership: each producing service routes its own events. Its outbox calls
:meth:`SubscriptionRegistry.route` for every event it publishes and writes the projected
copies to the feeds in the same transaction. Write access to a feed is therefore derived,
never declared: a service may write a member's feed exactly when it produces (CloudEvents
``source`` ``/lotse/<service>``) an event type routed to that member.

Topic and consumer-group patterns may use ``{bezirk}`` and ``{traeger}``. In a
Bezirksteam's or a Träger's own entries the placeholder stands for that member; in service
and dashboard entries it expands to every Stadtbezirk or Träger of the city (ACLs are
literal, so ``lotse.partner.{traeger}.responses`` becomes one topic per Träger).
"""

from __future__ import annotations

import re
import string
import tomllib
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from itertools import product
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lotse_contracts import topics
from lotse_contracts.city import Municipality, describe_errors
from lotse_contracts.cloudevents import CloudEvent
from lotse_contracts.events.base import EventCatalogue, EventModel
from lotse_contracts.personal import EncryptedBlock

AudienceKind = Literal["bezirksteam", "traeger", "dashboard", "service"]
#: Kinds with one audience per city member, and the placeholder naming that member.
MEMBER_PLACEHOLDER: dict[str, str] = {"bezirksteam": "bezirk", "traeger": "traeger"}
#: Kinds that receive routed events on a feed topic.
ROUTED_KINDS = frozenset(MEMBER_PLACEHOLDER)

_TOPIC_NAME = re.compile(r"^[a-zA-Z0-9._-]{1,249}$")
_SERVICE_SOURCE = re.compile(r"^/lotse/(?P<service>[a-z][a-z0-9-]*)$")
_PLACEHOLDERS = frozenset(MEMBER_PLACEHOLDER.values())


class RegistryError(ValueError):
    """The registry file is unreadable or invalid; ``problems`` lists every problem found."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"subscription registry {source} is invalid:\n{lines}")


class RoutingError(ValueError):
    """An event of a routed type cannot be routed (missing or unknown Bezirk / Träger)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def producer_of(model: type[EventModel]) -> str | None:
    """The Lotse service that produces (and so routes) events of this model, from its
    CloudEvents ``source`` ``/lotse/<service>``; None for events from outside (a Träger)."""
    match = _SERVICE_SOURCE.match(model.source)
    return match["service"] if match else None


class _Spec(BaseModel):
    # Unknown keys are typos in a file that decides who sees personal data: reject them.
    model_config = ConfigDict(frozen=True, extra="forbid")


class EventSubscription(_Spec):
    """One event type an audience kind receives, and the data fields that may pass."""

    type: str = Field(description="CloudEvents type, e.g. de.lotse.visits.visit-overdue.v1.")
    fields: list[str] = Field(
        description="Top-level data fields that pass; every other field is dropped."
    )
    bezirke: list[str] | None = Field(
        default=None,
        description="Bezirksteam entries only: limit this type to these Stadtbezirke.",
    )
    traeger: list[str] | None = Field(
        default=None, description="Träger entries only: limit this type to these Träger."
    )


class AudienceSpec(_Spec):
    """One audience kind (or one service) as declared in the registry file."""

    kind: AudienceKind = Field(description="bezirksteam, traeger, dashboard or service.")
    name: str | None = Field(
        default=None, description="Service name (service audiences only; others are named by kind)."
    )
    description: str = Field(default="", description="Who this is and why it gets what it gets.")
    topic: str | None = Field(
        default=None,
        description="Routed kinds: the feed topic pattern routed events are written to.",
    )
    reads: list[str] = Field(
        default_factory=list, description="Further topic patterns the audience reads."
    )
    writes: list[str] = Field(default_factory=list, description="Topic patterns it writes.")
    consumer_groups: list[str] = Field(
        default_factory=list, description="Consumer group patterns it may use."
    )
    events: list[EventSubscription] = Field(
        default_factory=list, description="Routed kinds: event types and fields that pass."
    )

    @model_validator(mode="before")
    @classmethod
    def _no_routed_by(cls, data: Any) -> Any:
        # Older registry files named one routing service; say why the key went away.
        if isinstance(data, dict) and "routed_by" in data:
            raise ValueError(
                "routed_by is no longer supported: each producing service routes its own "
                "events, so write access to a feed follows from the event types routed to it"
            )
        return data

    @property
    def key(self) -> str:
        """The audience's identity in the file: its kind, or service-<name>."""
        return f"service-{self.name}" if self.kind == "service" else self.kind


def _traeger_only() -> list[AudienceKind]:
    return ["traeger"]


class Policy(_Spec):
    """Rules the registry itself must obey, checked on load."""

    never_routed: list[str] = Field(
        default_factory=list,
        description="Event types no feed may carry, e.g. special-category data (Art. 9 GDPR).",
    )
    personal_data_kinds: list[AudienceKind] = Field(
        default_factory=_traeger_only,
        description="Kinds that may receive encrypted personal-data blocks (with consent).",
    )


class RegistryFile(_Spec):
    """The whole registry file."""

    version: Literal[1] = Field(description="Format version of this file.")
    policy: Policy = Field(default_factory=Policy)
    audience: list[AudienceSpec] = Field(min_length=1, description="All audiences.")

    def feed_types(self, kind: AudienceKind) -> list[str]:
        """Event types routed to the feeds of a kind, in file order (any member filter)."""
        return [e.type for a in self.audience if a.kind == kind for e in a.events]


class Audience(BaseModel):
    """One concrete audience of the configured city, as the ACL renderer needs it."""

    model_config = ConfigDict(frozen=True)

    name: str = Field(description='e.g. "bezirksteam-hoerde", "traeger-<slug>", "service-intake".')
    kind: AudienceKind = Field(description="bezirksteam, traeger, dashboard or service.")
    member: str | None = Field(default=None, description="Stadtbezirk or Träger slug, if any.")
    read_topics: list[str] = Field(description="Topics it may read.")
    write_topics: list[str] = Field(description="Topics it may write.")
    consumer_groups: list[str] = Field(description="Consumer groups it may use.")
    event_types: list[str] = Field(
        default_factory=list, description="Event types routed to its feed."
    )


@dataclass(frozen=True)
class _Route:
    kind: str
    topic: str
    allowed: frozenset[str]
    members: frozenset[str] | None
    producer: str | None
    # Whether the projection still satisfies the event's published schema.
    keeps_schema: bool


class SubscriptionRegistry:
    """A validated registry bound to one city. Build it with :func:`load_registry`."""

    def __init__(self, city: Municipality, spec: RegistryFile, catalogue: EventCatalogue) -> None:
        self.city = city
        self.spec = spec
        self._routes: dict[str, list[_Route]] = {}
        for audience in spec.audience:
            if audience.kind not in ROUTED_KINDS or audience.topic is None:
                continue
            for entry in audience.events:
                model = catalogue.model_for(entry.type)
                required = {n for n, f in model.model_fields.items() if f.is_required()}
                members = entry.bezirke if audience.kind == "bezirksteam" else entry.traeger
                self._routes.setdefault(entry.type, []).append(
                    _Route(
                        kind=audience.kind,
                        topic=audience.topic,
                        allowed=frozenset(entry.fields),
                        members=None if members is None else frozenset(members),
                        producer=producer_of(model),
                        keeps_schema=required <= set(entry.fields),
                    )
                )
        self._audiences = _concrete_audiences(spec, city, catalogue)

    def audiences(self) -> list[Audience]:
        """Every concrete audience with its read and write topics and consumer groups."""
        return list(self._audiences)

    def audience(self, name: str) -> Audience:
        """One audience by name; raises ``LookupError``."""
        for audience in self._audiences:
            if audience.name == name:
                return audience
        raise LookupError(f"no audience {name!r} in the registry for {self.city.name}")

    def topics(self) -> list[str]:
        """Every topic some audience reads or writes, sorted (for topic provisioning)."""
        names = {t for a in self._audiences for t in (*a.read_topics, *a.write_topics)}
        return sorted(names)

    def routed_types(self, producer: str | None = None) -> list[str]:
        """Event types that reach at least one feed; with ``producer``, only the types that
        service produces (and therefore routes from its outbox)."""
        return sorted(
            t
            for t, routes in self._routes.items()
            if producer is None or any(r.producer == producer for r in routes)
        )

    def route(self, event: CloudEvent) -> list[tuple[str, CloudEvent]]:
        """The feed topics this event goes to, each with a projected copy of the event.

        The copy keeps every context attribute (id, source, type, subject = the
        pseudonymous case id, time, extensions) and only the allowed data fields. Its
        ``dataschema`` is dropped when the projection removed a field the published schema
        requires, so that nobody validates a projection against the full schema.
        Events of unrouted types go nowhere. Raises :class:`RoutingError` when a routed
        event lacks the Bezirk or Träger that decides its feed, or names one the city
        does not have: such an event belongs in a dead-letter topic, not in a guess.
        """
        routes = self._routes.get(event.type, [])
        if not routes:
            return []
        if not isinstance(event.data, dict):
            raise RoutingError(f"event {event.id} ({event.type}) has no JSON object as data")
        result: list[tuple[str, CloudEvent]] = []
        for route in routes:
            member = self._member(event, route.kind)
            if route.members is not None and member not in route.members:
                continue
            topic = route.topic.format(**{MEMBER_PLACEHOLDER[route.kind]: member})
            data = {k: v for k, v in event.data.items() if k in route.allowed}
            update: dict[str, Any] = {"data": data}
            if not route.keeps_schema:
                update["dataschema"] = None
            result.append((topic, event.model_copy(update=update)))
        return result

    def _member(self, event: CloudEvent, kind: str) -> str:
        attribute = MEMBER_PLACEHOLDER[kind]
        value = event.bezirk if kind == "bezirksteam" else event.traeger
        known = self.city.bezirk_slugs if kind == "bezirksteam" else self.city.traeger_slugs
        if value is None:
            raise RoutingError(
                f"event {event.id} ({event.type}) has no {attribute!r} attribute, "
                f"so it cannot be routed to a {kind} feed"
            )
        if value not in known:
            raise RoutingError(
                f"event {event.id} ({event.type}) names {attribute} {value!r}, "
                f"which {self.city.name} does not have"
            )
        return value

    def fields_for(self, kind: AudienceKind, event_type: str) -> list[str] | None:
        """The data fields a kind receives of an event type, or None if it gets none."""
        for audience in self.spec.audience:
            if audience.kind == kind:
                for entry in audience.events:
                    if entry.type == event_type:
                        return list(entry.fields)
        return None


def load_registry(
    city: Municipality,
    path: str | None = None,
    *,
    catalogue: EventCatalogue | None = None,
) -> SubscriptionRegistry:
    """Load and validate the registry (the packaged one unless ``path`` is given) for a city.

    Raises :class:`RegistryError` listing every problem: unknown event types, fields that
    are not in the event's model, topics outside an audience's scope, unknown Bezirke or
    Träger in a filter, routed events whose producing service is not declared, duplicate
    audiences and breaches of the file's own policy.
    """
    text, source = _read(path)
    return parse_registry(text, city, source=source, catalogue=catalogue)


def read_registry_file(path: str | None = None) -> RegistryFile:
    """The registry file's structure only, not bound to a city and not cross-checked.

    For tools that need the declared audiences and routed types independently of a city
    (the AsyncAPI generator); services use :func:`load_registry`.
    """
    text, source = _read(path)
    return _parse_file(text, source)


def parse_registry(
    text: str,
    city: Municipality,
    *,
    source: str = "<string>",
    catalogue: EventCatalogue | None = None,
) -> SubscriptionRegistry:
    """Validate a registry given as TOML text against a city and an event catalogue."""
    if catalogue is None:
        # Importing the package registers every event model in the shared catalogue.
        from lotse_contracts.events import CATALOGUE

        catalogue = CATALOGUE
    spec = _parse_file(text, source)
    problems = _check(spec, city, catalogue)
    if problems:
        raise RegistryError(source, problems)
    return SubscriptionRegistry(city, spec, catalogue)


def _read(path: str | None) -> tuple[str, str]:
    if path is None:
        resource = resources.files("lotse_contracts").joinpath("subscriptions.toml")
        return resource.read_text(encoding="utf-8"), "subscriptions.toml (packaged)"
    try:
        return Path(path).read_text(encoding="utf-8"), path
    except OSError as exc:
        raise RegistryError(path, [f"cannot read the file: {exc.strerror}"]) from exc


def _parse_file(text: str, source: str) -> RegistryFile:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RegistryError(source, [f"not valid TOML: {exc}"]) from exc
    try:
        return RegistryFile.model_validate(raw)
    except ValidationError as exc:
        raise RegistryError(source, describe_errors(exc, raw)) from None


# --- validation ---------------------------------------------------------------------------


def _check(spec: RegistryFile, city: Municipality, catalogue: EventCatalogue) -> list[str]:
    problems: list[str] = []
    problems += _check_policy(spec.policy, catalogue)
    counts = Counter(a.key for a in spec.audience)
    problems += [f"duplicate audience {key!r} ({n} entries)" for key, n in counts.items() if n > 1]
    services = {a.name: a for a in spec.audience if a.kind == "service" and a.name}
    for audience in spec.audience:
        where = f"audience {audience.key}"
        pattern_problems = _check_patterns(audience)
        problems += [f"{where}: {p}" for p in _check_shape(audience) + pattern_problems]
        if not pattern_problems:  # expanding malformed patterns would only add noise
            problems += [f"{where}: {p}" for p in _check_scope(audience, city)]
        for entry in audience.events:
            problems += [
                f"{where}, event {entry.type}: {p}"
                for p in _check_entry(audience, entry, spec.policy, city, catalogue, services)
            ]
        types = Counter(e.type for e in audience.events)
        problems += [f"{where}: event {t} listed twice" for t, n in types.items() if n > 1]
    if not problems:  # concrete audiences exist only for a well-formed file
        problems += _check_shared_groups(_concrete_audiences(spec, city, catalogue))
    return problems


def _check_shared_groups(audiences: list[Audience]) -> list[str]:
    # Two audiences in one consumer group would steal each other's messages and offsets.
    owners: dict[str, str] = {}
    problems = []
    for audience in audiences:
        for group in audience.consumer_groups:
            if group in owners and owners[group] != audience.name:
                problems.append(
                    f"consumer group {group!r} is used by both {owners[group]} and {audience.name}"
                )
            owners.setdefault(group, audience.name)
    return problems


def _check_policy(policy: Policy, catalogue: EventCatalogue) -> list[str]:
    problems = []
    for event_type in policy.never_routed:
        try:
            catalogue.model_for(event_type)
        except LookupError as exc:
            problems.append(f"policy.never_routed: {exc}")
    return problems


def _check_shape(audience: AudienceSpec) -> list[str]:
    problems = []
    routed = audience.kind in ROUTED_KINDS
    if audience.kind == "service":
        if not audience.name:
            problems.append("a service audience needs a name")
        elif audience.name not in topics.SERVICES:
            problems.append(
                f"unknown service {audience.name!r} (known: {', '.join(topics.SERVICES)})"
            )
    elif audience.name is not None:
        problems.append(
            f"only service audiences have a name; a {audience.kind} is named per member"
        )
    if routed:
        if audience.topic is None:
            problems.append("a routed audience needs a feed topic")
    else:
        if audience.topic is not None:
            problems.append("topic is only for bezirksteam and traeger audiences")
        if audience.events:
            problems.append("only bezirksteam and traeger audiences receive routed events")
    reads = bool(audience.reads or audience.topic)
    if reads and not audience.consumer_groups:
        problems.append("reads topics but declares no consumer group")
    if audience.consumer_groups and not reads:
        problems.append("declares consumer groups but reads no topic")
    return problems


def _check_patterns(audience: AudienceSpec) -> list[str]:
    problems = []
    member = MEMBER_PLACEHOLDER.get(audience.kind)
    allowed = {member} if member else set(_PLACEHOLDERS)
    patterns = [audience.topic] if audience.topic else []
    patterns += audience.reads + audience.writes
    for pattern in patterns + audience.consumer_groups:
        names = _placeholders(pattern)
        if names is None:
            problems.append(f"pattern {pattern!r} is malformed")
            continue
        unknown = names - allowed
        if unknown:
            problems.append(
                f"pattern {pattern!r} uses {', '.join(sorted('{' + n + '}' for n in unknown))}; "
                f"allowed here: {', '.join(sorted('{' + n + '}' for n in allowed))}"
            )
        elif not _TOPIC_NAME.match(pattern.replace("{", "").replace("}", "")):
            problems.append(f"pattern {pattern!r} is not a valid Kafka topic or group name")
    for group in audience.consumer_groups:
        names = _placeholders(group) or set()
        if member and member not in names:
            # A shared group would let one member commit or reset another member's offsets.
            problems.append(f"consumer group {group!r} must contain {{{member}}}")
        if not member and names:
            problems.append(f"consumer group {group!r} must not contain placeholders")
    return problems


def _placeholders(pattern: str) -> set[str] | None:
    try:
        return {name for _, name, _, _ in string.Formatter().parse(pattern) if name is not None}
    except ValueError:
        return None


def _check_scope(audience: AudienceSpec, city: Municipality) -> list[str]:
    problems = []
    reads = ([audience.topic] if audience.topic else []) + audience.reads
    for verb, patterns in (("reads", reads), ("writes", audience.writes)):
        for pattern in patterns:
            # One problem per pattern, not one per member: a twelve-Bezirk error stays readable.
            for member in _instances(audience.kind, city):
                may_read, may_write, rule = _scope(audience, member, city)
                allowed = may_read if verb == "reads" else may_write
                outside = [
                    t for t in _expand(pattern, audience.kind, member, city) if t not in allowed
                ]
                if outside:
                    problems.append(f"{verb} {pattern!r} ({outside[0]}): outside its scope, {rule}")
                    break
    return problems


def _scope(
    audience: AudienceSpec, member: str | None, city: Municipality
) -> tuple[set[str], set[str], str]:
    if audience.kind == "bezirksteam" and member:
        feed = topics.bezirk_feed(member)
        return {feed}, set(), f"a Bezirksteam reads only its own feed {feed} and writes nothing"
    if audience.kind == "traeger" and member:
        feed, answers = topics.partner_referrals(member), topics.partner_responses(member)
        return (
            {feed},
            {answers},
            f"a Träger reads only {feed} and writes only {answers}",
        )
    if audience.kind == "dashboard":
        return (
            {topics.REPORTING_KPIS},
            set(),
            f"a dashboard reads only {topics.REPORTING_KPIS} and writes nothing",
        )
    name = audience.name or ""
    reads = set(topics.DOMAIN_TOPICS) | {topics.REPORTING_KPIS}
    reads |= {topics.partner_responses(t) for t in city.traeger_slugs}
    own = f"lotse.{name}"
    writes = {
        t
        for t in (*topics.DOMAIN_TOPICS, topics.REPORTING_KPIS)
        if t == own or t.startswith(own + ".")
    }
    writes.add(topics.dead_letter(name))
    if name in topics.RESPONSE_WRITERS:
        # Answers over HTTP: validated like the Kafka path, then written where the Träger
        # would have written them; the refusal notices (only on the Träger's feed) read back.
        writes |= {topics.partner_responses(t) for t in city.traeger_slugs}
        reads |= {topics.partner_referrals(t) for t in city.traeger_slugs}
    return (
        reads,
        writes,
        "a service reads domain, reporting and partner response topics and writes only its "
        f"own topics ({', '.join(sorted(writes))}); feed access follows from the routed "
        "events it produces",
    )


def _check_entry(
    audience: AudienceSpec,
    entry: EventSubscription,
    policy: Policy,
    city: Municipality,
    catalogue: EventCatalogue,
    services: dict[str, AudienceSpec],
) -> list[str]:
    problems: list[str] = []
    if entry.type in policy.never_routed:
        problems.append("this type is never routed (policy.never_routed)")
    for attribute, kind, known in (
        ("bezirke", "bezirksteam", city.bezirk_slugs),
        ("traeger", "traeger", city.traeger_slugs),
    ):
        members: list[str] | None = getattr(entry, attribute)
        if members is None:
            continue
        if audience.kind != kind:
            problems.append(f"a {attribute} filter is only for {kind} entries")
            continue
        unknown = [m for m in members if m not in known]
        if unknown:
            what = "Stadtbezirk(e)" if kind == "bezirksteam" else "Träger"
            problems.append(
                f"{attribute} filter names unknown {what} {', '.join(unknown)} of {city.name}"
            )
    try:
        model = catalogue.model_for(entry.type)
    except LookupError as exc:
        return [*problems, str(exc)]
    problems += _check_fields(audience, entry, model, policy)
    if audience.kind == "bezirksteam" and model.bezirk_field is None:
        problems.append("the event carries no bezirk attribute, so it can never reach a feed")
    if audience.kind == "traeger" and model.traeger_field is None:
        problems.append("the event carries no traeger attribute, so it can never reach a feed")
    # The producer routes the event from its outbox, so it must exist as an audience (the
    # feed ACL is granted to it) and must be the one publishing the event's domain topic.
    producer = producer_of(model)
    if producer is None:
        problems.append(
            f"its source {model.source} is no Lotse service, so no outbox would route it"
        )
    elif producer not in services:
        problems.append(
            f"its producer service-{producer} is not declared, so nobody may write the feed"
        )
    elif model.topic not in services[producer].writes:
        problems.append(
            f"its producer service-{producer} does not write {model.topic}, "
            "where this event is published"
        )
    return problems


def _check_fields(
    audience: AudienceSpec, entry: EventSubscription, model: type[EventModel], policy: Policy
) -> list[str]:
    problems = []
    known = model.model_fields
    unknown = [f for f in entry.fields if f not in known]
    if unknown:
        problems.append(
            f"field(s) {', '.join(unknown)} not in {model.__name__} (fields: {', '.join(known)})"
        )
    doubled = sorted(f for f, n in Counter(entry.fields).items() if n > 1)
    if doubled:
        problems.append(f"field(s) listed twice: {', '.join(doubled)}")
    if audience.kind not in policy.personal_data_kinds:
        sealed = [f for f in entry.fields if f in known and _is_sealed(known[f].annotation)]
        if sealed:
            problems.append(
                f"field(s) {', '.join(sealed)} carry an encrypted personal-data block, which "
                f"only {', '.join(policy.personal_data_kinds)} audiences may receive"
            )
    return problems


def _is_sealed(annotation: Any) -> bool:
    """Whether a field type is, or contains, an encrypted block (however it is wrapped)."""
    if isinstance(annotation, type) and issubclass(annotation, EncryptedBlock):
        return True
    return any(_is_sealed(arg) for arg in get_args(annotation))


# --- concrete audiences ---------------------------------------------------------------------


def _members(kind: str, city: Municipality) -> list[str]:
    if kind == "bezirksteam":
        return city.bezirk_slugs
    if kind == "traeger":
        return city.traeger_slugs
    return []


def _instances(kind: str, city: Municipality) -> list[str | None]:
    """One entry per concrete audience: each member of a routed kind, or None (just one)."""
    if kind in ROUTED_KINDS:
        return list(_members(kind, city))
    return [None]


def _expand(pattern: str, kind: str, member: str | None, city: Municipality) -> list[str]:
    names = sorted(_placeholders(pattern) or set())
    own = MEMBER_PLACEHOLDER.get(kind)
    choices: list[Iterable[str]] = []
    for name in names:
        if name == own and member is not None:
            choices.append([member])
        else:
            choices.append(_members("bezirksteam" if name == "bezirk" else "traeger", city))
    return [pattern.format(**dict(zip(names, combo, strict=True))) for combo in product(*choices)]


def _expand_all(
    patterns: Iterable[str], kind: str, member: str | None, city: Municipality
) -> list[str]:
    result: list[str] = []
    for pattern in patterns:
        for topic in _expand(pattern, kind, member, city):
            if topic not in result:
                result.append(topic)
    return result


def _feeds_by_producer(
    spec: RegistryFile, city: Municipality, catalogue: EventCatalogue
) -> dict[str, list[str]]:
    """Each producing service's feed topics: every member feed that gets one of its types.

    Member filters count, so a service whose only routed type is limited to two Bezirke
    writes those two feeds and no others.
    """
    feeds: dict[str, list[str]] = {}
    for audience in spec.audience:
        if audience.kind not in ROUTED_KINDS or not audience.topic:
            continue
        for member in _members(audience.kind, city):
            for entry in audience.events:
                if not _entry_applies(entry, audience.kind, member):
                    continue
                try:
                    producer = producer_of(catalogue.model_for(entry.type))
                except LookupError:
                    continue  # reported by the validation
                if producer is None:
                    continue
                own = feeds.setdefault(producer, [])
                for topic in _expand(audience.topic, audience.kind, member, city):
                    if topic not in own:
                        own.append(topic)
    return feeds


def _concrete_audiences(
    spec: RegistryFile, city: Municipality, catalogue: EventCatalogue
) -> list[Audience]:
    feeds_by_producer = _feeds_by_producer(spec, city, catalogue)
    result: list[Audience] = []
    for audience in spec.audience:
        reads = ([audience.topic] if audience.topic else []) + audience.reads
        for member in _instances(audience.kind, city):
            writes = _expand_all(audience.writes, audience.kind, member, city)
            if audience.kind == "service" and audience.name:
                writes += [t for t in feeds_by_producer.get(audience.name, []) if t not in writes]
            result.append(
                Audience(
                    name=audience.key if member is None else f"{audience.kind}-{member}",
                    kind=audience.kind,
                    member=member,
                    read_topics=_expand_all(reads, audience.kind, member, city),
                    write_topics=writes,
                    consumer_groups=_expand_all(
                        audience.consumer_groups, audience.kind, member, city
                    ),
                    event_types=[
                        e.type for e in audience.events if _entry_applies(e, audience.kind, member)
                    ],
                )
            )
    return result


def _entry_applies(entry: EventSubscription, kind: str, member: str | None) -> bool:
    members = entry.bezirke if kind == "bezirksteam" else entry.traeger
    return members is None or member in members


__all__ = [
    "MEMBER_PLACEHOLDER",
    "ROUTED_KINDS",
    "Audience",
    "AudienceKind",
    "AudienceSpec",
    "EventSubscription",
    "Policy",
    "RegistryError",
    "RegistryFile",
    "RoutingError",
    "SubscriptionRegistry",
    "load_registry",
    "parse_registry",
    "producer_of",
    "read_registry_file",
]
