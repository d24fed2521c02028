"""Subscription registry: loading, routing with projection, audiences, validation."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from lotse_contracts import topics
from lotse_contracts.city import Municipality, load_city
from lotse_contracts.cloudevents import CloudEvent
from lotse_contracts.events import CATALOGUE
from lotse_contracts.personal import EncryptedBlock
from lotse_contracts.subscriptions import (
    RegistryError,
    RoutingError,
    SubscriptionRegistry,
    load_registry,
    parse_registry,
    producer_of,
)

OVERDUE = "de.lotse.visits.visit-overdue.v1"
SCHEDULED = "de.lotse.visits.visit-scheduled.v1"
REQUESTED = "de.lotse.referrals.referral-requested.v1"
CANCELLED = "de.lotse.referrals.referral-cancelled.v1"
ESCALATED = "de.lotse.referrals.referral-escalated.v1"
NEEDS = "de.lotse.intake.needs-assessed.v1"
REGISTERED = "de.lotse.intake.family-registered.v1"
MIDWIVES = "hebammenzentrum-dortmund"
NORTH = "familienbildungswerk-nord"

# A small valid registry; the validation tests break one thing at a time.
MINIMAL = """
version = 1

[policy]
never_routed = ["de.lotse.intake.needs-assessed.v1"]

[[audience]]
kind = "bezirksteam"
topic = "lotse.bezirk.{bezirk}"
consumer_groups = ["lotse-bezirksteam-{bezirk}"]
events = [
    { type = "de.lotse.visits.visit-overdue.v1", fields = ["case_id", "bezirk", "days_overdue"] },
]

[[audience]]
kind = "traeger"
topic = "lotse.partner.{traeger}.referrals"
writes = ["lotse.partner.{traeger}.responses"]
consumer_groups = ["lotse-partner-{traeger}"]
events = [
    { type = "de.lotse.referrals.referral-cancelled.v1", fields = ["referral_id", "reason"] },
]

[[audience]]
kind = "service"
name = "referrals"
reads = ["lotse.visits", "lotse.partner.{traeger}.responses"]
writes = ["lotse.referrals", "lotse.dlq.referrals"]
consumer_groups = ["lotse-referrals"]

[[audience]]
kind = "service"
name = "visits"
writes = ["lotse.visits", "lotse.dlq.visits"]
"""
VISITS_SERVICE = """
[[audience]]
kind = "service"
name = "visits"
writes = ["lotse.visits", "lotse.dlq.visits"]
"""


@pytest.fixture(scope="module")
def dortmund() -> Municipality:
    return load_city("dortmund")


@pytest.fixture(scope="module")
def registry(dortmund: Municipality) -> SubscriptionRegistry:
    return load_registry(dortmund)


def event(event_type: str, **changes: Any) -> CloudEvent:
    """The catalogue's example of a type, with some data fields changed."""
    model = CATALOGUE.model_for(event_type)
    data = {**model.example().model_dump(), **changes}
    return model.model_validate(data).to_cloudevent(
        event_id="evt-1", time=datetime(2025, 3, 18, 5, 0, tzinfo=UTC)
    )


def problems_of(tmp_path: Path, city: Municipality, text: str) -> str:
    path = tmp_path / "subscriptions.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(RegistryError) as info:
        load_registry(city, str(path))
    return "\n".join(info.value.problems)


def with_bezirksteam_events(entries: str) -> str:
    return MINIMAL.replace(
        '    { type = "de.lotse.visits.visit-overdue.v1", fields = ["case_id", "bezirk", '
        '"days_overdue"] },\n',
        entries,
    )


# --- loading -----------------------------------------------------------------------------


@pytest.mark.parametrize(("city", "bezirke", "traeger"), [("dortmund", 12, 8), ("hamm", 7, 4)])
def test_packaged_registry_loads(city: str, bezirke: int, traeger: int) -> None:
    registry = load_registry(load_city(city))
    kinds = [a.kind for a in registry.audiences()]
    assert kinds.count("bezirksteam") == bezirke
    assert kinds.count("traeger") == traeger
    assert kinds.count("dashboard") == 1
    assert kinds.count("service") == 5
    # Feed write access is derived per city, so it must expand to that city's members.
    city_feeds = {topics.bezirk_feed(b) for b in load_city(city).bezirk_slugs}
    assert city_feeds <= set(registry.audience("service-visits").write_topics)


def test_minimal_registry_from_a_path(tmp_path: Path, dortmund: Municipality) -> None:
    path = tmp_path / "registry.toml"
    path.write_text(MINIMAL, encoding="utf-8")
    registry = load_registry(dortmund, str(path))
    assert registry.routed_types() == [CANCELLED, OVERDUE]


