"""Kafka topics and access rights of a deployment, rendered from the subscription registry.

The registry (``lotse_contracts/subscriptions.toml``) says which topics each audience reads
and writes and which consumer groups it uses; the city file says which Bezirksteams
(district teams) and Träger (provider agencies) exist. From the two this module renders the
Strimzi resources that make that binding on a real cluster:

* one ``KafkaUser`` per audience (each Bezirksteam, each Träger, the dashboard, each service)
  with exactly the ACLs the registry allows: Read + Describe on the topics it reads,
  Write + Describe on the topics it writes, Read on its consumer groups, nothing else;
* one ``KafkaTopic`` per topic the platform uses (domain, reporting, dead letters and the
  audience feeds), with partitions, replication and retention from the topic plan
  (``deploy/topics.toml``).

``lotse acls`` writes them to ``deploy/k8s/components/kafka-users`` and ``.../kafka-topics``
(two kustomize components), ``lotse acls --check`` fails when the committed files drift from
what the registry says, and ``lotse acls --create-topics`` creates the same topics on a
running Kafka (the docker-compose init step). A registry that grants an audience a topic
outside its scope, or names a Stadtbezirk or Träger the city does not have, fails before
anything is written: the registry's own validation reports it, and the renderer checks every
ACL against the same scope rules again, so a loosened validation cannot widen an ACL.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import time
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lotse_contracts import topics as topic_names
from lotse_contracts.city import CityConfigError, Municipality, UnknownCity, load_city
from lotse_contracts.subscriptions import (
    Audience,
    RegistryError,
    SubscriptionRegistry,
    load_registry,
)
from lotse_runtime.kafka import (
    MAX_RECORD_BYTES,
    KafkaConfig,
    TopicSpec,
    ensure_topics,
    platform_topics,
)
from pydantic import BaseModel, ConfigDict, Field, ValidationError

STRIMZI_API = "kafka.strimzi.io/v1"
KUSTOMIZE_COMPONENT_API = "kustomize.config.k8s.io/v1alpha1"
DEFAULT_CLUSTER = "lotse"
DEFAULT_CITY = "dortmund"
DEFAULT_OUT_DIR = Path("deploy/k8s/components")
DEFAULT_TOPICS_CONFIG = Path("deploy/topics.toml")
USERS_DIR = "kafka-users"
TOPICS_DIR = "kafka-topics"

Authentication = Literal["scram-sha-512", "tls"]
TopicClassName = Literal[
    "domain",
    "reporting",
    "dead_letter",
    "bezirk_feed",
    "partner_referrals",
    "partner_responses",
]
TOPIC_CLASSES: tuple[TopicClassName, ...] = (
    "domain",
    "reporting",
    "dead_letter",
    "bezirk_feed",
    "partner_referrals",
    "partner_responses",
)

# Kubernetes object names (DNS-1123 subdomain); KafkaTopic and KafkaUser names are the
# Kafka topic and user names, so they must fit both worlds.
_K8S_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_KAFKA_NAME = re.compile(r"^[a-zA-Z0-9._-]{1,249}$")


class AclRenderError(ValueError):
    """The registry, the city or the topic plan cannot be turned into resources."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"cannot render Kafka users and topics:\n{lines}")


# --- the topic plan (deploy/topics.toml) -----------------------------------------------------


class _Strict(BaseModel):
    # A typo in a retention key would silently keep the broker default: reject unknown keys.
    model_config = ConfigDict(frozen=True, extra="forbid")


class TopicClass(_Strict):
    """Settings shared by every topic of one class; unset values fall back to the defaults."""

    partitions: int | None = Field(default=None, ge=1, description="Partitions per topic.")
    replicas: int | None = Field(default=None, ge=1, description="Replication factor.")
    retention_ms: int | None = Field(
        default=None, ge=-1, description="retention.ms; -1 keeps every record."
    )
    cleanup_policy: Literal["delete", "compact", "compact,delete"] | None = Field(
        default=None, description="cleanup.policy."
    )
    config: dict[str, str | int] = Field(
        default_factory=dict, description="Further topic configs, e.g. max.message.bytes."
    )


class TopicPlan(_Strict):
    """Partitions, replication and retention of the platform's topics, by class."""

    version: Literal[1] = Field(description="Format version of the file.")
    partitions: int = Field(default=3, ge=1, description="Default partitions per topic.")
    replicas: int = Field(default=1, ge=1, description="Default replication factor.")
    max_message_bytes: int = Field(
        default=MAX_RECORD_BYTES,
        ge=64 * 1024,
        description="max.message.bytes of every topic: the runtime's kafka_max_record_bytes.",
    )
    classes: dict[TopicClassName, TopicClass] = Field(default_factory=dict)

    def settings(self, name: TopicClassName) -> TopicClass:
        return self.classes.get(name, TopicClass())


