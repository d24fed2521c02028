"""The keyring client: what the intake keyring's answers mean to the referrals service."""

from __future__ import annotations

import httpx
import pytest
from lotse_contracts.personal import encode_data_key, new_data_key
from lotse_referrals.keyring import (
    HttpKeyring,
    KeyGone,
    KeyringUnavailable,
    service_headers,
)

CASE = "3f6c1a9e-8b2d-4c71-9e55-2a7d0f4b8c13"


def keyring(handler: httpx.MockTransport) -> HttpKeyring:
    return HttpKeyring(
        "http://intake:8001/", headers={"Authorization": "Bearer t"}, transport=handler
    )


async def test_a_released_key_is_decoded_and_the_purpose_is_named() -> None:
    key = new_data_key()
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(
            200, json={"case_id": CASE, "kid": "fk-1", "key": encode_data_key(key)}
        )

    assert await keyring(httpx.MockTransport(answer)).data_key(CASE) == ("fk-1", key)
    assert seen[0].url.path == f"/keyring/cases/{CASE}"
    assert "65 SGB VIII" in seen[0].url.params["purpose"]
    assert seen[0].headers["Authorization"] == "Bearer t"


@pytest.mark.parametrize("status", [404, 410])
async def test_no_key_means_gone(status: int) -> None:
    transport = httpx.MockTransport(lambda _r: httpx.Response(status, json={"detail": "erased"}))
    with pytest.raises(KeyGone):
        await keyring(transport).data_key(CASE)


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
        await keyring(httpx.MockTransport(lambda _r: response)).data_key(CASE)


async def test_an_unreachable_keyring_means_try_again() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    with pytest.raises(KeyringUnavailable, match="not reachable"):
        await keyring(httpx.MockTransport(refuse)).data_key(CASE)


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