def test_parse_registry_from_text(dortmund: Municipality) -> None:
    assert parse_registry(MINIMAL, dortmund).city is dortmund


# --- routing -----------------------------------------------------------------------------


def test_visit_overdue_goes_only_to_its_bezirk(registry: SubscriptionRegistry) -> None:
    original = event(OVERDUE, bezirk="hoerde", visit_id=None)
    routed = registry.route(original)
    assert [topic for topic, _ in routed] == ["lotse.bezirk.hoerde"]
    copy = routed[0][1]
    assert set(copy.data) <= set(registry.fields_for("bezirksteam", OVERDUE) or [])
    assert set(copy.data) == {
        "case_id",
        "bezirk",
        "familienbuero",
        "target_date",
        "days_overdue",
        "detected_at",
    }
    # The envelope is the original one.
    for attribute in ("id", "source", "type", "subject", "time", "bezirk", "traeger"):
        assert getattr(copy, attribute) == getattr(original, attribute)
    # Every required field passed, so the published schema still describes the copy.
    assert copy.dataschema == original.dataschema


def test_other_bezirk_goes_to_its_own_feed(registry: SubscriptionRegistry) -> None:
    routed = registry.route(event(OVERDUE, bezirk="mengede", familienbuero="familienbuero-mengede"))
    assert [topic for topic, _ in routed] == ["lotse.bezirk.mengede"]


def test_projection_drops_fields_not_listed(registry: SubscriptionRegistry) -> None:
    original = event(SCHEDULED)
    assert "staff_id" in original.data
    [(topic, copy)] = registry.route(original)
    assert topic == "lotse.bezirk.hoerde"
    assert "staff_id" not in copy.data
    assert "proposed_automatically" not in copy.data
    assert copy.data["visit_id"] == original.data["visit_id"]
    # staff_id is required by the schema: the projection must not claim to satisfy it.
    assert copy.dataschema is None
    # The original is untouched.
    assert "staff_id" in original.data


def test_extensions_pass_through(registry: SubscriptionRegistry) -> None:
    original = event(OVERDUE).model_copy(update={"extensions": {"traceparent": "00-abc"}})
    [(_, copy)] = registry.route(original)
    assert copy.extensions == {"traceparent": "00-abc"}


def test_referral_requested_goes_only_to_its_traeger(registry: SubscriptionRegistry) -> None:
    original = event(REQUESTED, traeger=MIDWIVES)
    routed = dict(registry.route(original))
    partner_topics = [t for t in routed if t.startswith("lotse.partner.")]
    assert partner_topics == [topics.partner_referrals(MIDWIVES)]
    # The Bezirksteam follows the referral too, but without the consent or the sealed block.
    assert set(routed) == {topics.partner_referrals(MIDWIVES), "lotse.bezirk.hoerde"}
    partner = routed[topics.partner_referrals(MIDWIVES)]
    assert partner.subject == original.subject
    assert partner.traeger == MIDWIVES
    assert partner.data["case_id"] == original.data["case_id"]
    assert partner.data["disclosure"] == original.data["disclosure"]
    assert partner.data["consent_ref"] == original.data["consent_ref"]
    assert partner.dataschema == original.dataschema
    team = routed["lotse.bezirk.hoerde"]
    assert not {"disclosure", "disclosed_fields", "consent_ref", "handover_id"} & set(team.data)


def test_referral_for_another_traeger_goes_elsewhere(registry: SubscriptionRegistry) -> None:
    routed = [t for t, _ in registry.route(event(REQUESTED, traeger=NORTH))]
    assert topics.partner_referrals(NORTH) in routed
    assert topics.partner_referrals(MIDWIVES) not in routed


def test_cancellation_reaches_the_traeger(registry: SubscriptionRegistry) -> None:
    routed = [t for t, _ in registry.route(event(CANCELLED, traeger=MIDWIVES))]
    assert sorted(routed) == ["lotse.bezirk.hoerde", topics.partner_referrals(MIDWIVES)]


def test_escalation_reaches_only_the_bezirksteam(registry: SubscriptionRegistry) -> None:
    routed = [t for t, _ in registry.route(event(ESCALATED, traeger=MIDWIVES))]
    assert routed == ["lotse.bezirk.hoerde"]


@pytest.mark.parametrize(
    "event_type",
    [
        NEEDS,
        REGISTERED,
        "de.lotse.intake.consent-changed.v1",
        "de.lotse.intake.handover-requested.v1",
        "de.lotse.reporting.kpi-updated.v1",
    ],
)
def test_unrouted_types_go_nowhere(registry: SubscriptionRegistry, event_type: str) -> None:
    changes = {"traeger": MIDWIVES} if event_type.endswith("handover-requested.v1") else {}
    assert registry.route(event(event_type, **changes)) == []