@dataclass(frozen=True)
class PlannedTopic:
    """One topic as it is created: name on the cluster, class and settings."""

    name: str
    topic_class: TopicClassName
    partitions: int
    replicas: int
    config: Mapping[str, str | int] = field(default_factory=dict)

    def spec(self) -> TopicSpec:
        """The runtime's topic spec (for :func:`lotse_runtime.kafka.ensure_topics`)."""
        return TopicSpec(
            self.name,
            self.partitions,
            self.replicas,
            {key: str(value) for key, value in self.config.items()},
        )


def parse_topic_plan(text: str, *, source: str = "<string>") -> TopicPlan:
    """Validate a topic plan given as TOML text; raises :class:`AclRenderError`."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise AclRenderError([f"{source}: not valid TOML: {exc}"]) from exc
    try:
        plan = TopicPlan.model_validate(raw)
    except ValidationError as exc:
        raise AclRenderError(
            [
                f"{source}: {'.'.join(str(p) for p in error['loc']) or '(top)'}: {error['msg']}"
                for error in exc.errors()
            ]
        ) from None
    problems = _plan_problems(plan)
    if problems:
        raise AclRenderError([f"{source}: {p}" for p in problems])
    return plan


def load_topic_plan(path: Path) -> TopicPlan:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise AclRenderError([f"{path}: cannot read the topic plan: {exc.strerror}"]) from exc
    return parse_topic_plan(text, source=str(path))


def _plan_problems(plan: TopicPlan) -> list[str]:
    problems = []
    domain = plan.settings("domain")
    # Reporting is rebuilt by replaying the domain topics from offset 0.
    if domain.retention_ms not in (None, -1) or domain.cleanup_policy not in (None, "delete"):
        problems.append(
            "classes.domain must keep every record (retention_ms = -1, cleanup_policy = "
            '"delete"): reporting is rebuilt by replaying the domain topics from offset 0'
        )
    if domain.retention_ms is None:
        problems.append("classes.domain.retention_ms must be set (-1): the broker default drops")
    reporting = plan.settings("reporting")
    if "compact" not in (reporting.cleanup_policy or ""):
        problems.append(
            'classes.reporting must be compacted (cleanup_policy = "compact"): a dashboard '
            "that subscribes late reads the latest value per key"
        )
    for name, settings in plan.classes.items():
        for key in settings.config:
            if key in ("retention.ms", "cleanup.policy"):
                problems.append(
                    f"classes.{name}.config.{key}: use retention_ms / cleanup_policy instead"
                )
    return problems


def classify(name: str, *, prefix: str = "") -> TopicClassName:
    """The class of a platform topic, by its name; raises ``ValueError`` for a stranger."""
    bare = name.removeprefix(prefix) if prefix and name.startswith(prefix) else name
    if bare in topic_names.DOMAIN_TOPICS:
        return "domain"
    if bare == topic_names.REPORTING_KPIS:
        return "reporting"
    if bare.startswith("lotse.dlq."):
        return "dead_letter"
    if bare.startswith("lotse.bezirk."):
        return "bezirk_feed"
    if bare.startswith("lotse.partner.") and bare.endswith(".referrals"):
        return "partner_referrals"
    if bare.startswith("lotse.partner.") and bare.endswith(".responses"):
        return "partner_responses"
    raise ValueError(f"topic {name!r} belongs to no topic class ({', '.join(TOPIC_CLASSES)})")


def planned_topics(
    registry: SubscriptionRegistry, plan: TopicPlan, *, prefix: str = ""
) -> list[PlannedTopic]:
    """Every topic of the platform for this registry, with the plan's settings, sorted."""
    problems: list[str] = []
    result = []
    for spec in platform_topics(registry, prefix=prefix):
        try:
            topic_class = classify(spec.name, prefix=prefix)
        except ValueError as exc:
            problems.append(str(exc))
            continue
        settings = plan.settings(topic_class)
        config: dict[str, str | int] = {}
        policy = settings.cleanup_policy or spec.config.get("cleanup.policy")
        if policy:
            config["cleanup.policy"] = policy
        if settings.retention_ms is not None:
            config["retention.ms"] = settings.retention_ms
        config["max.message.bytes"] = plan.max_message_bytes
        config.update(settings.config)
        result.append(
            PlannedTopic(
                name=spec.name,
                topic_class=topic_class,
                partitions=settings.partitions or plan.partitions,
                replicas=settings.replicas or plan.replicas,
                config=config,
            )
        )
    if problems:
        raise AclRenderError(problems)
    return result


