"""Kafka users (ACLs) and topics rendered from the subscription registry: `lotse acls`.

The committed files under deploy/k8s/components/kafka-users and .../kafka-topics must be
exactly what the registry and deploy/topics.toml say; each audience gets exactly the rights
its scope allows; a registry that widens a scope or names an unknown Stadtbezirk or Träger
fails rendering with a clear error and writes nothing.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from confluent_kafka.admin import AdminClient
from lotse_contracts import topics as topic_names
from lotse_contracts.city import load_city
from lotse_contracts.subscriptions import Audience, SubscriptionRegistry, load_registry
from lotse_tooling import acls, cli

from tests.deploy.manifests import COMPONENTS, TOPIC_PLAN, settings_class

REGISTRY_FILE = (
    Path(__file__).resolve().parents[2] / "contracts/src/lotse_contracts/subscriptions.toml"
)
READ = ["Read", "Describe"]
WRITE = ["Write", "Describe"]


@pytest.fixture(scope="module")
def registry() -> SubscriptionRegistry:
    return load_registry(load_city("dortmund"))


@pytest.fixture(scope="module")
def plan() -> acls.TopicPlan:
    return acls.load_topic_plan(TOPIC_PLAN)


@pytest.fixture(scope="module")
def users(registry: SubscriptionRegistry) -> dict[str, dict[str, Any]]:
    return {u["metadata"]["name"]: u for u in acls.kafka_users(registry)}


def _acls(user: dict[str, Any]) -> set[tuple[str, str, str, tuple[str, ...]]]:
    return {
        (
            acl["resource"]["type"],
            acl["resource"]["name"],
            acl["resource"]["patternType"],
            tuple(acl["operations"]),
        )
        for acl in user["spec"]["authorization"]["acls"]
    }


def _args(*extra: str, out_dir: Path = COMPONENTS) -> list[str]:
    return ["acls", "--out-dir", str(out_dir), "--topics-config", str(TOPIC_PLAN), *extra]


# -- the committed files -----------------------------------------------------------------------


def test_committed_users_and_topics_match_the_registry(
    registry: SubscriptionRegistry, plan: acls.TopicPlan
) -> None:
    files = acls.render(registry, plan)
    problems = acls.drift(files, COMPONENTS)
    assert not problems, "run `uv run --frozen lotse acls`:\n" + "\n".join(problems)


def test_lotse_acls_check_passes_on_the_committed_files(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(_args("--check", "--city", "dortmund")) == 0
    assert "match the registry" in capsys.readouterr().out


def test_check_reports_every_kind_of_drift_and_rendering_repairs_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "components"
    shutil.copytree(COMPONENTS / acls.USERS_DIR, out / acls.USERS_DIR)
    shutil.copytree(COMPONENTS / acls.TOPICS_DIR, out / acls.TOPICS_DIR)
    assert cli.main(_args("--check", out_dir=out)) == 0

    # A hand-widened ACL, a deleted user, a user nobody declared.
    hoerde = out / acls.USERS_DIR / "bezirksteam-hoerde.yaml"
    hoerde.write_text(hoerde.read_text().replace("lotse.bezirk.hoerde", "lotse.intake"))
    (out / acls.USERS_DIR / "dashboard.yaml").unlink()
    (out / acls.USERS_DIR / "intruder.yaml").write_text("kind: KafkaUser\n")
    capsys.readouterr()
    assert cli.main(_args("--check", out_dir=out)) == 1
    report = capsys.readouterr().out
    assert "bezirksteam-hoerde.yaml: differs from the registry" in report
    assert "dashboard.yaml: missing" in report
    assert "intruder.yaml: no longer in the registry (stale)" in report

    assert cli.main(_args(out_dir=out)) == 0
    assert not (out / acls.USERS_DIR / "intruder.yaml").exists()
    assert cli.main(_args("--check", out_dir=out)) == 0
    for path in (out / acls.USERS_DIR).glob("*.yaml"):
        assert path.read_text() == (COMPONENTS / acls.USERS_DIR / path.name).read_text()


def test_rendering_from_the_wrong_directory_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "elsewhere" / "components"
    assert cli.main(_args(out_dir=out)) == 2
    assert "run from the repository root" in capsys.readouterr().err
    assert not (tmp_path / "elsewhere").exists()


def test_rendered_files_are_valid_yaml_with_one_user_per_file() -> None:
    kustomization = yaml.safe_load((COMPONENTS / acls.USERS_DIR / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Component"
    listed = set(kustomization["resources"])
    assert listed == {p.name for p in (COMPONENTS / acls.USERS_DIR).glob("*.yaml")} - {
        "kustomization.yaml"
    }
    for name in listed:
        [user] = list(yaml.safe_load_all((COMPONENTS / acls.USERS_DIR / name).read_text()))
        assert user["kind"] == "KafkaUser"
        assert f"{user['metadata']['name']}.yaml" == name


# -- exactly the rights of each audience -------------------------------------------------------


def test_a_bezirksteam_reads_its_own_feed_and_nothing_else(
    users: dict[str, dict[str, Any]], registry: SubscriptionRegistry
) -> None:
    for bezirk in registry.city.bezirk_slugs:
        user = users[f"bezirksteam-{bezirk}"]
        assert _acls(user) == {
            ("topic", topic_names.bezirk_feed(bezirk), "literal", tuple(READ)),
            ("group", f"lotse-bezirksteam-{bezirk}", "literal", ("Read",)),
        }
        assert user["spec"]["authentication"]["type"] == "scram-sha-512"


def test_a_traeger_reads_its_referrals_and_writes_only_its_responses(
    users: dict[str, dict[str, Any]], registry: SubscriptionRegistry
) -> None:
    for traeger in registry.city.traeger_slugs:
        assert _acls(users[f"traeger-{traeger}"]) == {
            ("topic", topic_names.partner_referrals(traeger), "literal", tuple(READ)),
            ("topic", topic_names.partner_responses(traeger), "literal", tuple(WRITE)),
            ("group", f"lotse-partner-{traeger}", "literal", ("Read",)),
        }


def test_the_dashboard_reads_key_figures_only(users: dict[str, dict[str, Any]]) -> None:
    assert _acls(users["dashboard"]) == {
        ("topic", topic_names.REPORTING_KPIS, "literal", tuple(READ)),
        ("group", "lotse-dashboard", "literal", ("Read",)),
    }


def test_services_get_their_registry_rights_and_their_consumer_groups(
    users: dict[str, dict[str, Any]], registry: SubscriptionRegistry
) -> None:
    for audience in registry.audiences():
        if audience.kind != "service":
            continue
        service = audience.name.removeprefix("service-")
        rights = _acls(users[audience.name])
        topic_rights = {(name, ops) for kind, name, _, ops in rights if kind == "topic"}
        expected = {(t, tuple(READ)) for t in audience.read_topics} | {
            (t, tuple(WRITE)) for t in audience.write_topics
        }
        assert topic_rights == expected, audience.name
        # Its own domain topic and dead letters, never another service's.
        writes = {name for name, ops in topic_rights if "Write" in ops}
        assert topic_names.dead_letter(service) in writes
        others = {f"lotse.{s}" for s in topic_names.SERVICES if s != service}
        assert not writes & others, audience.name
        # The runtime names its groups lotse-<service>-<consumer>: the prefix covers exactly them.
        groups = {(name, pattern) for kind, name, pattern, _ in rights if kind == "group"}
        if audience.consumer_groups:
            assert groups == {(f"lotse-{service}-", "prefix")}, audience.name
            settings = settings_class(service)()
            assert settings.consumer_group("main").startswith(f"lotse-{service}-")
        else:
            assert not groups, audience.name


def test_referrals_writes_every_traeger_feed_and_reads_every_answer(
    users: dict[str, dict[str, Any]], registry: SubscriptionRegistry
) -> None:
    rights = _acls(users["service-referrals"])
    for traeger in registry.city.traeger_slugs:
        assert ("topic", topic_names.partner_referrals(traeger), "literal", tuple(WRITE)) in rights
        assert ("topic", topic_names.partner_responses(traeger), "literal", tuple(READ)) in rights
    # Nobody else writes a Träger's feed.
    for name, user in users.items():
        if name == "service-referrals":
            continue
        for kind, topic, _, ops in _acls(user):
            if kind == "topic" and topic.endswith(".referrals") and topic.startswith("lotse.p"):
                assert "Write" not in ops, f"{name} may write {topic}"


def test_delivery_writes_each_traegers_responses_but_no_feed(
    users: dict[str, dict[str, Any]], registry: SubscriptionRegistry
) -> None:
    # Answers over HTTP are written where the Träger would have written them; webhooks are
    # projected from the domain topics; no feed is written.
    rights = _acls(users["service-delivery"])
    expected = {
        ("topic", topic_names.partner_responses(t), "literal", tuple(WRITE))
        for t in registry.city.traeger_slugs
    }
    expected |= {("topic", t, "literal", tuple(READ)) for t in topic_names.DOMAIN_TOPICS}
    # The Träger feeds, for the refusal notices that are on no domain topic.
    expected |= {
        ("topic", topic_names.partner_referrals(t), "literal", tuple(READ))
        for t in registry.city.traeger_slugs
    }
    expected.add(("topic", topic_names.dead_letter("delivery"), "literal", tuple(WRITE)))
    expected.add(("group", "lotse-delivery-", "prefix", ("Read",)))
    assert rights == expected
    # No other service may write a Träger's responses.
    for name, user in users.items():
        if not name.startswith("service-") or name == "service-delivery":
            continue
        for kind, topic, _, ops in _acls(user):
            if kind == "topic" and topic.endswith(".responses"):
                assert "Write" not in ops, f"{name} may write {topic}"
    # And the renderer refuses that right to any other service.
    referrals = registry.audience("service-referrals")
    widened = referrals.model_copy(
        update={"write_topics": [topic_names.partner_responses(registry.city.traeger_slugs[0])]}
    )
    assert "outside its scope" in acls.check_audience(widened, registry.city)[0]


def test_no_user_gets_more_than_topic_and_group_rights(users: dict[str, dict[str, Any]]) -> None:
    for name, user in users.items():
        for kind, resource, pattern, ops in _acls(user):
            assert kind in ("topic", "group"), name
            assert set(ops) <= {"Read", "Write", "Describe"}, name
            assert "*" not in resource, name
            if kind == "topic":
                assert pattern == "literal", f"{name}: topic ACLs are literal"


def test_a_topic_prefix_is_carried_into_every_acl_and_topic(
    registry: SubscriptionRegistry, plan: acls.TopicPlan
) -> None:
    prefix = "staging."
    users = acls.kafka_users(registry, prefix=prefix)
    for user in users:
        for kind, resource, _, _ in _acls(user):
            assert resource.startswith(prefix), (user["metadata"]["name"], resource)
            if kind == "group":
                assert resource.startswith(prefix + "lotse-")
    topics = acls.planned_topics(registry, plan, prefix=prefix)
    assert all(t.name.startswith(prefix) for t in topics)
    assert {t.topic_class for t in topics} == set(acls.TOPIC_CLASSES)


def test_another_city_gets_its_own_audiences(plan: acls.TopicPlan) -> None:
    hamm = load_registry(load_city("hamm"))
    files = acls.render(hamm, plan)
    users = {Path(p).stem for p in files if p.startswith(acls.USERS_DIR)} - {"kustomization"}
    assert {f"bezirksteam-{b}" for b in hamm.city.bezirk_slugs} <= users
    assert not any(u.startswith("bezirksteam-hoerde") for u in users)
    assert "for the city hamm" in files[f"{acls.USERS_DIR}/dashboard.yaml"]


# -- bad registries fail rendering with a clear error --------------------------------------------


def _broken_registry(tmp_path: Path, old: str, new: str) -> Path:
    text = REGISTRY_FILE.read_text(encoding="utf-8")
    assert old in text, f"fixture anchor {old!r} is not in the registry any more"
    path = tmp_path / "subscriptions.toml"
    path.write_text(text.replace(old, new, 1), encoding="utf-8")
    return path


BROKEN = {
    "traeger writes a domain topic": (
        'writes = ["lotse.partner.{traeger}.responses"]',
        'writes = ["lotse.partner.{traeger}.responses", "lotse.intake"]',
        "audience traeger: writes 'lotse.intake' (lotse.intake): outside its scope",
    ),
    "bezirksteam reads another Bezirk's feed": (
        'topic = "lotse.bezirk.{bezirk}"\nconsumer_groups',
        'topic = "lotse.bezirk.{bezirk}"\nreads = ["lotse.bezirk.hoerde"]\nconsumer_groups',
        "audience bezirksteam: reads 'lotse.bezirk.hoerde' (lotse.bezirk.hoerde): outside its "
        "scope",
    ),
    "dashboard reads the intake topic": (
        'reads = ["lotse.reporting.kpis"]',
        'reads = ["lotse.reporting.kpis", "lotse.intake"]',
        "audience dashboard: reads 'lotse.intake' (lotse.intake): outside its scope",
    ),
    "unknown Stadtbezirk": (
        '{ type = "de.lotse.visits.visit-declined.v1", fields = [',
        '{ type = "de.lotse.visits.visit-declined.v1", bezirke = ["atlantis"], fields = [',
        "bezirke filter names unknown Stadtbezirk(e) atlantis of Dortmund",
    ),
    "unknown Träger": (
        '{ type = "de.lotse.referrals.referral-cancelled.v1", fields = [\n        "referral_id",'
        ' "case_id", "bezirk", "traeger", "module", "occurred_at", "reason",\n'
        '        "cancelled_by_role",\n    ] },\n    # A message the Träger wrote',
        '{ type = "de.lotse.referrals.referral-cancelled.v1", traeger = ["nowhere-ev"], '
        'fields = [\n        "referral_id",'
        ' "case_id", "bezirk", "traeger", "module", "occurred_at", "reason",\n'
        '        "cancelled_by_role",\n    ] },\n    # A message the Träger wrote',
        "traeger filter names unknown Träger nowhere-ev of Dortmund",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_bad_registry_fails_rendering_clearly_and_writes_nothing(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old, new, message = BROKEN[case]
    registry_file = _broken_registry(tmp_path, old, new)
    out = tmp_path / "components"
    status = cli.main(_args("--subscriptions", str(registry_file), out_dir=out))
    captured = capsys.readouterr()
    assert status == 2
    assert message in captured.err, captured.err
    assert str(registry_file) in captured.err, "the error names the file"
    assert not out.exists(), "nothing is written"
    # --check and --create-topics refuse the same file before touching anything.
    assert cli.main(_args("--check", "--subscriptions", str(registry_file), out_dir=out)) == 2
    assert (
        cli.main(_args("--create-topics", "--subscriptions", str(registry_file), out_dir=out)) == 2
    )


def test_the_renderer_rechecks_every_acl_against_the_scope_rules(
    registry: SubscriptionRegistry,
) -> None:
    # Even if the registry's validation let it through, a widened audience is refused.
    city = registry.city
    hoerde = registry.audience("bezirksteam-hoerde")
    widened = hoerde.model_copy(update={"read_topics": [*hoerde.read_topics, "lotse.intake"]})
    assert acls.check_audience(widened, city) == [
        "bezirksteam-hoerde: may not read lotse.intake: outside its scope"
    ]
    traeger = registry.audience(f"traeger-{city.traeger_slugs[0]}")
    other = city.traeger_slugs[1]
    stolen = traeger.model_copy(update={"write_topics": [topic_names.partner_responses(other)]})
    assert acls.check_audience(stolen, city) == [
        f"{traeger.name}: may not write {topic_names.partner_responses(other)}: outside its scope"
    ]
    wildcard = hoerde.model_copy(update={"read_topics": ["lotse.bezirk.*"]})
    assert "not a literal topic name" in acls.check_audience(wildcard, city)[0]
    ghost = Audience(
        name="bezirksteam-atlantis",
        kind="bezirksteam",
        member="atlantis",
        read_topics=["lotse.bezirk.atlantis"],
        write_topics=[],
        consumer_groups=["lotse-bezirksteam-atlantis"],
    )
    assert acls.check_audience(ghost, city) == [
        "bezirksteam-atlantis: names Stadtbezirk 'atlantis', which Dortmund lacks"
    ]
    foreign_group = hoerde.model_copy(update={"consumer_groups": ["lotse-bezirksteam-eving"]})
    assert "does not name its own hoerde" in acls.check_audience(foreign_group, city)[0]
    visits = registry.audience("service-visits")
    borrowed = visits.model_copy(update={"consumer_groups": ["lotse-referrals"]})
    assert acls.check_audience(borrowed, city) == [
        "service-visits: consumer group 'lotse-referrals' is not lotse-<service>"
    ]
    assert acls.check_audience(visits, city) == []

    class Widened:
        def __init__(self) -> None:
            self.city = city

        def audiences(self) -> list[Audience]:
            return [widened, *registry.audiences()]

    with pytest.raises(acls.AclRenderError) as caught:
        acls.kafka_users(Widened())  # type: ignore[arg-type]
    assert "may not read lotse.intake" in str(caught.value)
    assert "appears twice" in str(caught.value)


# -- the topic plan ----------------------------------------------------------------------------


def test_topics_get_their_class_settings(
    registry: SubscriptionRegistry, plan: acls.TopicPlan
) -> None:
    topics = {t.name: t for t in acls.planned_topics(registry, plan)}
    size = {"max.message.bytes": plan.max_message_bytes}  # the runtime's record size limit
    assert topics["lotse.intake"].config == {"cleanup.policy": "delete", "retention.ms": -1, **size}
    assert topics["lotse.reporting.kpis"].config == {"cleanup.policy": "compact", **size}
    assert topics["lotse.dlq.visits"].config["retention.ms"] == 90 * 24 * 3600 * 1000
    feed = topics[topic_names.bezirk_feed("hoerde")]
    assert feed.topic_class == "bezirk_feed"
    assert feed.config["retention.ms"] == 30 * 24 * 3600 * 1000
    assert {t.partitions for t in topics.values()} == {plan.partitions}
    spec = topics["lotse.intake"].spec()
    assert spec.config == {
        "cleanup.policy": "delete",
        "retention.ms": "-1",
        "max.message.bytes": str(plan.max_message_bytes),
    }


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "version = 1\n[classes.domain]\nretention_ms = 86400000\n",
            "reporting is rebuilt by replaying",
        ),
        (
            "version = 1\n[classes.domain]\nretention_ms = -1\n[classes.reporting]\n"
            'cleanup_policy = "delete"\n',
            "classes.reporting must be compacted",
        ),
        ("version = 1\npartitions = 0\n", "partitions"),
        ("version = 1\n[classes.domian]\nretention_ms = -1\n", "classes.domian"),
        ("version = 1\n[classes.domain]\nretention_ms = -1\nretension = 3\n", "retension"),
        ("version = 1\npartitions = [\n", "not valid TOML"),
    ],
)
def test_a_bad_topic_plan_is_refused_with_the_reason(text: str, message: str) -> None:
    with pytest.raises(acls.AclRenderError) as caught:
        acls.parse_topic_plan(text, source="topics.toml")
    assert message in str(caught.value)
    assert "topics.toml" in str(caught.value)


def test_a_topic_outside_every_class_is_refused() -> None:
    with pytest.raises(ValueError, match="belongs to no topic class"):
        acls.classify("lotse.something.else")


# -- the YAML writer ---------------------------------------------------------------------------


def test_yaml_writer_round_trips_through_a_yaml_parser() -> None:
    tricky = [
        "yes",
        "No",
        "on",
        "null",
        "true",
        "1.0",
        "007",
        "1e5",
        "*",
        "a: b",
        "",
        "with space",
        "Träger",
        "#comment",
        "-dash",
        "lotse.bezirk.hoerde",
        "- item",
        'quo"te',
    ]
    document = {
        "strings": tricky,
        "numbers": [0, -1, 7776000000],
        "flags": [True, False],
        "nothing": None,
        "empty": {},
        "none": [],
        "nested": [{"a": [{"b": 1}], "c": "d"}, ["x", ["y"]]],
        "quoted-key: x": "v",
    }
    text = acls.to_yaml([document, {"second": 2}], header=["a comment", ""])
    assert text.startswith("# a comment\n#\n---\n")
    assert list(yaml.safe_load_all(text)) == [document, {"second": 2}]


# -- creating the topics on a running broker (the docker-compose init step) --------------------


@pytest.mark.integration
def test_create_topics_makes_every_planned_topic_once(
    broker: Any,
    registry: SubscriptionRegistry,
    plan: acls.TopicPlan,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    prefix = f"t{uuid.uuid4().hex[:10]}."
    monkeypatch.setenv("LOTSE_KAFKA_BOOTSTRAP", broker.bootstrap)
    args = _args("--create-topics", "--topic-prefix", prefix, "--wait", "10")
    assert cli.main(args) == 0
    planned = acls.planned_topics(registry, plan, prefix=prefix)
    assert f"{len(planned)} created, 0 already there" in capsys.readouterr().out

    metadata = AdminClient({"bootstrap.servers": broker.bootstrap}).list_topics(timeout=10)
    for topic in planned:
        assert topic.name in metadata.topics, topic.name
        assert len(metadata.topics[topic.name].partitions) == topic.partitions, topic.name

    # Again: nothing to do, still success (the init step runs on every `docker compose up`).
    assert cli.main(args) == 0
    assert f"0 created, {len(planned)} already there" in capsys.readouterr().out


def test_create_topics_gives_up_on_an_unreachable_broker(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from lotse_tooling.embedded import free_port

    monkeypatch.setenv("LOTSE_KAFKA_BOOTSTRAP", f"127.0.0.1:{free_port()}")
    assert cli.main(_args("--create-topics", "--wait", "1")) == 1
    assert "cannot create topics" in capsys.readouterr().err