def test_unknown_type_goes_nowhere(registry: SubscriptionRegistry) -> None:
    stray = CloudEvent(id="1", source="/x", type="de.lotse.other.thing.v1", data={})
    assert registry.route(stray) == []


def test_routed_event_without_bezirk_is_an_error(registry: SubscriptionRegistry) -> None:
    broken = event(OVERDUE).model_copy(update={"bezirk": None})
    with pytest.raises(RoutingError, match="no 'bezirk' attribute"):
        registry.route(broken)


def test_routed_event_with_unknown_traeger_is_an_error(registry: SubscriptionRegistry) -> None:
    with pytest.raises(RoutingError, match="traeger 'awo-dortmund', which Dortmund does not have"):
        registry.route(event(CANCELLED, traeger="awo-dortmund"))


def test_routed_event_with_unknown_bezirk_is_an_error(registry: SubscriptionRegistry) -> None:
    with pytest.raises(RoutingError, match="bezirk 'hamm-mitte'"):
        registry.route(event(OVERDUE, bezirk="hamm-mitte"))


def test_routed_event_without_object_data_is_an_error(registry: SubscriptionRegistry) -> None:
    broken = event(OVERDUE).model_copy(update={"data": ["not", "an", "object"]})
    with pytest.raises(RoutingError, match="no JSON object"):
        registry.route(broken)


def test_hamm_routes_herringen(tmp_path: Path) -> None:
    registry = load_registry(load_city("hamm"))
    routed = registry.route(
        event(OVERDUE, bezirk="herringen", familienbuero="familienbuero-herringen")
    )
    assert [t for t, _ in routed] == ["lotse.bezirk.herringen"]


def test_entry_filter_limits_members(tmp_path: Path, dortmund: Municipality) -> None:
    text = with_bezirksteam_events(
        '    { type = "de.lotse.visits.visit-overdue.v1", fields = ["case_id"],'
        ' bezirke = ["hoerde", "eving"] },\n'
    )
    registry = parse_registry(text, dortmund)
    assert [t for t, _ in registry.route(event(OVERDUE, bezirk="hoerde"))] == [
        "lotse.bezirk.hoerde"
    ]
    assert registry.route(event(OVERDUE, bezirk="mengede")) == []
    assert registry.audience("bezirksteam-eving").event_types == [OVERDUE]
    assert registry.audience("bezirksteam-mengede").event_types == []


# --- the packaged registry's policy -------------------------------------------------------


def test_bezirksteam_never_gets_screening_or_sealed_data(registry: SubscriptionRegistry) -> None:
    assert registry.fields_for("bezirksteam", NEEDS) is None
    assert NEEDS not in registry.routed_types()
    for audience in registry.audiences():
        if audience.kind != "bezirksteam":
            continue
        for event_type in audience.event_types:
            model = CATALOGUE.model_for(event_type)
            for name in registry.fields_for("bezirksteam", event_type) or []:
                annotation = str(model.model_fields[name].annotation)
                assert EncryptedBlock.__name__ not in annotation, (event_type, name)
            assert "staff_id" not in (registry.fields_for("bezirksteam", event_type) or [])


def test_traeger_feed_carries_only_referrals(registry: SubscriptionRegistry) -> None:
    audience = registry.audience(f"traeger-{MIDWIVES}")
    assert audience.event_types == [REQUESTED, CANCELLED, "de.lotse.referrals.answer-refused.v1"]
    assert "case_id" in (registry.fields_for("traeger", REQUESTED) or [])
    assert "disclosure" in (registry.fields_for("traeger", REQUESTED) or [])


def test_bezirksteam_feed_contents(registry: SubscriptionRegistry) -> None:
    types = set(registry.audience("bezirksteam-hoerde").event_types)
    assert {
        OVERDUE,
        SCHEDULED,
        "de.lotse.visits.visit-completed.v1",
        "de.lotse.visits.visit-missed.v1",
        "de.lotse.visits.visit-declined.v1",
        ESCALATED,
        REQUESTED,
        "de.lotse.referrals.referral-accepted.v1",
    } <= types
    assert not {NEEDS, REGISTERED} & types


# --- audiences ------------------------------------------------------------------------------


def test_audience_names(registry: SubscriptionRegistry, dortmund: Municipality) -> None:
    names = [a.name for a in registry.audiences()]
    assert len(names) == len(set(names)) == 12 + 8 + 1 + 5
    assert "bezirksteam-hoerde" in names
    assert "bezirksteam-luetgendortmund" in names
    assert f"traeger-{MIDWIVES}" in names
    assert {"dashboard", "service-intake", "service-visits"} <= set(names)
    assert {"service-referrals", "service-reporting", "service-delivery"} <= set(names)


