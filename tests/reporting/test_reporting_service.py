"""The reporting service on real parts (embedded or real Kafka, SQLite): events in, anonymised
figures out on the API, the compacted reporting stream and the annual report; impossible and
malformed events dead-lettered and never counted."""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from fastapi.testclient import TestClient
from lotse_contracts.cloudevents import from_kafka
from lotse_contracts.events.base import CATALOGUE, EventModel
from lotse_contracts.events.intake import Channel
from lotse_contracts.events.reporting import KpiUpdated
from lotse_reporting.app import create_app

from tests.conftest import Broker
from tests.reporting.builders import Family, Published, at, new_id, publish, to_records
from tests.reporting.conftest import create_topics, reporting_of, settings_for, settle, wait_ready
from tests.support import Record, _read, bearer

pytestmark = pytest.mark.integration

ANALYST = bearer("analyst", subject="jhp-1")
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


@dataclass
class Scenario:
    client: TestClient
    prefix: str
    bootstrap: str
    families: list[Family]
    records: list[Published]
    ids: set[str]
    """Every case, visit, referral and consent id that went in."""


def scenario_events() -> tuple[list[Family], list[EventModel], list[EventModel]]:
    """March 2025: Hörde 7 families, Innenstadt-Nord 12, Brackel 5, Eving 3; plus impossible
    events. Eving's 3 are hidden, and Brackel's 5 with them (the smallest other Bezirk)."""
    hoerde = [Family(bezirk="hoerde", family_name=f"Hoerdemann-{i}") for i in range(5)]
    hoerde += [
        Family(bezirk="hoerde", channel=Channel.MOVE_IN, family_name=f"Zuzug-{i}") for i in range(2)
    ]
    nord = [Family(bezirk="innenstadt-nord", family_name=f"Nordstadt-{i}") for i in range(12)]
    eving = [
        Family(bezirk="eving", family_name=f"Eving-{i}", phone="+49 231 999 1234") for i in range(3)
    ]
    brackel = [Family(bezirk="brackel", family_name=f"Brackel-{i}") for i in range(5)]
    events: list[EventModel] = []
    for i, family in enumerate(hoerde + nord + eving + brackel):
        events.append(family.registered(at("2025-03-03", 8 + i % 8), traeger_consent=i % 2 == 0))
    for i, family in enumerate(hoerde[:6] + nord[:10]):
        visit, starts = new_id(), at("2025-03-13", 10)
        events.append(family.scheduled(visit, at("2025-03-04"), starts))
        events.append(family.completed(visit, starts, at("2025-03-13", 11), 10 + i % 5))
    for family in nord[:6]:
        referral = family.referral(new_id())
        events += [
            referral.requested(at("2025-03-05")),
            referral.accepted(at("2025-03-07")),
            referral.first_contact(at("2025-03-10"), 5),
        ]
    # Impossible: an unknown Bezirk, a visit done before it was scheduled, a no-show recorded
    # before the appointment, a referral to a module the city does not run.
    ghost = Family(bezirk="atlantis")
    late = nord[11]
    visit = new_id()
    impossible: list[EventModel] = [
        ghost.registered(at("2025-03-03")),
        late.scheduled(visit, at("2025-03-10"), at("2025-03-20")),
        late.completed(visit, at("2025-03-08"), at("2025-03-08", 11), 9),
        late.missed(new_id(), at("2025-03-21")).model_copy(
            update={"recorded_at": at("2025-03-19")}
        ),
        late.referral(new_id(), "zauberschule").requested(at("2025-03-06")),
    ]
    return hoerde + nord + eving + brackel, events, impossible


