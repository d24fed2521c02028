"""The API documentation pages (Swagger UI at ``/docs``, ReDoc at ``/redoc``) without the
internet: their scripts and styles come from the ``fastapi-offline`` package (Swagger UI 5 and
ReDoc 2, in its ``static/`` folder) and are served by the service itself under
``/docs-assets``, instead of FastAPI's default CDN links. On a closed network (a municipal data
centre) the pages work all the same. No data is behind any of these routes: like ``/docs`` they
are public (:func:`lotse_runtime.policy.docs_paths`).
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from starlette.routing import Route
from starlette.staticfiles import StaticFiles

#: Where the Swagger UI and ReDoc assets are served.
ASSETS_URL = "/docs-assets"
ASSETS = Path(str(files("fastapi_offline") / "static"))
_FILES = ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js", "favicon.png")
#: The pages may load nothing from elsewhere (ReDoc, for one, links a logo on its CDN): a
#: closed network behaves like an open one. Inline script and style: FastAPI's page templates.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; font-src 'self' data:; worker-src 'self' blob:; "
    "connect-src 'self'; frame-ancestors 'none'"
)


def serve_docs_offline(app: FastAPI) -> None:
    """Point ``app``'s /docs and /redoc at assets served by the app itself."""
    missing = [name for name in _FILES if not (ASSETS / name).is_file()]
    if missing:
        raise RuntimeError(f"fastapi-offline lacks {missing} in {ASSETS}")
    app.state.docs_assets_url = ASSETS_URL
    app.mount(ASSETS_URL, StaticFiles(directory=ASSETS), name="docs-assets")

    def root(request: Request) -> str:
        return str(request.scope.get("root_path", "")).rstrip("/")

    def assets(request: Request) -> str:
        return root(request) + ASSETS_URL

    def openapi_url(request: Request) -> str:
        return root(request) + (app.openapi_url or "")

    async def swagger_ui(request: Request) -> HTMLResponse:
        oauth2_redirect = app.swagger_ui_oauth2_redirect_url
        page = get_swagger_ui_html(
            openapi_url=openapi_url(request),
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{assets(request)}/swagger-ui-bundle.js",
            swagger_css_url=f"{assets(request)}/swagger-ui.css",
            swagger_favicon_url=f"{assets(request)}/favicon.png",
            oauth2_redirect_url=root(request) + oauth2_redirect if oauth2_redirect else None,
            init_oauth=app.swagger_ui_init_oauth,
            swagger_ui_parameters=app.swagger_ui_parameters,
        )
        page.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
        return page

    async def redoc(request: Request) -> HTMLResponse:
        page = get_redoc_html(
            openapi_url=openapi_url(request),
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{assets(request)}/redoc.standalone.js",
            redoc_favicon_url=f"{assets(request)}/favicon.png",
            with_google_fonts=False,
        )
        page.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
        return page

    pages = {app.docs_url: swagger_ui, app.redoc_url: redoc}
    for index, route in enumerate(app.router.routes):
        if isinstance(route, Route) and route.path in pages:
            app.router.routes[index] = Route(
                route.path, pages[route.path], methods=["GET", "HEAD"], include_in_schema=False
            )