def test_bezirksteam_topics(registry: SubscriptionRegistry) -> None:
    team = registry.audience("bezirksteam-hoerde")
    assert team.kind == "bezirksteam"
    assert team.member == "hoerde"
    assert team.read_topics == ["lotse.bezirk.hoerde"]
    assert team.write_topics == []
    assert team.consumer_groups == ["lotse-bezirksteam-hoerde"]


def test_traeger_topics(registry: SubscriptionRegistry) -> None:
    partner = registry.audience(f"traeger-{MIDWIVES}")
    assert partner.member == MIDWIVES
    assert partner.read_topics == [f"lotse.partner.{MIDWIVES}.referrals"]
    assert partner.write_topics == [f"lotse.partner.{MIDWIVES}.responses"]
    assert partner.consumer_groups == [f"lotse-partner-{MIDWIVES}"]


def test_dashboard_topics(registry: SubscriptionRegistry) -> None:
    dashboard = registry.audience("dashboard")
    assert dashboard.read_topics == [topics.REPORTING_KPIS]
    assert dashboard.write_topics == []
    assert dashboard.event_types == []


def test_service_topics(registry: SubscriptionRegistry, dortmund: Municipality) -> None:
    bezirk_feeds = [topics.bezirk_feed(b) for b in dortmund.bezirk_slugs]
    intake = registry.audience("service-intake")
    assert intake.read_topics == []
    # intake routes family-erased and cases-merged to every Bezirksteam.
    assert intake.write_topics == [topics.INTAKE, topics.dead_letter("intake"), *bezirk_feeds]
    assert intake.consumer_groups == []

    visits = registry.audience("service-visits")
    assert visits.read_topics == [topics.INTAKE]
    assert visits.write_topics == [topics.VISITS, topics.dead_letter("visits"), *bezirk_feeds]

    reporting = registry.audience("service-reporting")
    assert set(reporting.read_topics) == set(topics.DOMAIN_TOPICS)
    # It produces nothing that is routed, so it writes no feed.
    assert reporting.write_topics == [topics.REPORTING_KPIS, topics.dead_letter("reporting")]

    referrals = registry.audience("service-referrals")
    responses = [topics.partner_responses(t) for t in dortmund.traeger_slugs]
    assert referrals.read_topics == [topics.INTAKE, topics.VISITS, *responses]
    feeds = [topics.bezirk_feed(b) for b in dortmund.bezirk_slugs]
    feeds += [topics.partner_referrals(t) for t in dortmund.traeger_slugs]
    assert referrals.write_topics == [topics.REFERRALS, topics.dead_letter("referrals"), *feeds]
    assert referrals.consumer_groups == ["lotse-referrals"]


def _feed_writers(registry: SubscriptionRegistry) -> dict[str, set[str]]:
    writers: dict[str, set[str]] = {}
    for audience in registry.audiences():
        for topic in audience.write_topics:
            if topic.startswith("lotse.bezirk.") or (
                topic.startswith("lotse.partner.") and topic.endswith(".referrals")
            ):
                writers.setdefault(topic, set()).add(audience.name)
    return writers


def test_feed_writers_are_exactly_the_producers(
    registry: SubscriptionRegistry, dortmund: Municipality
) -> None:
    # Worked out independently of the registry's code: which service's events (by their
    # CloudEvents source) reach which feed when routed.
    expected: dict[str, set[str]] = {}
    for event_type in registry.routed_types():
        model = CATALOGUE.model_for(event_type)
        assert model.source.startswith("/lotse/"), event_type
        producer = "service-" + model.source.removeprefix("/lotse/")
        changes: dict[str, Any] = {}
        for bezirk in dortmund.bezirk_slugs:
            if model.traeger_field:
                changes = {"traeger": MIDWIVES}
            for topic, _ in registry.route(event(event_type, bezirk=bezirk, **changes)):
                expected.setdefault(topic, set()).add(producer)
        if model.traeger_field:
            for traeger in dortmund.traeger_slugs:
                for topic, _ in registry.route(event(event_type, traeger=traeger)):
                    expected.setdefault(topic, set()).add(producer)
    assert _feed_writers(registry) == expected
    assert expected["lotse.bezirk.hoerde"] == {
        "service-intake",
        "service-visits",
        "service-referrals",
    }
    assert expected[topics.partner_referrals(MIDWIVES)] == {"service-referrals"}


def test_audiences_never_write_feeds(registry: SubscriptionRegistry) -> None:
    for topic, writers in _feed_writers(registry).items():
        assert all(w.startswith("service-") for w in writers), (topic, writers)
    for audience in registry.audiences():
        if audience.kind == "traeger":
            own = topics.partner_referrals(audience.member or "")
            assert audience.read_topics == [own]