@pytest.fixture(scope="module")
def scenario(broker: Broker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    prefix = create_topics(broker)
    url = f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('reporting') / 'db.sqlite'}"
    families, events, impossible = scenario_events()
    records = to_records(events + impossible, prefix)
    # At-least-once delivery: the first registration arrives twice (same CloudEvents id).
    records.append(records[0])
    garbage = Published(prefix + "lotse.visits", b"k", b"not json at all", [("x", b"y")])
    records.append(garbage)
    ids = {f.case_id for f in families}
    for event in events:
        data = event.model_dump(mode="json")
        ids |= {v for v in data.values() if isinstance(v, str) and UUID.fullmatch(v)}
        ids |= {c["consent_id"] for c in data.get("consents", [])}
    app = create_app(settings_for(broker, prefix, url))
    with TestClient(app) as client:
        wait_ready(client)
        publish(broker.bootstrap, records)
        settle(client, len(records))
        yield Scenario(client, prefix, broker.bootstrap, families, records, ids)


def kpi(client: TestClient, **params: str) -> list[dict[str, Any]]:
    response = client.get("/kpis", params=params, headers=ANALYST)
    assert response.status_code == 200, response.text
    body: list[dict[str, Any]] = response.json()
    return body


def one(
    client: TestClient, bezirk: str, period: str, figure: str, dimension: str = ""
) -> dict[str, Any]:
    params = {"bezirk": bezirk, "period": period, "figure": figure}
    if dimension:
        params["dimension"] = dimension
    else:
        params["breakdowns"] = "false"
    found = kpi(client, **params)
    assert len(found) == 1, found
    return found[0]


def test_figures_per_bezirk_and_month(scenario: Scenario) -> None:
    c = scenario.client
    assert one(c, "hoerde", "2025-03", "families_registered")["value"] == 7
    assert one(c, "innenstadt-nord", "2025-03", "families_registered")["value"] == 12
    assert one(c, "hoerde", "2025-03", "visits_completed")["value"] == 6
    assert one(c, "hoerde", "2025-03", "reach_rate")["value"] == pytest.approx(85.7)
    assert one(c, "innenstadt-nord", "2025-03", "reach_rate")["value"] == pytest.approx(83.3)
    assert one(c, "innenstadt-nord", "2025-03", "referrals_accepted")["value"] == 6
    assert one(c, "innenstadt-nord", "2025-03", "median_days_to_warm_handover")["value"] == 5
    reach = one(c, "innenstadt-nord", "2025", "reach_rate")
    assert reach["unit"] == "percent"
    assert reach["suppressed"] is False


def test_small_cells_and_their_complements_are_suppressed(scenario: Scenario) -> None:
    c = scenario.client
    eving = one(c, "eving", "2025-03", "families_registered")
    assert eving == {**eving, "suppressed": True, "value": None}
    # 2 move-in families in Hörde: hidden, and the clinic count with them.
    assert one(c, "hoerde", "2025-03", "families_registered_move_in")["suppressed"] is True
    assert one(c, "hoerde", "2025-03", "families_registered_clinic")["suppressed"] is True
    assert one(c, "brackel", "2025-03", "families_registered")["suppressed"] is True
    assert one(c, "stadt", "2025-03", "families_registered")["value"] == 27


def test_no_suppressed_cell_can_be_computed_back_from_a_published_total(scenario: Scenario) -> None:
    cells = kpi(scenario.client, year="2025", limit="10000")
    by_key = {
        (str(x["bezirk"]), str(x["period"]), str(x["figure"]), x["dimension"]): x for x in cells
    }
    bezirke = sorted({k[0] for k in by_key} - {"stadt"})
    checked = 0
    for (bezirk, period, figure, dimension), total in by_key.items():
        if bezirk != "stadt" or total["suppressed"] or total["unit"] != "count":
            continue
        parts = [by_key[(b, period, figure, dimension)] for b in bezirke]
        hidden = [p for p in parts if p["suppressed"]]
        if not hidden:
            continue
        checked += 1
        derivable = total["value"] - sum(p["value"] for p in parts if not p["suppressed"])
        assert len(hidden) >= 2, (figure, period, dimension)
        assert derivable >= 5, (figure, period, dimension, derivable)
    assert checked > 0


