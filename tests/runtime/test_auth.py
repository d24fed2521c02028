"""Bearer tokens: valid ones become callers; expired, wrongly signed, wrong-audience, foreign
issuer and missing tokens get 401 — through a real app, as every route sees them."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import ClassVar

import pytest
from fastapi import APIRouter
from fastapi.testclient import TestClient
from lotse_runtime.app import create_service_app
from lotse_runtime.auth import DEV_ISSUER, DevelopmentIssuer, JwksSource, JwtCallerResolver
from lotse_runtime.identity import CallerDep
from lotse_runtime.policy import PERSON_ROLES, AccessPolicy, allow
from lotse_runtime.settings import ServiceSettings
from lotse_tooling.embedded import free_port


class ProbeSettings(ServiceSettings):
    service_name: ClassVar[str] = "probe"


@pytest.fixture
def issuer(tmp_path: Path) -> DevelopmentIssuer:
    return DevelopmentIssuer(tmp_path / "dev-issuer-key.pem")


@pytest.fixture
def client(tmp_path: Path, issuer: DevelopmentIssuer) -> TestClient:
    router = APIRouter()

    @router.get("/whoami")
    async def whoami(caller: CallerDep) -> dict[str, str | None]:
        return {"subject": caller.subject, "role": caller.role, "bezirk": caller.bezirk}

    settings = ProbeSettings(
        kafka_bootstrap=f"127.0.0.1:{free_port()}",
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'p.db'}",
        data_dir=tmp_path,
        auth_jwks=None,  # the development issuer in data_dir, not the test run's
    )
    policy = AccessPolicy({"GET /whoami": allow(*PERSON_ROLES)})
    return TestClient(
        create_service_app(settings, title="p", description="", routers=[router], policy=policy)
    )


def forged(signer: DevelopmentIssuer, victim: DevelopmentIssuer) -> str:
    """A token naming the victim's key id but signed with another key."""
    import jwt
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(signer.key_file.read_bytes(), password=None)
    claims = jwt.decode(
        signer.token(role="analyst", subject="a"), options={"verify_signature": False}
    )
    return jwt.encode(claims, key, algorithm="ES256", headers={"kid": victim.kid})  # type: ignore[arg-type]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_valid_token_resolves_the_caller(client: TestClient, issuer: DevelopmentIssuer) -> None:
    token = issuer.token(role="familienbuero", subject="fb-7", bezirk="hoerde")
    response = client.get("/whoami", headers=bearer(token))
    assert response.status_code == 200
    assert response.json() == {"subject": "fb-7", "role": "familienbuero", "bezirk": "hoerde"}


def test_bad_tokens_get_401_with_a_reason(
    client: TestClient, issuer: DevelopmentIssuer, tmp_path: Path
) -> None:
    stranger = DevelopmentIssuer(tmp_path / "other" / "key.pem")  # same issuer name, other key
    long_ago = datetime.now(UTC) - timedelta(days=2)
    cases = {
        "missing bearer token": {},
        "token expired": bearer(
            issuer.token(role="analyst", subject="a", now=long_ago, ttl=timedelta(hours=1))
        ),
        "token signature invalid": bearer(forged(stranger, issuer)),
        "token is not meant for this service": bearer(
            issuer.token(role="analyst", subject="a", audience="someone-else")
        ),
        "token lacks a valid Lotse role or scope": bearer(
            issuer.token(role="familienbuero", subject="a")  # no Bezirk
        ),
        "invalid token": bearer("not.a.jwt"),
    }
    for reason, headers in cases.items():
        response = client.get("/whoami", headers=headers)
        assert response.status_code == 401, reason
        assert response.json()["detail"] == reason
        assert response.headers["www-authenticate"].startswith("Bearer")


def test_token_from_a_foreign_issuer_is_refused(issuer: DevelopmentIssuer, tmp_path: Path) -> None:
    import asyncio

    from starlette.requests import Request

    resolver = JwtCallerResolver(
        keys=JwksSource(issuer.jwks()), issuer="https://idp.example.org", audience="lotse"
    )
    token = issuer.token(role="analyst", subject="a")
    scope = {
        "type": "http",
        "headers": [(b"authorization", f"Bearer {token}".encode())],
        "method": "GET",
        "path": "/",
    }
    with pytest.raises(Exception, match="unknown issuer"):
        asyncio.run(resolver.resolve(Request(scope)))
    assert issuer.issuer == DEV_ISSUER


def test_jwks_file_is_a_key_source(issuer: DevelopmentIssuer, tmp_path: Path) -> None:
    import json

    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(issuer.jwks()))
    source = JwksSource(path)
    token = issuer.token(role="analyst", subject="a")
    import asyncio

    key = asyncio.run(source.key_for(token))
    assert key.key_id == issuer.kid