def test_routed_types_by_producer(registry: SubscriptionRegistry) -> None:
    assert registry.routed_types("intake") == [
        "de.lotse.intake.cases-merged.v1",
        "de.lotse.intake.family-erased.v1",
    ]
    visits = registry.routed_types("visits")
    assert OVERDUE in visits
    assert all(t.startswith("de.lotse.visits.") for t in visits)
    assert REQUESTED in registry.routed_types("referrals")
    assert registry.routed_types("reporting") == []
    assert (
        sorted({*registry.routed_types("intake"), *visits, *registry.routed_types("referrals")})
        == registry.routed_types()
    )


def test_producer_of() -> None:
    assert producer_of(CATALOGUE.model_for(OVERDUE)) == "visits"
    assert producer_of(CATALOGUE.model_for(REGISTERED)) == "intake"
    assert producer_of(CATALOGUE.model_for("de.lotse.partner.referral-answer.v1")) is None


def test_minimal_feed_writers(dortmund: Municipality) -> None:
    registry = parse_registry(MINIMAL, dortmund)
    visits = registry.audience("service-visits")
    referrals = registry.audience("service-referrals")
    bezirk_feeds = [topics.bezirk_feed(b) for b in dortmund.bezirk_slugs]
    partner_feeds = [topics.partner_referrals(t) for t in dortmund.traeger_slugs]
    # visit-overdue is the only Bezirk type, cancellation the only Träger type.
    assert visits.write_topics == [topics.VISITS, topics.dead_letter("visits"), *bezirk_feeds]
    assert referrals.write_topics == [
        topics.REFERRALS,
        topics.dead_letter("referrals"),
        *partner_feeds,
    ]


def test_member_filter_limits_the_producers_feeds(dortmund: Municipality) -> None:
    text = with_bezirksteam_events(
        '    { type = "de.lotse.visits.visit-overdue.v1", fields = ["case_id"],'
        ' bezirke = ["hoerde", "eving"] },\n'
    )
    visits = parse_registry(text, dortmund).audience("service-visits")
    assert visits.write_topics == [
        topics.VISITS,
        topics.dead_letter("visits"),
        topics.bezirk_feed("eving"),
        topics.bezirk_feed("hoerde"),
    ]


def test_topics_lists_everything(registry: SubscriptionRegistry) -> None:
    every = registry.topics()
    assert topics.REPORTING_KPIS in every
    assert "lotse.bezirk.mengede" in every
    assert topics.partner_responses(NORTH) in every
    assert every == sorted(set(every))


def test_unknown_audience(registry: SubscriptionRegistry) -> None:
    with pytest.raises(LookupError, match="no audience 'bezirksteam-berlin'"):
        registry.audience("bezirksteam-berlin")


# --- validation -------------------------------------------------------------------------------


def test_invalid_toml(tmp_path: Path, dortmund: Municipality) -> None:
    assert "not valid TOML" in problems_of(tmp_path, dortmund, MINIMAL + "\n[[audience\n")


def test_missing_file(tmp_path: Path, dortmund: Municipality) -> None:
    with pytest.raises(RegistryError, match="cannot read"):
        load_registry(dortmund, str(tmp_path / "nowhere.toml"))


def test_structural_error_names_the_entry(tmp_path: Path, dortmund: Municipality) -> None:
    broken = MINIMAL.replace('kind = "traeger"', 'kind = "partner"')
    text = problems_of(tmp_path, dortmund, broken)
    assert "audience[1] (partner).kind" in text


def test_unknown_key(tmp_path: Path, dortmund: Municipality) -> None:
    broken = MINIMAL.replace(
        'topic = "lotse.bezirk.{bezirk}"\n', 'topic = "lotse.bezirk.{bezirk}"\nfeilds = 1\n', 1
    )
    assert "feilds: Extra inputs are not permitted" in problems_of(tmp_path, dortmund, broken)


def test_routed_by_is_refused_with_a_reason(tmp_path: Path, dortmund: Municipality) -> None:
    broken = MINIMAL.replace(
        'topic = "lotse.bezirk.{bezirk}"\n',
        'topic = "lotse.bezirk.{bezirk}"\nrouted_by = "referrals"\n',
        1,
    )
    text = problems_of(tmp_path, dortmund, broken)
    assert "audience[0] (bezirksteam)" in text
    assert "routed_by is no longer supported: each producing service routes its own" in text


def test_unknown_event_type(tmp_path: Path, dortmund: Municipality) -> None:
    broken = with_bezirksteam_events(
        '    { type = "de.lotse.visits.visit-forgotten.v1", fields = ["case_id"] },\n'
    )
    text = problems_of(tmp_path, dortmund, broken)
    assert "audience bezirksteam, event de.lotse.visits.visit-forgotten.v1:" in text
    assert "is unknown" in text