def test_impossible_and_malformed_events_are_dead_lettered_with_a_reason(
    scenario: Scenario,
) -> None:
    dead = _read(scenario.bootstrap, scenario.prefix + "lotse.dlq.reporting", 5, 30.0)
    reasons = sorted(r.header("lotse_dlq_reason") or "" for r in dead)
    stages = sorted(r.header("lotse_dlq_stage") or "" for r in dead)
    assert stages == ["envelope", "rejected", "rejected", "rejected", "rejected"]
    joined = " | ".join(reasons)
    assert "bezirk: 'atlantis' is not a Stadtbezirk" in joined
    assert (
        "visit-completed: completed_at 2025-03-08T11:00:00+01:00 is before the visit was scheduled"
        in joined
    )
    assert "visit-missed: recorded_at" in joined
    assert "module: 'zauberschule'" in joined
    # Never counted: the city total is 27 families, the late family's visit is not done.
    assert one(scenario.client, "stadt", "2025", "families_registered")["value"] == 27
    assert one(scenario.client, "innenstadt-nord", "2025-03", "visits_completed")["value"] == 10


def test_a_redelivered_event_counts_once(scenario: Scenario) -> None:
    consumer = scenario.client.app.state.runtime.consumers[0]  # type: ignore[attr-defined]
    assert consumer.duplicates == 1
    assert one(scenario.client, "hoerde", "2025", "families_registered")["value"] == 7


TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})?")


def test_the_reporting_stream_carries_no_case_ids_and_no_personal_data(scenario: Scenario) -> None:
    published = reporting_of(scenario.client).published
    assert published > 0
    records: list[Record] = _read(
        scenario.bootstrap, scenario.prefix + "lotse.reporting.kpis", published, 30.0
    )
    assert len(records) == published
    personal = {"Musterweg", "Elif", "Mira", "kid-", "case_id", "personal", "ciphertext"}
    for family in scenario.families:
        personal |= {family.family_name, family.phone, family.postcode}
    # Random hex (event id, trace ids) may contain five digits in a row: not a postcode.
    random_headers = {"ce_id", "traceparent", "tracestate"}
    for record in records:
        text = b" ".join(
            [
                record.key or b"",
                record.value or b"",
                *(k.encode() + b"=" + v for k, v in record.headers),
            ]
        ).decode()
        meaningful = " ".join(
            [
                (record.key or b"").decode(),
                (record.value or b"").decode(),
                *(f"{k}={v.decode()}" for k, v in record.headers if k not in random_headers),
            ]
        )
        # Nor do a timestamp's microseconds ("…T01:07:44.442631Z" holds 44263).
        meaningful = TIMESTAMP.sub("<time>", meaningful)
        leaked = [i for i in scenario.ids if i in text] + [t for t in personal if t in meaningful]
        assert not leaked, f"{leaked} on the reporting stream: {text[:300]}"
        event = from_kafka(record.value, record.headers)
        data = CATALOGUE.parse(event)
        assert isinstance(data, KpiUpdated)
        # The subject and key are the cell, never a case; the only UUID is the event's own id.
        assert event.subject == data.cell() == (record.key or b"").decode()
        assert UUID.findall(text) == [event.id] * len(UUID.findall(text))
        assert set(json.loads(record.value or b"{}")) <= set(KpiUpdated.model_fields)


def test_the_latest_value_of_each_cell_is_on_the_stream(scenario: Scenario) -> None:
    published = reporting_of(scenario.client).published
    records = _read(scenario.bootstrap, scenario.prefix + "lotse.reporting.kpis", published, 30.0)
    latest: dict[str, dict[str, Any]] = {}
    for record in records:  # one key stays in one partition, in order: the last one counts
        latest[(record.key or b"").decode()] = json.loads(record.value or b"{}")
    cell = latest["hoerde/2025-03/families_registered"]
    assert cell["value"] == 7
    assert cell["suppressed"] is False
    assert latest["eving/2025-03/families_registered"]["suppressed"] is True
    assert "value" not in latest["eving/2025-03/families_registered"]
    api = {
        f"{x['bezirk']}/{x['period']}/{x['figure']}"
        + (f"/{x['dimension']}" if x["dimension"] else ""): x
        for x in kpi(scenario.client, year="2025", limit="10000")
    }
    assert set(api) == set(latest)
    assert all(api[k]["value"] == latest[k].get("value") for k in api)


