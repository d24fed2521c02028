"""The keyring client: what the intake keyring's answers mean to the referrals service."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest
import uvicorn
from aiohttp import web
from aiohttp.test_utils import TestServer
from lotse_contracts.events.referrals import PersonalField
from lotse_contracts.personal import encode_data_key, new_data_key
from lotse_referrals import keyring as keyring_module
from lotse_referrals.keyring import (
    DisclosureFor,
    HttpKeyring,
    KeyGone,
    KeyRefused,
    KeyringUnavailable,
    service_headers,
)
from lotse_tooling.embedded import free_port

CASE = "3f6c1a9e-8b2d-4c71-9e55-2a7d0f4b8c13"
REFERRAL = "8d1f0c7e-2b4a-4e63-9f10-5a6b7c8d9e0f"
CONSENT = "0a9b8c7d-6e5f-4a3b-8c2d-1e0f9a8b7c6d"
WHICH = DisclosureFor(CASE, REFERRAL, "hebammenzentrum-dortmund", CONSENT)


@dataclass
class Seen:
    """A request as the keyring server received it."""

    method: str
    path: str
    query: dict[str, str]
    authorization: str | None
    body: bytes


Answer = Callable[[web.Request], web.StreamResponse]


@asynccontextmanager
async def keyring(answer: Answer) -> AsyncIterator[tuple[HttpKeyring, list[Seen]]]:
    """The client against a real HTTP server on this host answering with ``answer``."""
    seen: list[Seen] = []

    async def handle(request: web.Request) -> web.StreamResponse:
        seen.append(
            Seen(
                request.method,
                request.path,
                dict(request.query),
                request.headers.get("Authorization"),
                await request.read(),
            )
        )
        return answer(request)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    async with TestServer(app) as server:
        client = HttpKeyring(
            str(server.make_url("/")), headers={"Authorization": "Bearer t"}, timeout_s=2
        )
        try:
            yield client, seen
        finally:
            await client.aclose()


def reply(status: int, body: object) -> Answer:
    return lambda _request: web.json_response(body, status=status)


async def test_a_released_disclosure_key_names_referral_traeger_and_consent() -> None:
    key = new_data_key()
    kid = f"fk-1/disclosure/{REFERRAL}"
    answer = {"case_id": CASE, "kid": kid, "purpose": "disclosure", "key": encode_data_key(key)}
    async with keyring(reply(200, answer)) as (client, seen):
        assert await client.disclosure_key(WHICH) == (kid, key)
    assert seen[0].method == "GET"
    assert seen[0].path == f"/keyring/cases/{CASE}/disclosures/{REFERRAL}/key"
    assert seen[0].query == {"traeger": "hebammenzentrum-dortmund", "consent_id": CONSENT}
    assert seen[0].authorization == "Bearer t"


async def test_a_disclosure_is_sealed_by_intake_and_only_the_fields_are_sent() -> None:
    async with keyring(reply(200, {"kid": None, "disclosed_fields": []})) as (client, seen):
        sealed = await client.seal_disclosure(
            WHICH, [PersonalField.FAMILY_NAME, PersonalField.PHONE]
        )
    assert sealed.disclosure is None
    assert seen[0].method == "POST"
    assert seen[0].path == f"/keyring/cases/{CASE}/disclosures"
    assert json.loads(seen[0].body) == {
        "referral_id": REFERRAL,
        "traeger": "hebammenzentrum-dortmund",
        "consent_id": CONSENT,
        "fields": ["family_name", "phone"],
    }


@pytest.mark.parametrize("status", [404, 410])
async def test_no_key_means_gone(status: int) -> None:
    async with keyring(reply(status, {"detail": "erased"})) as (client, _seen):
        with pytest.raises(KeyGone):
            await client.disclosure_key(WHICH)


async def test_a_consent_that_does_not_cover_the_traeger_is_a_refusal() -> None:
    async with keyring(reply(409, {"detail": "the consent was withdrawn"})) as (client, _seen):
        with pytest.raises(KeyRefused, match="withdrawn"):
            await client.disclosure_key(WHICH)


@pytest.mark.parametrize(
    "answer",
    [
        reply(503, {"detail": "down"}),
        reply(403, {"detail": "not permitted"}),
        reply(200, {"kid": "fk-1", "key": "too-short"}),
        lambda _request: web.Response(text="not json"),
    ],
    ids=["503", "403", "short key", "not json"],
)
async def test_unusable_answers_mean_try_again(answer: Answer) -> None:
    async with keyring(answer) as (client, _seen):
        with pytest.raises(KeyringUnavailable):
            await client.disclosure_key(WHICH)


async def test_a_redirect_is_not_followed_with_the_services_token() -> None:
    def redirect(request: web.Request) -> web.StreamResponse:
        if request.path == "/elsewhere":
            return web.json_response({"kid": "fk-1", "key": encode_data_key(new_data_key())})
        raise web.HTTPFound("/elsewhere")

    async with keyring(redirect) as (client, seen):
        with pytest.raises(KeyringUnavailable, match="HTTP 302"):
            await client.disclosure_key(WHICH)
    assert [request.path for request in seen] == [
        f"/keyring/cases/{CASE}/disclosures/{REFERRAL}/key"
    ]


async def test_an_idle_connection_is_dropped_before_the_server_would_close_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two calls in a row share a connection; after the keep-alive, the next one opens its own
    (intake's uvicorn closes idle connections after 5 s: reusing one it is closing fails)."""
    # Below the keep-alive of the server intake runs under (the launcher's uvicorn).
    assert (
        uvicorn.Config("lotse_intake.app:create_app").timeout_keep_alive
        > keyring_module.KEEPALIVE_S
    )
    monkeypatch.setattr(keyring_module, "KEEPALIVE_S", 0.2)
    ports: list[int] = []

    def answer(request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        ports.append(request.transport.get_extra_info("peername")[1])
        return web.json_response({"kid": "fk-1", "key": encode_data_key(new_data_key())})

    async with keyring(answer) as (client, _seen):
        await client.disclosure_key(WHICH)
        await client.disclosure_key(WHICH)
        await asyncio.sleep(0.6)
        await client.disclosure_key(WHICH)
    assert ports[0] == ports[1] != ports[2]


async def test_an_unreachable_keyring_means_try_again() -> None:
    client = HttpKeyring(f"http://127.0.0.1:{free_port()}", headers={}, timeout_s=2)
    try:
        with pytest.raises(KeyringUnavailable, match="not reachable"):
            await client.disclosure_key(WHICH)
    finally:
        await client.aclose()


async def test_a_keyring_that_does_not_answer_in_time_means_try_again() -> None:
    async def slow(_request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(5)
        return web.json_response({})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", slow)
    async with TestServer(app) as server:
        client = HttpKeyring(str(server.make_url("/")), headers={}, timeout_s=0.2)
        try:
            with pytest.raises(KeyringUnavailable, match=r"not reachable: .*Timeout"):
                await client.disclosure_key(WHICH)
        finally:
            await client.aclose()


def test_the_service_identifies_itself_as_intake_expects(tmp_path: object) -> None:
    from pathlib import Path

    assert service_headers(token_file=None, dev_issuer_key=None, audience="lotse") == {}
    folder = Path(str(tmp_path))
    token_file = folder / "token"
    token_file.write_text("abc.def.ghi\n")
    assert service_headers(token_file=str(token_file), dev_issuer_key=None, audience="lotse") == {
        "Authorization": "Bearer abc.def.ghi"
    }
    signed = service_headers(token_file=None, dev_issuer_key=folder / "dev.pem", audience="lotse")
    assert signed["Authorization"].startswith("Bearer ey")
