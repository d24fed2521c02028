"""The keyring client: what the intake keyring's answers mean to the referrals service."""

from __future__ import annotations

import json

import httpx
import pytest
from lotse_contracts.events.referrals import PersonalField
from lotse_contracts.personal import encode_data_key, new_data_key
from lotse_referrals.keyring import (
    DisclosureFor,
    HttpKeyring,
    KeyGone,
    KeyRefused,
    KeyringUnavailable,
    service_headers,
)

CASE = "3f6c1a9e-8b2d-4c71-9e55-2a7d0f4b8c13"
REFERRAL = "8d1f0c7e-2b4a-4e63-9f10-5a6b7c8d9e0f"
CONSENT = "0a9b8c7d-6e5f-4a3b-8c2d-1e0f9a8b7c6d"
WHICH = DisclosureFor(CASE, REFERRAL, "hebammenzentrum-dortmund", CONSENT)


def keyring(handler: httpx.MockTransport) -> HttpKeyring:
    return HttpKeyring(
        "http://intake:8001/", headers={"Authorization": "Bearer t"}, transport=handler
    )


async def test_a_released_disclosure_key_names_referral_traeger_and_consent() -> None:
    key = new_data_key()
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        kid = f"fk-1/disclosure/{REFERRAL}"
        return httpx.Response(
            200,
            json={
                "case_id": CASE,
                "kid": kid,
                "purpose": "disclosure",
                "key": encode_data_key(key),
            },
        )

    assert await keyring(httpx.MockTransport(answer)).disclosure_key(WHICH) == (
        f"fk-1/disclosure/{REFERRAL}",
        key,
    )
    assert seen[0].url.path == f"/keyring/cases/{CASE}/disclosures/{REFERRAL}/key"
    assert seen[0].url.params["traeger"] == "hebammenzentrum-dortmund"
    assert seen[0].url.params["consent_id"] == CONSENT
    assert seen[0].headers["Authorization"] == "Bearer t"


async def test_a_disclosure_is_sealed_by_intake_and_only_the_fields_are_sent() -> None:
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"kid": None, "disclosed_fields": []})

    sealed = await keyring(httpx.MockTransport(answer)).seal_disclosure(
        WHICH, [PersonalField.FAMILY_NAME, PersonalField.PHONE]
    )
    assert sealed.disclosure is None
    assert seen[0].method == "POST"
    assert seen[0].url.path == f"/keyring/cases/{CASE}/disclosures"
    assert json.loads(seen[0].content) == {
        "referral_id": REFERRAL,
        "traeger": "hebammenzentrum-dortmund",
        "consent_id": CONSENT,
        "fields": ["family_name", "phone"],
    }


@pytest.mark.parametrize("status", [404, 410])
async def test_no_key_means_gone(status: int) -> None:
    transport = httpx.MockTransport(lambda _r: httpx.Response(status, json={"detail": "erased"}))
    with pytest.raises(KeyGone):
        await keyring(transport).disclosure_key(WHICH)


async def test_a_consent_that_does_not_cover_the_traeger_is_a_refusal() -> None:
    transport = httpx.MockTransport(
        lambda _r: httpx.Response(409, json={"detail": "the consent was withdrawn"})
    )
    with pytest.raises(KeyRefused, match="withdrawn"):
        await keyring(transport).disclosure_key(WHICH)


@pytest.mark.parametrize(
    "response",
    [
        httpx.Response(503, json={"detail": "down"}),
        httpx.Response(403, json={"detail": "not permitted"}),
        httpx.Response(200, json={"kid": "fk-1", "key": "too-short"}),
        httpx.Response(200, text="not json"),
    ],
)
async def test_unusable_answers_mean_try_again(response: httpx.Response) -> None:
    with pytest.raises(KeyringUnavailable):
        await keyring(httpx.MockTransport(lambda _r: response)).disclosure_key(WHICH)


async def test_an_unreachable_keyring_means_try_again() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    with pytest.raises(KeyringUnavailable, match="not reachable"):
        await keyring(httpx.MockTransport(refuse)).disclosure_key(WHICH)


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