# --- Strimzi resources -------------------------------------------------------------------


# Longer than 60 lines on purpose: one audience's rules against the registry, each check with its
# message.
def check_audience(audience: Audience, city: Municipality, prefix: str = "") -> list[str]:
    """The registry's scope rules, checked again on the concrete ACLs (defence in depth)."""
    problems = []
    name = audience.name
    if not _K8S_NAME.match(name):
        problems.append(f"audience name {name!r} is not a valid Kubernetes/Kafka user name")

    def own(topics: Iterable[str]) -> set[str]:
        return {prefix + t for t in topics}

    member = audience.member
    if audience.kind == "bezirksteam":
        if member not in city.bezirk_slugs:
            problems.append(f"{name}: names Stadtbezirk {member!r}, which {city.name} lacks")
        may_read, may_write = own([topic_names.bezirk_feed(str(member))]), set()
    elif audience.kind == "traeger":
        if member not in city.traeger_slugs:
            problems.append(f"{name}: names Träger {member!r}, which {city.name} lacks")
        may_read = own([topic_names.partner_referrals(str(member))])
        may_write = own([topic_names.partner_responses(str(member))])
    elif audience.kind == "dashboard":
        may_read, may_write = own([topic_names.REPORTING_KPIS]), set()
    else:
        service = name.removeprefix("service-")
        if service not in topic_names.SERVICES:
            problems.append(f"{name}: no such service (known: {', '.join(topic_names.SERVICES)})")
        may_read = own(
            [
                *topic_names.DOMAIN_TOPICS,
                topic_names.REPORTING_KPIS,
                *(topic_names.partner_responses(t) for t in city.traeger_slugs),
                # The refusal notices a Träger answering over HTTP must hear of (delivery).
                *(
                    topic_names.partner_referrals(t)
                    for t in city.traeger_slugs
                    if service in topic_names.RESPONSE_WRITERS
                ),
            ]
        )
        may_write = own(
            [
                t
                for t in (*topic_names.DOMAIN_TOPICS, topic_names.REPORTING_KPIS)
                if t == f"lotse.{service}" or t.startswith(f"lotse.{service}.")
            ]
            + [topic_names.dead_letter(service)]
            + [topic_names.bezirk_feed(b) for b in city.bezirk_slugs]
            + [topic_names.partner_referrals(t) for t in city.traeger_slugs]
            # Answers over HTTP go where the Träger would have written them (delivery).
            + (
                [topic_names.partner_responses(t) for t in city.traeger_slugs]
                if service in topic_names.RESPONSE_WRITERS
                else []
            )
        )
    for verb, granted, allowed in (
        ("read", audience.read_topics, may_read),
        ("write", audience.write_topics, may_write),
    ):
        for topic in granted:
            if not _KAFKA_NAME.match(topic):
                problems.append(f"{name}: {verb} topic {topic!r} is not a literal topic name")
            elif topic not in allowed:
                problems.append(f"{name}: may not {verb} {topic}: outside its scope")
    for group in audience.consumer_groups:
        if not _KAFKA_NAME.match(group):
            problems.append(f"{name}: consumer group {group!r} is not a literal group name")
        elif member is not None and not re.search(rf"(^|[-._]){re.escape(member)}($|[-._])", group):
            problems.append(f"{name}: consumer group {group!r} does not name its own {member}")
        elif audience.kind == "service" and group != f"lotse-{name.removeprefix('service-')}":
            # The runtime names a service's groups lotse-<service>-<consumer>; any other
            # group could only be someone else's.
            problems.append(f"{name}: consumer group {group!r} is not lotse-<service>")
    return problems


def _acl(kind: str, name: str, pattern: str, operations: list[str]) -> dict[str, Any]:
    return {
        "resource": {"type": kind, "name": name, "patternType": pattern},
        "operations": operations,
        "host": "*",
    }


