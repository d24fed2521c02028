"""The dashboard in a real headless browser (Debian's chromium) against the live service:
figures per Bezirk, the overview of the twelve Bezirke, trend charts, and a new registration
changing a number on the open page through the server-sent-event stream."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from lotse_reporting.app import create_app
from lotse_tooling.embedded import free_port

from tests.conftest import Broker
from tests.reporting.browser import Chromium, find_chromium
from tests.reporting.builders import Family, at, publish, to_records
from tests.reporting.conftest import settings_for, wait_until
from tests.support import bearer

pytestmark = pytest.mark.integration

CELL = '#cards [data-cell="hoerde/2025-03/families_registered"]'
OVERVIEW_CELL = '#overview [data-cell="{area}/2025-03/families_registered"]'


def text_of(selector: str) -> str:
    """JavaScript: the text of the first element matching ``selector`` (or undefined)."""
    return f"document.querySelector('{selector}')?.textContent"


@pytest.fixture(scope="module")
def chromium() -> Path:
    binary, why = find_chromium()
    if binary is None:
        pytest.skip(f"no headless browser for the dashboard test: {why}")
    return binary


class LiveServer:
    """The app under uvicorn on a free port, in a thread (lifespan, consumers and all)."""

    def __init__(self, app: FastAPI) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            lifespan="on",
            timeout_graceful_shutdown=3,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        wait_until(lambda: self.server.started, 30, "uvicorn started")
        wait_until(
            lambda: httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200,
            60,
            "service ready",
        )
        return self

    def __exit__(self, *_: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


@pytest.fixture
def live(broker: Broker, topics: str, sqlite_url: str) -> Iterator[LiveServer]:
    # Opened as `./lotse up` and the demo open it: a browser has no token to present.
    app = create_app(settings_for(broker, topics, sqlite_url, dashboard_public=True))
    with LiveServer(app) as server:
        yield server


def registered(url: str) -> float | None:
    response = httpx.get(
        f"{url}/kpis",
        params={"bezirk": "hoerde", "period": "2025-03", "figure": "families_registered"},
        headers=bearer("analyst", subject="test"),
        timeout=5,
    )
    rows = [r for r in response.json() if r["dimension"] is None]
    return rows[0]["value"] if rows else None


def test_a_new_registration_changes_the_open_dashboard(
    chromium: Path, live: LiveServer, broker: Broker, topics: str, tmp_path: Path
) -> None:
    families = [Family(bezirk="hoerde") for _ in range(6)]
    first = [f.registered(at("2025-03-03")) for f in families]
    publish(broker.bootstrap, to_records(first, topics))
    wait_until(lambda: registered(live.url) == 6, 60, "six families published")

    with Chromium(chromium) as browser:
        browser.navigate(f"{live.url}/dashboard?bezirk=hoerde&period=2025-03")
        assert browser.wait_for(text_of(CELL)) == "6"
        browser.wait_for("document.getElementById('live-text').textContent.startsWith('live')")
        # The overview lists the twelve Stadtbezirke and the city; four trend charts.
        rows = browser.evaluate(
            "[...document.querySelectorAll('#overview tbody tr')].map(r => r.dataset.area)"
        )
        assert len(rows) == 13
        assert rows[-1] == "stadt"
        assert {"hoerde", "innenstadt-west", "mengede"} <= set(rows)
        assert browser.evaluate("document.querySelectorAll('#trends svg').length") == 4
        assert browser.evaluate(text_of(OVERVIEW_CELL.format(area="hoerde"))) == "6"
        title = browser.evaluate("document.getElementById('cards-title').textContent")
        assert title == "Hörde · Mär 2025"
        browser.evaluate("window.lotseMarker = 'same page'")

        started = time.monotonic()
        late = Family(bezirk="hoerde")
        publish(broker.bootstrap, to_records([late.registered(at("2025-03-20"))], topics))
        # Updated in place, not reloaded: the marker set on the page is still there.
        changed = f"{text_of(CELL)} === '7' && window.lotseMarker"
        assert browser.wait_for(changed, timeout_s=30) == "same page"
        assert time.monotonic() - started < 30
        # The city total in the overview followed as well.
        assert browser.evaluate(text_of(OVERVIEW_CELL.format(area="stadt"))) == "7"
        browser.screenshot(tmp_path / "dashboard.png")
    assert (tmp_path / "dashboard.png").stat().st_size > 10_000


def test_the_dashboard_stream_sends_newly_published_figures(
    live: LiveServer, broker: Broker, topics: str
) -> None:
    received: list[str] = []

    def listen() -> None:
        with httpx.stream("GET", f"{live.url}/dashboard/stream?after=0", timeout=30) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            for line in response.iter_lines():
                received.append(line)
                if line.startswith("data:") and "hoerde" in line:
                    return

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    families = [Family(bezirk="hoerde") for _ in range(5)]
    events = [f.registered(at("2025-03-03")) for f in families]
    publish(broker.bootstrap, to_records(events, topics))
    listener.join(timeout=30)
    assert any(line == "event: kpis" for line in received)
    assert any(line.startswith("id: ") for line in received)
    assert any('"b": "hoerde"' in line and '"families_registered"' in line for line in received)


def test_the_dashboard_needs_a_login_unless_opened(
    broker: Broker, topics: str, sqlite_url: str
) -> None:
    from fastapi.testclient import TestClient

    app = create_app(settings_for(broker, topics, sqlite_url))  # closed unless opened
    with TestClient(app) as client:
        assert client.get("/dashboard").status_code == 401
        assert client.get("/dashboard/data").status_code == 401
        assert client.get("/dashboard/annual/2025.csv").status_code == 401
        page = client.get("/dashboard", headers=bearer("analyst", subject="jhp"))
        assert page.status_code == 200
        assert '<script src="/dashboard/dashboard.js">' in page.text
