"""The contract documents, served by every service where its events' ``dataschema`` points.

An event names the JSON Schema of its data as ``<contracts base URL>/schemas/<type>.json``
(``ServiceSettings.contracts_base``). So that a partner can resolve that URI with nothing but
an HTTP client, every service answers, below the path of the base URL:

* ``GET <path>/schemas/<type>.json``: the event's JSON Schema (``application/schema+json``);
* ``GET <path>/asyncapi.json``: the AsyncAPI document (its ``$ref: ./schemas/...`` resolve
  against it to the URIs above);
* ``GET <path>/examples/<type>.json``: the example payload.

The bytes are those ``python -m lotse_contracts.schemagen`` writes into ``contracts/`` (the
same function renders them here, and the ``--check`` gate keeps the committed files equal to
it), so the running service needs no source tree. Read-only (GET and HEAD), public like
``/docs``: they describe the contract and hold no data. Rendered once, on first request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

#: Media type of a JSON Schema document (JSON Schema 2020-12, section 14).
SCHEMA_MEDIA_TYPE = "application/schema+json"
JSON_MEDIA_TYPE = "application/json"
#: Documents change only with a new release of the service.
CACHE_CONTROL = "public, max-age=3600"


class ContractDocuments:
    """The generated contract files by their path below the contracts root."""

    def __init__(self) -> None:
        self._files: dict[str, bytes] | None = None
        self._lock = asyncio.Lock()

    async def files(self) -> dict[str, bytes]:
        async with self._lock:
            if self._files is None:
                # A few hundred milliseconds of rendering, once: off the event loop.
                rendered = await asyncio.to_thread(_render)
                self._files = {path: text.encode("utf-8") for path, text in rendered.items()}
        return self._files


def _render() -> dict[str, str]:
    from lotse_contracts.schemagen import generate

    return generate()


def base_path(base_url: str) -> str:
    """The path of the contracts base URL, without a trailing slash ("" for the root)."""
    return urlsplit(base_url).path.rstrip("/")


def serve_contract_documents(app: FastAPI, base_url: str) -> None:
    """Add the read-only, public contract routes below ``base_url``'s path to ``app``."""
    documents = ContractDocuments()
    root = base_path(base_url)

    def serve(folder: str | None) -> Callable[[Request], Awaitable[Response]]:
        async def document(request: Request) -> Response:
            name = str(request.path_params.get("name", "asyncapi.json"))
            relative = f"{folder}/{name}" if folder else name
            body = (await documents.files()).get(relative)
            if body is None:
                reason = f"{relative} is not a contract document of this version"
                return JSONResponse(
                    {
                        "detail": "no such contract document",
                        "errors": [{"field": "name", "reason": reason}],
                    },
                    status_code=404,
                )
            media = SCHEMA_MEDIA_TYPE if folder == "schemas" else JSON_MEDIA_TYPE
            return Response(body, media_type=media, headers={"Cache-Control": CACHE_CONTROL})

        return document

    routes = {
        f"{root}/schemas/{{name}}": serve("schemas"),
        f"{root}/examples/{{name}}": serve("examples"),
        f"{root}/asyncapi.json": serve(None),
    }
    for path, endpoint in routes.items():
        app.router.routes.append(
            Route(path, endpoint, methods=["GET", "HEAD"], include_in_schema=False)
        )
    # Public by design, like the API docs (lotse_runtime.policy.docs_paths).
    app.state.contract_docs_paths = set(routes)