def kafka_user(
    audience: Audience,
    *,
    cluster: str = DEFAULT_CLUSTER,
    authentication: Authentication = "scram-sha-512",
    prefix: str = "",
) -> dict[str, Any]:
    """The Strimzi ``KafkaUser`` of one audience (topics already carry ``prefix``)."""
    operations: dict[str, list[str]] = {}
    for topic in audience.read_topics:
        operations.setdefault(topic, []).append("Read")
    for topic in audience.write_topics:
        operations.setdefault(topic, []).append("Write")
    acls = [
        _acl("topic", topic, "literal", [*ops, "Describe"])
        for topic, ops in sorted(operations.items())
    ]
    for group in sorted(audience.consumer_groups):
        if audience.kind == "service":
            # A service's groups are lotse-<service>-<consumer> (ServiceSettings.
            # consumer_group); the trailing dash keeps lotse-visits from covering a
            # hypothetical lotse-visitsfoo.
            acls.append(_acl("group", f"{prefix}{group}-", "prefix", ["Read"]))
        else:
            acls.append(_acl("group", f"{prefix}{group}", "literal", ["Read"]))
    labels = {
        "strimzi.io/cluster": cluster,
        "app.kubernetes.io/part-of": "lotse",
        "lotse.de/audience-kind": audience.kind,
    }
    if audience.member:
        labels["lotse.de/audience-member"] = audience.member
    return {
        "apiVersion": STRIMZI_API,
        "kind": "KafkaUser",
        "metadata": {"name": audience.name, "labels": labels},
        "spec": {
            "authentication": {"type": authentication},
            "authorization": {"type": "simple", "acls": acls},
        },
    }


def _prefixed(audience: Audience, prefix: str) -> Audience:
    if not prefix:
        return audience
    return audience.model_copy(
        update={
            "read_topics": [prefix + t for t in audience.read_topics],
            "write_topics": [prefix + t for t in audience.write_topics],
            "consumer_groups": list(audience.consumer_groups),
        }
    )


def kafka_users(
    registry: SubscriptionRegistry,
    *,
    cluster: str = DEFAULT_CLUSTER,
    authentication: Authentication = "scram-sha-512",
    prefix: str = "",
) -> list[dict[str, Any]]:
    """One ``KafkaUser`` per audience; raises :class:`AclRenderError` on any scope breach."""
    audiences = [_prefixed(a, prefix) for a in registry.audiences()]
    problems = [p for a in audiences for p in check_audience(a, registry.city, prefix)]
    names = [a.name for a in audiences]
    problems += [f"audience {n!r} appears twice" for n in sorted(set(names)) if names.count(n) > 1]
    if problems:
        raise AclRenderError(problems)
    return [
        kafka_user(a, cluster=cluster, authentication=authentication, prefix=prefix)
        for a in audiences
    ]


def kafka_topic(topic: PlannedTopic, *, cluster: str = DEFAULT_CLUSTER) -> dict[str, Any]:
    """The Strimzi ``KafkaTopic`` of one planned topic."""
    if not _K8S_NAME.match(topic.name):
        raise AclRenderError([f"topic {topic.name!r} is not a valid Kubernetes object name"])
    return {
        "apiVersion": STRIMZI_API,
        "kind": "KafkaTopic",
        "metadata": {
            "name": topic.name,
            "labels": {
                "strimzi.io/cluster": cluster,
                "app.kubernetes.io/part-of": "lotse",
                "lotse.de/topic-class": topic.topic_class.replace("_", "-"),
            },
        },
        "spec": {
            "partitions": topic.partitions,
            "replicas": topic.replicas,
            "config": dict(topic.config),
        },
    }


# --- YAML without a YAML library (the runtime image has none) -----------------------------

_PLAIN = re.compile(r"^[A-Za-z][A-Za-z0-9._/-]*$")
# YAML 1.1 reads these words as booleans or null; they must stay strings.
_RESERVED = frozenset({"y", "n", "yes", "no", "on", "off", "true", "false", "null"})


def _scalar(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, dict) and not value:
        return "{}"
    if isinstance(value, list) and not value:
        return "[]"
    if isinstance(value, str):
        if _PLAIN.match(value) and value.lower() not in _RESERVED:
            return value
        # A JSON string is a valid double-quoted YAML scalar.
        return json.dumps(value, ensure_ascii=False)
    raise TypeError(f"cannot write {type(value).__name__} as YAML")


def _emit(value: object, indent: int) -> list[str]:
    pad = " " * indent
    lines: list[str] = []
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, dict | list) and item:
                lines.append(f"{pad}{_scalar(str(key))}:")
                lines += _emit(item, indent + 2)
            else:
                lines.append(f"{pad}{_scalar(str(key))}: {_scalar(item)}")
        return lines
    if isinstance(value, list):
        for item in value:
            if isinstance(item, dict | list) and item:
                nested = _emit(item, indent + 2)
                lines.append(f"{pad}- {nested[0][indent + 2 :]}")
                lines += nested[1:]
            else:
                lines.append(f"{pad}- {_scalar(item)}")
        return lines
    return [pad + _scalar(value)]