def test_cli_prints_a_token_the_services_accept(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "lotse_tooling.cli",
            "token",
            "--role",
            "bezirksteam",
            "--bezirk",
            "eving",
            "--subject",
            "bt-1",
        ],
        env={"LOTSE_DATA_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    )
    token = result.stdout.strip()
    issuer = DevelopmentIssuer(tmp_path / "dev-issuer-key.pem")  # the same key, loaded again
    import jwt

    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["lotse_role"] == "bezirksteam"
    assert claims["lotse_bezirk"] == "eving"
    assert jwt.get_unverified_header(token)["kid"] == issuer.kid


class JwksServer:
    """The issuer's JWKS endpoint: a real local HTTP server publishing ``jwks``."""

    def __init__(self, jwks: dict[str, object]) -> None:
        import json
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.jwks = jwks
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = json.dumps(server.jwks).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_: object) -> None:
                pass

        self._http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._http.server_address[1]}/jwks.json"
        threading.Thread(target=self._http.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self._http.shutdown()
        self._http.server_close()


def app_trusting(jwks_url: str, tmp_path: Path) -> TestClient:
    router = APIRouter()

    @router.get("/whoami")
    async def whoami(caller: CallerDep) -> dict[str, str | None]:
        return {"subject": caller.subject}

    settings = ProbeSettings(
        kafka_bootstrap=f"127.0.0.1:{free_port()}",
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'p.db'}",
        auth_jwks=jwks_url,
        auth_issuer=DEV_ISSUER,
    )
    policy = AccessPolicy({"GET /whoami": allow(*PERSON_ROLES)})
    return TestClient(
        create_service_app(settings, title="p", description="", routers=[router], policy=policy)
    )


def test_keys_from_the_issuers_jwks_url(issuer: DevelopmentIssuer, tmp_path: Path) -> None:
    server = JwksServer(issuer.jwks())
    stranger = DevelopmentIssuer(tmp_path / "stranger.pem")
    try:
        with app_trusting(server.url, tmp_path) as client:
            ok = client.get("/whoami", headers=bearer(issuer.token(role="analyst", subject="a")))
            foreign = client.get(
                "/whoami", headers=bearer(stranger.token(role="analyst", subject="a"))
            )
            server.stop()
            cached = client.get(
                "/whoami", headers=bearer(issuer.token(role="analyst", subject="b"))
            )
    finally:
        server.stop()
    assert ok.status_code == 200
    assert foreign.status_code == 401
    assert cached.status_code == 200  # a cached key needs no issuer


def test_an_unreachable_issuer_is_503_not_401(issuer: DevelopmentIssuer, tmp_path: Path) -> None:
    """The token may well be valid: the client is told to retry, not that it is refused."""
    with app_trusting(f"http://127.0.0.1:{free_port()}/jwks.json", tmp_path) as client:
        answer = client.get("/whoami", headers=bearer(issuer.token(role="analyst", subject="a")))
    assert answer.status_code == 503
    assert answer.headers["Retry-After"] == "1"


def test_a_rotated_key_is_fetched_when_a_token_names_it(tmp_path: Path) -> None:
    import asyncio

    old, new = (DevelopmentIssuer(tmp_path / f"{name}.pem") for name in ("old", "new"))
    server = JwksServer(old.jwks())
    try:
        source = JwksSource(server.url, refresh_cooldown_s=0)
        assert asyncio.run(source.key_for(old.token(role="analyst", subject="a"))).key_id == old.kid
        server.jwks = new.jwks()  # the issuer rotated its key
        assert asyncio.run(source.key_for(new.token(role="analyst", subject="a"))).key_id == new.kid
    finally:
        server.stop()


class _CountingKeys(JwksSource):
    """The issuer's keys, counting how often a signature needed one (a full verification)."""

    def __init__(self, jwks: dict[str, object]) -> None:
        super().__init__(jwks)
        self.lookups = 0

    async def key_for(self, token: str) -> object:  # type: ignore[override]
        self.lookups += 1
        return await super().key_for(token)


def _request(token: str) -> object:
    from starlette.requests import Request

    scope = {
        "type": "http",
        "headers": [(b"authorization", f"Bearer {token}".encode())],
        "method": "GET",
        "path": "/",
    }
    return Request(scope)


def test_a_verified_token_is_remembered_until_it_expires(issuer: DevelopmentIssuer) -> None:
    import asyncio
    import time

    from lotse_runtime.auth import VERIFIED_FOR_S
    from lotse_runtime.identity import NotAuthenticated

    now = [time.time()]
    keys = _CountingKeys(issuer.jwks())
    resolver = JwtCallerResolver(
        keys=keys, issuer=issuer.issuer, audience=issuer.audience, clock=lambda: now[0]
    )
    token = issuer.token(
        role="familienbuero", subject="fb", bezirk="hoerde", ttl=timedelta(hours=1)
    )

    async def resolve(token: str) -> str:
        caller = await resolver.resolve(_request(token))  # type: ignore[arg-type]
        return caller.subject

    assert asyncio.run(resolve(token)) == "fb"
    assert asyncio.run(resolve(token)) == "fb"
    assert keys.lookups == 1  # the second request was answered without verifying again

    # Another signature over the same claims is another string: verified, and refused.
    head, body, signature = token.split(".")
    tampered = f"{head}.{body}.{signature[:-4]}AAAA"
    with pytest.raises(NotAuthenticated):
        asyncio.run(resolve(tampered))
    assert keys.lookups == 2

    # After VERIFIED_FOR_S the signature is verified again (a withdrawn key stops it).
    now[0] += VERIFIED_FOR_S + 1
    assert asyncio.run(resolve(token)) == "fb"
    assert keys.lookups == 3

    # Past its expiry (and the leeway) a remembered token is refused like any expired one.
    now[0] += 3600 + resolver.leeway_s
    with pytest.raises(NotAuthenticated, match="token expired"):
        asyncio.run(resolve(token))