def test_the_api_filters_and_refuses_bad_filters(scenario: Scenario) -> None:
    c = scenario.client
    assert c.get("/kpis").status_code == 401
    rows = kpi(c, bezirk="hoerde", figure="reach_rate")
    assert {r["period"] for r in rows} == {"2025-01", "2025-02", "2025-03", "2025"}
    assert {r["figure"] for r in rows} == {"reach_rate"}
    modules = kpi(c, bezirk="stadt", period="2025-03", figure="referrals_requested")
    assert {r["dimension"] for r in modules} >= {None, "module:familienhebamme", "status:accepted"}
    bad = c.get("/kpis", params={"bezirk": "atlantis"}, headers=ANALYST)
    assert bad.status_code == 422
    assert bad.json()["errors"][0]["field"] == "query.bezirk"
    assert "unknown Stadtbezirk 'atlantis'" in bad.json()["errors"][0]["reason"]
    bad = c.get("/kpis", params={"period": "2025-13"}, headers=ANALYST)
    assert bad.status_code == 422
    assert bad.json()["errors"][0]["field"] == "query.period"
    bad = c.get("/kpis", params={"figure": "happiness"}, headers=ANALYST)
    assert bad.status_code == 422
    assert bad.json()["errors"][0]["field"] == "query.figure"
    figures = c.get("/kpis/figures", headers=ANALYST).json()
    assert {f["figure"] for f in figures} >= {"reach_rate", "open_escalations"}
    # The API serves the declaration itself (lotse_contracts.figures), as the dashboard reads it.
    reach = next(f for f in figures if f["figure"] == "reach_rate")
    assert (reach["accumulates"], reach["attribution"], reach["suppression"]) == (
        "rate",
        "cohort",
        "cohort_ratio",
    )
    assert len(c.get("/kpis/bezirke", headers=ANALYST).json()) == 13


def test_the_annual_report_as_csv(scenario: Scenario) -> None:
    response = scenario.client.get(
        "/reports/annual/2025.csv", params={"bezirk": "hoerde"}, headers=ANALYST
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert {r["bezirk"] for r in rows} == {"hoerde"}
    year = {(r["figure"], r["dimension"]): r for r in rows if r["period"] == "2025"}
    assert year[("families_registered", "")]["value"] == "7"
    assert year[("reach_rate", "")]["value"] == "85.7"
    moved = year[("families_registered_move_in", "")]
    assert moved["suppressed"] == "true"
    assert moved["value"] == ""
    missing = scenario.client.get("/reports/annual/2019.csv", headers=ANALYST)
    assert missing.status_code == 422
    assert missing.json()["errors"][0]["field"] == "path.year"


def test_the_annual_report_as_html_with_charts(scenario: Scenario) -> None:
    response = scenario.client.get(
        "/reports/annual/2025.html", params={"bezirk": "hoerde"}, headers=ANALYST
    )
    assert response.status_code == 200
    html = response.text
    assert "Jahresbericht 2025 – Hörde" in html
    assert html.count("<svg") == 4
    assert "data-cell='hoerde/2025/families_registered'>7<" in html
    assert "85,7 %" in html  # German number format
    assert "Stadt gesamt" in html
    assert "•" in html
    assert "<script" not in html
    city = scenario.client.get("/reports/annual/2025.html", headers=ANALYST)
    assert "Stadt Dortmund (gesamt)" in city.text