def to_yaml(documents: Sequence[Mapping[str, Any]], *, header: Sequence[str] = ()) -> str:
    """A multi-document YAML text in the layout of the hand-written manifests."""
    lines = [f"# {line}".rstrip() for line in header]
    for document in documents:
        lines.append("---")
        lines += _emit(dict(document), 0)
    return "\n".join(lines) + "\n"


# --- rendering the component directories --------------------------------------------------


@dataclass(frozen=True)
class RenderOptions:
    cluster: str = DEFAULT_CLUSTER
    authentication: Authentication = "scram-sha-512"
    prefix: str = ""


# Longer than 60 lines on purpose: the KafkaUser document, field by field as Strimzi reads it.
def render(
    registry: SubscriptionRegistry,
    plan: TopicPlan,
    options: RenderOptions | None = None,
    *,
    registry_source: str = "lotse_contracts/subscriptions.toml",
) -> dict[str, str]:
    """The files of both components, as {path relative to the components dir: text}."""
    options = options or RenderOptions()
    city = registry.city.slug
    header = [
        f"Generated by `lotse acls` from the subscription registry ({registry_source})",
        f"for the city {city}. Do not edit: change the registry and run `lotse acls`;",
        "`lotse acls --check` (and tests/deploy) fail when this file is out of date.",
    ]
    files: dict[str, str] = {}
    users = kafka_users(
        registry,
        cluster=options.cluster,
        authentication=options.authentication,
        prefix=options.prefix,
    )
    for user in users:
        name = user["metadata"]["name"]
        files[f"{USERS_DIR}/{name}.yaml"] = to_yaml([user], header=header)
    user_files = sorted(Path(p).name for p in files)
    files[f"{USERS_DIR}/kustomization.yaml"] = to_yaml(
        [
            {
                "apiVersion": KUSTOMIZE_COMPONENT_API,
                "kind": "Component",
                "resources": user_files,
            }
        ],
        header=[
            *header,
            "",
            "One Strimzi KafkaUser per audience of the registry, with exactly its ACLs. The",
            "User Operator creates a Secret of the same name holding the credentials.",
        ],
    )
    topics = planned_topics(registry, plan, prefix=options.prefix)
    files[f"{TOPICS_DIR}/topics.yaml"] = to_yaml(
        [kafka_topic(t, cluster=options.cluster) for t in topics],
        header=[*header, "Partitions, replication and retention: deploy/topics.toml."],
    )
    files[f"{TOPICS_DIR}/kustomization.yaml"] = to_yaml(
        [
            {
                "apiVersion": KUSTOMIZE_COMPONENT_API,
                "kind": "Component",
                "resources": ["topics.yaml"],
            }
        ],
        header=[
            *header,
            "",
            "Every topic of the platform as a Strimzi KafkaTopic, owned by the Topic Operator",
            "(the services run with CREATE_TOPICS=false).",
        ],
    )
    return files


def _existing(out_dir: Path) -> set[str]:
    found = set()
    for sub in (USERS_DIR, TOPICS_DIR):
        folder = out_dir / sub
        if folder.is_dir():
            found |= {f"{sub}/{p.name}" for p in folder.glob("*.yaml")}
    return found


def drift(files: Mapping[str, str], out_dir: Path) -> list[str]:
    """How the committed files differ from the rendered ones (empty: no drift)."""
    problems = []
    for path, text in sorted(files.items()):
        target = out_dir / path
        if not target.is_file():
            problems.append(f"{target}: missing")
        elif target.read_text(encoding="utf-8") != text:
            problems.append(f"{target}: differs from the registry")
    for path in sorted(_existing(out_dir) - set(files)):
        problems.append(f"{out_dir / path}: no longer in the registry (stale)")
    return problems


def write(files: Mapping[str, str], out_dir: Path) -> list[Path]:
    """Write the rendered files and delete stale ones; returns the paths changed."""
    changed = []
    for path in sorted(_existing(out_dir) - set(files)):
        (out_dir / path).unlink()
        changed.append(out_dir / path)
    for path, text in sorted(files.items()):
        target = out_dir / path
        if target.is_file() and target.read_text(encoding="utf-8") == text:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
        changed.append(target)
    return changed


