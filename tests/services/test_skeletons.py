"""Every service builds from its settings alone and answers its probes."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from lotse_delivery.app import create_app as delivery_app
from lotse_delivery.settings import DeliverySettings
from lotse_intake.app import create_app as intake_app
from lotse_intake.settings import IntakeSettings
from lotse_referrals.app import create_app as referrals_app
from lotse_referrals.settings import ReferralsSettings
from lotse_reporting.app import create_app as reporting_app
from lotse_reporting.settings import ReportingSettings
from lotse_runtime.settings import ServiceSettings
from lotse_tooling.embedded import free_port
from lotse_visits.app import create_app as visits_app
from lotse_visits.settings import VisitsSettings

from tests.conftest import Broker

pytestmark = pytest.mark.integration

SERVICES = {
    "intake": (intake_app, IntakeSettings),
    "visits": (visits_app, VisitsSettings),
    "referrals": (referrals_app, ReferralsSettings),
    "reporting": (reporting_app, ReportingSettings),
    "delivery": (delivery_app, DeliverySettings),
}


def build(name: str, **settings: Any) -> FastAPI:
    factory, settings_class = SERVICES[name]
    built: ServiceSettings = settings_class(**settings)
    app: FastAPI = factory(built)  # type: ignore[operator]
    return app


def wait_ready(client: TestClient, timeout_s: float = 30.0) -> dict[str, object]:
    deadline = time.monotonic() + timeout_s
    while True:
        response = client.get("/readyz")
        if response.status_code == 200 or time.monotonic() > deadline:
            body: dict[str, object] = response.json()
            return body
        time.sleep(0.1)


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_service_is_alive_and_ready_on_real_parts(
    name: str, broker: Broker, tmp_path: Path, topic_prefix: str
) -> None:
    app = build(
        name,
        kafka_bootstrap=broker.bootstrap,
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}",
        topic_prefix=topic_prefix,
        data_dir=tmp_path,
    )
    with TestClient(app) as client:
        assert client.get("/healthz").json() == {"status": "alive"}
        ready = wait_ready(client)
        assert ready["status"] == "ready", ready
        assert client.get("/openapi.json").json()["info"]["title"] == f"Lotse {name}"


def test_readiness_names_an_unreachable_broker(tmp_path: Path) -> None:
    app = build(
        "visits",
        kafka_bootstrap=f"127.0.0.1:{free_port()}",
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}",
        data_dir=tmp_path,
    )
    with TestClient(app) as client:
        response = client.get("/readyz")
        assert response.status_code == 503
        checks = response.json()["checks"]
        assert checks["database"] == "ok"
        assert checks["broker"] != "ok"


def test_settings_come_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("LOTSE_REFERRALS_DATABASE_URL", f"sqlite:///{tmp_path / 'r.db'}")
    monkeypatch.setenv("LOTSE_CITY", "hamm")
    app = referrals_app()
    runtime = app.state.runtime
    assert runtime.city.name.lower() == "hamm"
    assert runtime.db.url.endswith("r.db")