def test_unknown_event_version(tmp_path: Path, dortmund: Municipality) -> None:
    broken = with_bezirksteam_events(
        '    { type = "de.lotse.visits.visit-overdue.v7", fields = ["case_id"] },\n'
    )
    assert "major version 7 is unknown" in problems_of(tmp_path, dortmund, broken)


def test_field_not_in_model(tmp_path: Path, dortmund: Municipality) -> None:
    broken = with_bezirksteam_events(
        '    { type = "de.lotse.visits.visit-overdue.v1", fields = ["case_id", "family_name"] },\n'
    )
    text = problems_of(tmp_path, dortmund, broken)
    assert "audience bezirksteam, event de.lotse.visits.visit-overdue.v1:" in text
    assert "field(s) family_name not in VisitOverdue" in text


def test_field_listed_twice(tmp_path: Path, dortmund: Municipality) -> None:
    broken = with_bezirksteam_events(
        '    { type = "de.lotse.visits.visit-overdue.v1", fields = ["case_id", "case_id"] },\n'
    )
    assert "field(s) listed twice: case_id" in problems_of(tmp_path, dortmund, broken)


def test_event_listed_twice(tmp_path: Path, dortmund: Municipality) -> None:
    entry = '    { type = "de.lotse.visits.visit-overdue.v1", fields = ["case_id"] },\n'
    broken = with_bezirksteam_events(entry + entry)
    assert "audience bezirksteam: event de.lotse.visits.visit-overdue.v1 listed twice" in (
        problems_of(tmp_path, dortmund, broken)
    )


def test_never_routed_type(tmp_path: Path, dortmund: Municipality) -> None:
    broken = with_bezirksteam_events(
        '    { type = "de.lotse.intake.needs-assessed.v1", fields = ["case_id"] },\n'
    )
    assert "never routed (policy.never_routed)" in problems_of(tmp_path, dortmund, broken)


def test_never_routed_must_name_known_types(tmp_path: Path, dortmund: Municipality) -> None:
    broken = MINIMAL.replace("needs-assessed.v1", "needs-guessed.v1", 1)
    assert "policy.never_routed:" in problems_of(tmp_path, dortmund, broken)


def test_sealed_block_to_bezirksteam(tmp_path: Path, dortmund: Municipality) -> None:
    broken = with_bezirksteam_events(
        '    { type = "de.lotse.referrals.referral-requested.v1",'
        ' fields = ["case_id", "disclosure"] },\n'
    )
    text = problems_of(tmp_path, dortmund, broken)
    assert "field(s) disclosure carry an encrypted personal-data block" in text
    assert "only traeger audiences may receive" in text


def test_bezirksteam_writing_a_partner_topic(tmp_path: Path, dortmund: Municipality) -> None:
    broken = MINIMAL.replace(
        'topic = "lotse.bezirk.{bezirk}"',
        'topic = "lotse.bezirk.{bezirk}"\n'
        'writes = ["lotse.partner.hebammenzentrum-dortmund.referrals"]',
    )
    text = problems_of(tmp_path, dortmund, broken)
    assert "audience bezirksteam: writes 'lotse.partner.hebammenzentrum-dortmund.referrals'" in text
    assert "outside its scope" in text
    # One problem for the pattern, not one per Bezirk.
    assert text.count("outside its scope") == 1


def test_bezirksteam_feed_pattern_must_be_its_own(tmp_path: Path, dortmund: Municipality) -> None:
    broken = MINIMAL.replace('topic = "lotse.bezirk.{bezirk}"', 'topic = "lotse.bezirk.hoerde"')
    text = problems_of(tmp_path, dortmund, broken)
    assert "reads 'lotse.bezirk.hoerde' (lotse.bezirk.hoerde)" in text


def test_traeger_reading_another_traegers_topic(tmp_path: Path, dortmund: Municipality) -> None:
    broken = MINIMAL.replace(
        'writes = ["lotse.partner.{traeger}.responses"]',
        'writes = ["lotse.partner.{traeger}.responses"]\n'
        'reads = ["lotse.partner.hebammenzentrum-dortmund.referrals"]',
    )
    text = problems_of(tmp_path, dortmund, broken)
    assert "audience traeger: reads 'lotse.partner.hebammenzentrum-dortmund.referrals'" in text
    assert "a Träger reads only" in text


def test_traeger_writing_to_the_domain(tmp_path: Path, dortmund: Municipality) -> None:
    broken = MINIMAL.replace(
        'writes = ["lotse.partner.{traeger}.responses"]',
        'writes = ["lotse.partner.{traeger}.responses", "lotse.referrals"]',
    )
    assert "audience traeger: writes 'lotse.referrals'" in problems_of(tmp_path, dortmund, broken)