# --- command line ---------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``lotse acls`` (also ``python -m lotse_tooling.acls``)."""
    env = os.environ.get
    parser.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 if the committed files differ from the registry",
    )
    parser.add_argument(
        "--create-topics",
        action="store_true",
        help="create the planned topics on a running Kafka instead (LOTSE_KAFKA_* settings)",
    )
    parser.add_argument(
        "--city",
        default=env("LOTSE_CITY", DEFAULT_CITY),
        help="city name or TOML path (default: LOTSE_CITY or dortmund)",
    )
    parser.add_argument(
        "--subscriptions",
        default=env("LOTSE_SUBSCRIPTIONS_FILE"),
        help="subscription registry TOML (default: the packaged one)",
    )
    parser.add_argument(
        "--topics-config",
        type=Path,
        default=Path(env("LOTSE_TOPICS_CONFIG", str(DEFAULT_TOPICS_CONFIG))),
        help="topic plan: partitions, replication, retention (default: deploy/topics.toml)",
    )
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=DEFAULT_OUT_DIR,
        help="components directory (default: deploy/k8s/components)",
    )
    parser.add_argument(
        "--topic-prefix",
        default=env("LOTSE_TOPIC_PREFIX", ""),
        help="prefix of every topic and group (LOTSE_TOPIC_PREFIX)",
    )
    parser.add_argument("--cluster", default=DEFAULT_CLUSTER, help="Strimzi Kafka cluster name")
    parser.add_argument(
        "--authentication",
        choices=["scram-sha-512", "tls"],
        default="scram-sha-512",
        help="KafkaUser authentication type",
    )
    parser.add_argument(
        "--wait",
        type=float,
        default=60.0,
        help="with --create-topics: seconds to keep retrying while Kafka is unreachable",
    )


def _load(args: argparse.Namespace) -> tuple[SubscriptionRegistry, TopicPlan]:
    city = load_city(args.city)
    registry = load_registry(city, args.subscriptions)
    return registry, load_topic_plan(args.topics_config)


async def _create_topics(specs: list[TopicSpec], wait_s: float) -> list[str]:
    # Connection settings (bootstrap, SASL, TLS) as every service reads them.
    from lotse_runtime.settings import ServiceSettings

    settings = ServiceSettings()
    config = KafkaConfig(
        bootstrap=settings.kafka_bootstrap,
        client_id="lotse-acls",
        extra=settings.kafka_client_options(),
    )
    deadline = time.monotonic() + wait_s
    delay = 0.5
    while True:
        try:
            return await ensure_topics(config, specs)
        except Exception as exc:
            if time.monotonic() + delay > deadline:
                raise
            print(f"Kafka at {settings.kafka_bootstrap} not ready ({exc}); retrying", flush=True)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


def run(args: argparse.Namespace) -> int:
    """Render, check or create; exit status 0 (fine), 1 (drift / broker) or 2 (bad input)."""
    try:
        registry, plan = _load(args)
        options = RenderOptions(
            cluster=args.cluster, authentication=args.authentication, prefix=args.topic_prefix
        )
        source = args.subscriptions or "lotse_contracts/subscriptions.toml"
        if args.create_topics:
            specs = [t.spec() for t in planned_topics(registry, plan, prefix=options.prefix)]
        else:
            files = render(registry, plan, options, registry_source=source)
    except (RegistryError, CityConfigError, UnknownCity, AclRenderError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.create_topics:
        try:
            created = asyncio.run(_create_topics(specs, args.wait))
        except Exception as exc:
            print(f"error: cannot create topics: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
        print(
            f"topics for {registry.city.slug}: {len(created)} created, "
            f"{len(specs) - len(created)} already there ({len(specs)} planned)"
        )
        for name in created:
            print(f"  created {name}")
        return 0
    if not args.out_dir.parent.is_dir():
        # A relative default from the wrong directory would scatter files; say where to run.
        print(
            f"error: {args.out_dir.parent} does not exist; run from the repository root "
            "or pass --out-dir",
            file=sys.stderr,
        )
        return 2
    if args.check:
        problems = drift(files, args.out_dir)
        if problems:
            print("Kafka users/topics drifted from the registry; run `lotse acls`:")
            for problem in problems:
                print(f"  {problem}")
            return 1
        print(f"{args.out_dir}: {len(files)} files match the registry")
        return 0
    changed = write(files, args.out_dir)
    print(f"{args.out_dir}: {len(files)} files rendered, {len(changed)} changed")
    for path in changed:
        print(f"  {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lotse acls", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
