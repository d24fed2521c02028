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
from lotse_runtime.embedded import free_port
from lotse_runtime.identity import CallerDep
from lotse_runtime.policy import ALL_ROLES, AccessPolicy, allow
from lotse_runtime.settings import ServiceSettings


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
    policy = AccessPolicy({"GET /whoami": allow(*ALL_ROLES)})
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
            "lotse_runtime.cli",
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