def test_service_writing_anothers_topic(tmp_path: Path, dortmund: Municipality) -> None:
    broken = MINIMAL.replace(
        'writes = ["lotse.referrals", "lotse.dlq.referrals"]',
        'writes = ["lotse.referrals", "lotse.dlq.referrals", "lotse.visits"]',
    )
    text = problems_of(tmp_path, dortmund, broken)
    assert "audience service-referrals: writes 'lotse.visits'" in text


def test_service_reading_a_bezirk_feed(tmp_path: Path, dortmund: Municipality) -> None:
    broken = MINIMAL.replace(
        'reads = ["lotse.visits", ', 'reads = ["lotse.visits", "lotse.bezirk.{bezirk}", '
    )
    text = problems_of(tmp_path, dortmund, broken)
    assert "audience service-referrals: reads 'lotse.bezirk.{bezirk}'" in text


def test_unknown_bezirk_in_filter(tmp_path: Path, dortmund: Municipality) -> None:
    broken = with_bezirksteam_events(
        '    { type = "de.lotse.visits.visit-overdue.v1", fields = ["case_id"],'
        ' bezirke = ["hoerde", "hamm-mitte"] },\n'
    )
    text = problems_of(tmp_path, dortmund, broken)
    assert "bezirke filter names unknown Stadtbezirk(e) hamm-mitte of Dortmund" in text


def test_unknown_traeger_in_filter(tmp_path: Path, dortmund: Municipality) -> None:
    broken = MINIMAL.replace(
        'fields = ["referral_id", "reason"] }',
        'fields = ["referral_id", "reason"], traeger = ["awo-dortmund"] }',
    )
    text = problems_of(tmp_path, dortmund, broken)
    assert "audience traeger, event de.lotse.referrals.referral-cancelled.v1:" in text
    assert "traeger filter names unknown Träger awo-dortmund of Dortmund" in text


def test_filter_on_the_wrong_kind(tmp_path: Path, dortmund: Municipality) -> None:
    broken = MINIMAL.replace(
        'fields = ["referral_id", "reason"] }',
        'fields = ["referral_id", "reason"], bezirke = ["hoerde"] }',
    )
    assert "a bezirke filter is only for bezirksteam entries" in problems_of(
        tmp_path, dortmund, broken
    )


def test_duplicate_audience(tmp_path: Path, dortmund: Municipality) -> None:
    duplicate = MINIMAL[MINIMAL.index('[[audience]]\nkind = "service"') :]
    text = problems_of(tmp_path, dortmund, MINIMAL + "\n" + duplicate)
    assert "duplicate audience 'service-referrals' (2 entries)" in text


def test_unknown_service(tmp_path: Path, dortmund: Municipality) -> None:
    broken = MINIMAL + '\n[[audience]]\nkind = "service"\nname = "billing"\n'
    assert "unknown service 'billing'" in problems_of(tmp_path, dortmund, broken)


def test_events_on_a_dashboard(tmp_path: Path, dortmund: Municipality) -> None:
    broken = MINIMAL + (
        '\n[[audience]]\nkind = "dashboard"\nreads = ["lotse.reporting.kpis"]\n'
        'consumer_groups = ["lotse-dashboard"]\n'
        'events = [{ type = "de.lotse.visits.visit-overdue.v1", fields = ["case_id"] }]\n'
    )
    text = problems_of(tmp_path, dortmund, broken)
    assert (
        "audience dashboard: only bezirksteam and traeger audiences receive routed events" in text
    )


def test_dashboard_reading_domain_topics(tmp_path: Path, dortmund: Municipality) -> None:
    broken = MINIMAL + (
        '\n[[audience]]\nkind = "dashboard"\nreads = ["lotse.intake"]\n'
        'consumer_groups = ["lotse-dashboard"]\n'
    )
    assert "audience dashboard: reads 'lotse.intake'" in problems_of(tmp_path, dortmund, broken)


def test_routed_kind_needs_topic(tmp_path: Path, dortmund: Municipality) -> None:
    broken = MINIMAL.replace('topic = "lotse.bezirk.{bezirk}"\n', "")
    text = problems_of(tmp_path, dortmund, broken)
    assert "audience bezirksteam: a routed audience needs a feed topic" in text


def test_topic_only_for_routed_kinds(tmp_path: Path, dortmund: Municipality) -> None:
    broken = MINIMAL.replace('name = "visits"\n', 'name = "visits"\ntopic = "lotse.visits"\n')
    text = problems_of(tmp_path, dortmund, broken)
    assert "audience service-visits: topic is only for bezirksteam and traeger audiences" in text


