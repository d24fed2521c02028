"""Every service's OpenAPI document says how to authenticate, and its documentation pages work
without the internet.

The bearer (JWT) scheme is declared once (``components.securitySchemes``) and required on every
operation that needs a caller, per the service's access policy: health probes carry no
``security``, a route a setting may open (reporting's dashboard) has the token as optional, and
the documentation routes are not operations at all. Swagger UI and ReDoc load their scripts
from the service (``/docs-assets``, the ``fastapi-offline`` package), proven in headless
Chromium on this machine's closed network: the operations are listed and the Authorize button
offers the bearer scheme.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient
from lotse_runtime.docs import ASSETS_URL
from lotse_runtime.openapi import BEARER
from lotse_tooling.embedded import free_port
from uvicorn.importer import import_from_string

from tests.reporting.browser import Chromium, find_chromium

SERVICES = sorted(entry.name for entry in entry_points(group="lotse.services"))
_METHODS = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}


def build_app(service: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FastAPI:
    """The service's app as its image builds it (entry point, settings from the environment);
    nothing is started."""
    for key in list(os.environ):
        if key.startswith("LOTSE_") or key == "DATABASE_URL":
            monkeypatch.delenv(key)
    monkeypatch.setenv("LOTSE_DATA_DIR", str(tmp_path / service))
    monkeypatch.setenv("LOTSE_DATABASE_URL", f"sqlite+aiosqlite:///{tmp_path / service}.db")
    monkeypatch.setenv("LOTSE_KAFKA_BOOTSTRAP", f"127.0.0.1:{free_port()}")
    [entry] = [e for e in entry_points(group="lotse.services") if e.name == service]
    app = import_from_string(entry.value)()
    assert isinstance(app, FastAPI)
    return app


def operations(document: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if method in _METHODS:
                yield method.upper(), path, operation


@pytest.mark.parametrize("service", SERVICES)
def test_openapi_declares_the_bearer_scheme_where_a_token_is_needed(
    service: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = build_app(service, tmp_path, monkeypatch)
    document = TestClient(app).get("/openapi.json").json()
    scheme = document["components"]["securitySchemes"][BEARER]
    assert scheme == {**scheme, "type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
    assert "security" not in document, "no global requirement: each operation says its own"

    policy = app.state.access_policy
    protected = 0
    for method, path, operation in operations(document):
        rule = policy.get(f"{method} {path}")
        assert rule is not None, f"{service}: {method} {path} has no access rule"
        where = f"{service}: {method} {path}"
        if rule.public:
            assert "security" not in operation, f"{where} is public but asks for a token"
            assert "401" not in operation["responses"], where
            continue
        protected += 1
        expected: list[dict[str, list[str]]] = [{BEARER: []}]
        if rule.open_when is not None:
            expected.append({})
        assert operation.get("security") == expected, (
            f"{where}: security {operation.get('security')}"
        )
        assert "401" in operation["responses"], where
    assert protected, f"{service}: no operation needs a token?"
    paths = set(document["paths"])
    assert {"/healthz", "/readyz"} <= paths
    assert not {"/docs", "/redoc", "/openapi.json", ASSETS_URL} & paths


@pytest.mark.parametrize("service", SERVICES)
def test_docs_pages_load_their_assets_from_the_service(
    service: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = TestClient(build_app(service, tmp_path, monkeypatch))
    for page, assets in (
        ("/docs", ("swagger-ui-bundle.js", "swagger-ui.css")),
        ("/redoc", ("redoc.standalone.js",)),
    ):
        html = client.get(page)  # no token: the pages are public
        assert html.status_code == 200, page
        assert "cdn.jsdelivr.net" not in html.text, f"{page} still loads from a CDN"
        assert "fonts.googleapis.com" not in html.text, f"{page} loads web fonts"
        csp = html.headers["content-security-policy"]
        assert "default-src 'self'" in csp, f"{page} may load from elsewhere"
        for asset in assets:
            assert f"{ASSETS_URL}/{asset}" in html.text, f"{page} does not load {asset}"
            served = client.get(f"{ASSETS_URL}/{asset}")
            assert served.status_code == 200, asset
            assert len(served.content) > 10_000, asset
    assert client.get(f"{ASSETS_URL}/../../pyproject.toml").status_code == 404


class DocsServer:
    """The app under uvicorn on a free port, without its lifespan: the documentation needs no
    database, broker or consumers."""

    def __init__(self, app: FastAPI) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> DocsServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *_: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


def test_swagger_ui_and_redoc_work_offline_in_a_browser(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    binary, why = find_chromium()
    if binary is None:
        pytest.skip(f"no headless browser for the docs test: {why}")
    app = build_app("visits", tmp_path, monkeypatch)
    with DocsServer(app) as server, Chromium(binary) as browser:
        document = httpx.get(f"{server.url}/openapi.json", timeout=10).json()
        expected = sum(1 for _ in operations(document))

        browser.navigate(f"{server.url}/docs")
        count = f"document.querySelectorAll('.opblock').length === {expected}"
        assert browser.wait_for(count, timeout_s=30), "Swagger UI lists every operation"
        assert browser.evaluate("!!document.querySelector('button.authorize')"), "no Authorize"
        # Locked operations show a padlock; the health probes none.
        locks = browser.evaluate("document.querySelectorAll('.opblock .authorization__btn').length")
        assert locks == sum(1 for _, _, op in operations(document) if "security" in op)
        browser.evaluate("document.querySelector('button.authorize').click()")
        dialog = (
            "document.querySelector('.modal-ux') && document.querySelector('.modal-ux').innerText"
        )
        text = browser.wait_for(dialog)
        assert BEARER in text, text
        assert "Bearer" in text, text
        resources = browser.evaluate(
            "performance.getEntriesByType('resource').map(e => e.name).concat([location.href])"
        )
        outside = [url for url in resources if not url.startswith(server.url)]
        assert not outside, f"/docs fetched from outside the service: {outside}"

        browser.navigate(f"{server.url}/redoc")
        sections = "document.querySelectorAll('[data-section-id^=\"operation/\"]').length"
        assert browser.wait_for(f"{sections} >= {expected}", timeout_s=30)
        entries = browser.evaluate(
            "performance.getEntriesByType('resource').map(e => [e.name, e.initiatorType])"
        )
        outside = [(url, kind) for url, kind in entries if not url.startswith(server.url)]
        # ReDoc links its logo on its own CDN; the page's Content-Security-Policy (img-src
        # 'self' data:) keeps the browser from fetching it. Scripts, styles and data: local.
        csp = httpx.get(f"{server.url}/redoc", timeout=10).headers["content-security-policy"]
        assert "img-src 'self' data:;" in csp
        assert all(kind == "img" for _, kind in outside), f"/redoc loads {outside}"
