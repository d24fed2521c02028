"""The city simulator: a seeded plan, driven through the four services (each its own process,
on the simulated clock, with the real broker), and the checker that compares the ground
truth with what the platform ends up with — passing on the real run, failing on a truth that
does not match."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from lotse_contracts.city import Municipality, load_city
from lotse_simulator import truth as truth_file
from lotse_simulator.checker import check
from lotse_simulator.cli import main as simulator_main
from lotse_simulator.driver import Driver
from lotse_simulator.endpoints import Endpoints, Tokens
from lotse_simulator.plan import CityPlan, FamilyPlan, make_plan, plan_digest
from lotse_simulator.platform import SimulatedPlatform
from lotse_simulator.truth import Truth

from tests.conftest import Broker

FAMILIES = 40
SEED = 11
YEAR = 2025


def test_same_seed_gives_the_same_plan() -> None:
    city = load_city("dortmund")
    first = make_plan(city, seed=SEED, year=YEAR, families=FAMILIES)
    again = make_plan(city, seed=SEED, year=YEAR, families=FAMILIES)
    other = make_plan(city, seed=SEED + 1, year=YEAR, families=FAMILIES)
    assert first == again
    assert plan_digest(first) == plan_digest(again)
    assert plan_digest(first) != plan_digest(other)
    assert len(first.families) == FAMILIES


def test_a_full_year_follows_the_city_figures() -> None:
    city = load_city("dortmund")
    plan = make_plan(city, seed=SEED, year=YEAR)
    channels = Counter(f.channel for f in plan.families)
    assert channels["clinic"] == 5_500  # Dortmund's births a year
    assert channels["move_in"] > 0
    by_bezirk = Counter(f.bezirk for f in plan.families)
    total = sum(b.population_share for b in city.stadtbezirke)
    for bezirk in city.stadtbezirke:
        share = by_bezirk[bezirk.slug] / len(plan.families)
        assert abs(share - bezirk.population_share / total) < 0.02, bezirk.slug
    assert all(f.registered_at.year == YEAR for f in plan.families)
    # Visits, referrals and Träger answers of every kind occur.
    outcomes = Counter(f.visit_outcome for f in plan.families)
    assert set(outcomes) == {
        None,
        "completed",
        "declined",
        "no_show_then_completed",
        "no_show_not_reached",
    }
    profiles = Counter(f.referral.profile for f in plan.families if f.referral)
    assert set(profiles) == {"completed", "ongoing", "rejected", "received_only", "silent"}
    assert sum(1 for f in plan.families if f.erase_after_days) > 30


def test_some_handovers_name_no_traeger_and_the_rest_of_the_plan_stays() -> None:
    city = load_city("dortmund")
    plan = make_plan(city, seed=SEED, year=YEAR)
    named = Counter(f.referral.traeger_named for f in plan.families if f.referral)
    assert set(named) == {"at_consent", "by_familienbuero", "never"}
    assert 0.08 < (named["by_familienbuero"] + named["never"]) / sum(named.values()) < 0.25
    for family in plan.families:
        referral = family.referral
        if referral is not None and referral.traeger_named == "never":
            assert (referral.answers, referral.withdraw_after_h) == ((), None)
        if referral is not None and referral.traeger_named == "by_familienbuero":
            assert referral.choose_after_h is not None


def _traegerless(family: FamilyPlan, how: str) -> FamilyPlan:
    referral = family.referral
    assert referral is not None
    if how == "never":
        chosen = dataclasses.replace(
            referral, traeger_named="never", answers=(), withdraw_after_h=None
        )
    else:
        chosen = dataclasses.replace(
            referral, traeger_named="by_familienbuero", choose_after_h=5.0, withdraw_after_h=None
        )
    return dataclasses.replace(family, referral=chosen)


def _with_every_turn(plan: CityPlan) -> CityPlan:
    """A small plan that surely contains a consent withdrawal of each kind, erasures, and
    handovers naming no Träger that the Familienbüro places (after a Babylotse's and after
    its own handover) or leaves to the Bezirksteam."""
    families: list[FamilyPlan] = list(plan.families)
    with_referral = [i for i, f in enumerate(families) if f.referral is not None]
    with_visit = [i for i, f in enumerate(families) if f.visit_outcome == "completed"]
    assert len(with_referral) >= 6
    assert len(with_visit) >= 6
    first, second = with_referral[0], with_referral[1]
    referral = families[first].referral
    assert referral is not None
    families[first] = dataclasses.replace(
        families[first], referral=dataclasses.replace(referral, withdraw_after_h=30.0)
    )
    families[second] = dataclasses.replace(families[second], erase_after_days=20.0)
    welcome = [i for i in with_visit if i not in (first, second)]
    families[welcome[0]] = dataclasses.replace(families[welcome[0]], withdraw_welcome_after_h=1.0)
    families[welcome[1]] = dataclasses.replace(families[welcome[1]], erase_after_days=60.0)
    by_office = [i for i in with_referral if families[i].referral.by == "familienbuero"]  # type: ignore[union-attr]
    assert by_office
    for index, how in (
        (with_referral[2], "never"),
        (with_referral[3], "by_familienbuero"),
        (by_office[-1], "by_familienbuero"),
    ):
        families[index] = _traegerless(families[index], how)
    return dataclasses.replace(plan, families=tuple(families))


@dataclass
class Run:
    city: Municipality
    truth: Truth
    truth_path: Path
    endpoints: Endpoints
    tokens: Tokens
    data_dir: Path


@pytest.fixture(scope="module")
def simulated_run(broker: Broker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    city = load_city("dortmund")
    plan = _with_every_turn(make_plan(city, seed=SEED, year=YEAR, families=FAMILIES))
    data_dir = tmp_path_factory.mktemp("simulated-city")
    platform = SimulatedPlatform(
        data_dir=data_dir,
        start_at=datetime(YEAR, 1, 1, tzinfo=UTC),
        bootstrap=broker.bootstrap,
        topic_prefix=f"sim{uuid.uuid4().hex[:8]}.",
        default_ports=False,
    )
    with platform:
        started = time.monotonic()
        endpoints = platform.start()
        up = time.monotonic()
        tokens = Tokens(platform.issuer_key)
        driver = Driver(
            plan, city, endpoints, tokens, clock_file=platform.clock_file, settle_days=7
        )
        truth = asyncio.run(asyncio.wait_for(driver.run(), timeout=150))
        print(f"platform up in {up - started:.1f} s, year driven in {time.monotonic() - up:.1f} s")
        truth_path = data_dir / "truth.json"
        truth_file.save(truth, truth_path, city.zone())
        yield Run(city, truth, truth_path, endpoints, tokens, data_dir)


def _escalated_at(run: Run, bezirk: str, handover_id: str) -> str | None:
    """When the open wish of a handover was escalated (polls: the escalation job runs every
    few seconds on the platform's simulated clock)."""
    url = f"{run.endpoints.referrals}/bezirke/{bezirk}/wishes"
    headers = run.tokens.headers("bezirksteam", bezirk=bezirk)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        rows = httpx.get(url, params={"state": "open"}, headers=headers, timeout=10).json()
        for row in rows:
            if row["source_id"] == handover_id and row["escalated_at"]:
                return str(row["escalated_at"])
        time.sleep(1.0)
    return None


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_the_platform_ends_as_the_ground_truth_says(simulated_run: Run) -> None:
    truth = simulated_run.truth
    assert truth.problems == []
    assert len(truth.families) == FAMILIES
    visits = Counter(v.status for f in truth.families for v in f.visits)
    assert visits["completed"] > FAMILIES // 2
    assert visits["cancelled"] >= 1  # withdrawn or erased before the appointment
    referrals = [f.referral for f in truth.families if f.referral]
    assert all(r.referral_id for r in referrals if r.traeger_named != "never")
    assert "cancelled" in {r.expected_status for r in referrals}
    assert sum(1 for f in truth.families if f.erased_at) >= 2
    # The year's months carry the simulated calendar, not today's.
    months = {f.registered_at[:7] for f in truth.families}
    assert len(months) >= 10
    assert all(m.startswith(str(YEAR)) for m in months)

    report = asyncio.run(
        check(
            truth,
            simulated_run.endpoints,
            simulated_run.tokens,
            zone=simulated_run.city.zone(),
            timeout_s=60,
        )
    )
    assert report.ok, report.summary()
    assert report.kpi_cells_compared > 50
    assert report.families == FAMILIES
    # Every handover ended somewhere: the Träger-less ones placed by the Familienbüro as
    # referrals, the one nobody placed still an open wish (or escalated).
    traegerless = {f.referral.traeger_named: f.referral for f in truth.families if f.referral}
    assert traegerless["by_familienbuero"].referral_id is not None
    assert traegerless["never"].referral_id is None
    assert traegerless["never"].wish_id is not None
    assert report.wishes["placed"] == sum(1 for r in referrals if r.referral_id)
    assert report.wishes.get("open", 0) + report.wishes.get("escalated", 0) >= 1
    # The wish nobody placed reaches the Bezirksteam: the simulated year went on for far
    # more than the five working days it may wait, and the platform escalates it once.
    left = next(f for f in truth.families if f.referral and f.referral.traeger_named == "never")
    assert left.referral is not None
    escalated = _escalated_at(simulated_run, left.bezirk, left.referral.handover_id)
    assert escalated is not None, f"{left.key}: the wish nobody placed was never escalated"


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_the_checker_fails_when_the_platform_differs(
    simulated_run: Run, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = json.loads(simulated_run.truth_path.read_text())
    completed = next(
        f for f in raw["families"] if any(v["status"] == "completed" for v in f["visits"])
    )
    for visit in completed["visits"]:
        if visit["status"] == "completed":
            visit["status"] = "declined"  # the truth now claims a decline the platform never saw
    referred = next(f for f in raw["families"] if f["referral"] and f["referral"]["referral_id"])
    referred["referral"]["expected_status"] = "completed-elsewhere"
    # A handover the platform never heard of: its wish is nowhere.
    lost = next(f for f in raw["families"] if f["referral"] and f["key"] not in (referred["key"],))
    lost_handover = "00000000-0000-4000-8000-00000000dead"
    lost["referral"]["handover_id"] = lost_handover
    tampered = tmp_path / "tampered.json"
    tampered.write_text(json.dumps(raw))

    report = asyncio.run(
        check(
            truth_file.load(tampered),
            simulated_run.endpoints,
            simulated_run.tokens,
            zone=simulated_run.city.zone(),
            timeout_s=0,  # the platform has settled (previous test): one comparison
        )
    )
    assert not report.ok
    assert completed["key"] in report.family_mismatches
    assert referred["key"] in report.family_mismatches
    assert any(
        lost_handover in m and "no referral, no open-wish entry, no escalation" in m
        for m in report.family_mismatches[lost["key"]]
    ), report.family_mismatches.get(lost["key"])
    assert any("visits_declined" in m for m in report.kpi_mismatches)

    # The command says so too, and exits non-zero.
    ends = simulated_run.endpoints
    code = simulator_main(
        [
            "check",
            "--truth",
            str(tampered),
            "--data-dir",
            str(simulated_run.data_dir),
            "--intake-url",
            ends.intake,
            "--visits-url",
            ends.visits,
            "--referrals-url",
            ends.referrals,
            "--reporting-url",
            ends.reporting,
            "--timeout",
            "0",
        ]
    )
    assert code == 1
    assert "FAIL" in capsys.readouterr().out