def test_producer_must_be_declared(tmp_path: Path, dortmund: Municipality) -> None:
    broken = MINIMAL.replace(VISITS_SERVICE, "")
    assert broken != MINIMAL
    text = problems_of(tmp_path, dortmund, broken)
    assert (
        "audience bezirksteam, event de.lotse.visits.visit-overdue.v1: its producer "
        "service-visits is not declared, so nobody may write the feed"
    ) in text


def test_producer_must_publish_the_domain_topic(tmp_path: Path, dortmund: Municipality) -> None:
    broken = MINIMAL.replace(
        'writes = ["lotse.visits", "lotse.dlq.visits"]', 'writes = ["lotse.dlq.visits"]'
    )
    text = problems_of(tmp_path, dortmund, broken)
    assert "its producer service-visits does not write lotse.visits, where this event" in text


def test_events_from_outside_cannot_be_routed(tmp_path: Path, dortmund: Municipality) -> None:
    broken = MINIMAL.replace(
        '    { type = "de.lotse.referrals.referral-cancelled.v1", fields = ["referral_id", '
        '"reason"] },\n',
        '    { type = "de.lotse.partner.referral-answer.v1", fields = ["referral_id"] },\n',
    )
    assert broken != MINIMAL
    text = problems_of(tmp_path, dortmund, broken)
    assert "its source /partner/{traeger} is no Lotse service, so no outbox would route it" in text


def test_service_cannot_declare_feed_writes(tmp_path: Path, dortmund: Municipality) -> None:
    # Feed access is derived from the routed events; declaring it by hand is refused.
    broken = MINIMAL.replace(
        'writes = ["lotse.visits", "lotse.dlq.visits"]',
        'writes = ["lotse.visits", "lotse.dlq.visits", "lotse.partner.{traeger}.referrals"]',
    )
    text = problems_of(tmp_path, dortmund, broken)
    assert "audience service-visits: writes 'lotse.partner.{traeger}.referrals'" in text
    assert "feed access follows from the routed events it produces" in text


def test_consumer_group_must_be_per_member(tmp_path: Path, dortmund: Municipality) -> None:
    broken = MINIMAL.replace('"lotse-partner-{traeger}"', '"lotse-partners"')
    text = problems_of(tmp_path, dortmund, broken)
    assert "consumer group 'lotse-partners' must contain {traeger}" in text


def test_consumer_group_shared_by_two_audiences(tmp_path: Path, dortmund: Municipality) -> None:
    broken = MINIMAL.replace('"lotse-referrals"', '"lotse-partner-hebammenzentrum-dortmund"')
    text = problems_of(tmp_path, dortmund, broken)
    assert (
        "consumer group 'lotse-partner-hebammenzentrum-dortmund' is used by both "
        "traeger-hebammenzentrum-dortmund and service-referrals"
    ) in text


def test_reading_without_consumer_group(tmp_path: Path, dortmund: Municipality) -> None:
    broken = MINIMAL.replace('consumer_groups = ["lotse-referrals"]\n', "")
    assert "audience service-referrals: reads topics but declares no consumer group" in (
        problems_of(tmp_path, dortmund, broken)
    )


def test_unknown_placeholder(tmp_path: Path, dortmund: Municipality) -> None:
    broken = MINIMAL.replace('topic = "lotse.bezirk.{bezirk}"', 'topic = "lotse.bezirk.{district}"')
    text = problems_of(tmp_path, dortmund, broken)
    assert "pattern 'lotse.bezirk.{district}' uses {district}; allowed here: {bezirk}" in text


def test_traeger_placeholder_in_a_bezirksteam(tmp_path: Path, dortmund: Municipality) -> None:
    broken = MINIMAL.replace(
        'topic = "lotse.bezirk.{bezirk}"', 'topic = "lotse.partner.{traeger}.referrals"', 1
    )
    assert "uses {traeger}; allowed here: {bezirk}" in problems_of(tmp_path, dortmund, broken)


def test_all_problems_listed_at_once(tmp_path: Path, dortmund: Municipality) -> None:
    broken = with_bezirksteam_events(
        '    { type = "de.lotse.visits.visit-overdue.v1", fields = ["nope"] },\n'
        '    { type = "de.lotse.intake.needs-assessed.v1", fields = ["case_id"] },\n'
    ).replace('"lotse-partner-{traeger}"', '"lotse-partners"')
    path = tmp_path / "broken.toml"
    path.write_text(broken, encoding="utf-8")
    with pytest.raises(RegistryError) as info:
        load_registry(dortmund, str(path))
    # The needs-assessed entry is wrong twice: never routed, and its producer (intake) is
    # not declared.
    assert len(info.value.problems) == 4
    message = str(info.value)
    assert message.startswith(f"subscription registry {path} is invalid:")
    assert "field(s) nope" in message
    assert "never routed" in message
    assert "lotse-partners" in message
