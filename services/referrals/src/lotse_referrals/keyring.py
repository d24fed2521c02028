"""Client for the intake service's keyring: a family's data key, fetched when needed.

The referrals service needs the key for two things only: to open the family's sealed
personal block and re-seal the consented subset as a referral's ``disclosure`` (under the
same family key, so erasing the family in intake shreds the disclosure as well), and to
hand the key of one referral's disclosure to the addressed Träger. Keys are never cached:
after an erasure the keyring answers "gone" and so does this service.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

import httpx
from lotse_contracts.personal import decode_data_key

_log = logging.getLogger(__name__)


class KeyGone(LookupError):
    """The family has no data key (erased, or never registered with intake)."""


class KeyringUnavailable(RuntimeError):
    """The keyring did not answer usefully; try again later."""


class Keyring(Protocol):
    async def data_key(self, case_id: str) -> tuple[str, bytes]:
        """(kid, key) of the family's data key; raises KeyGone or KeyringUnavailable."""
        ...


class HttpKeyring:
    """The intake keyring over HTTP: ``GET <base>/keyring/cases/{case_id}?purpose=...``
    answering ``{"case_id", "kid", "key": <base64url>}``; 404 (no such case) or 410
    (erased) when the family has no key. Intake audits every release with the purpose."""

    PATH = "/keyring/cases/{case_id}"

    def __init__(
        self,
        base_url: str,
        *,
        headers: dict[str, str],
        timeout_s: float = 5.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._headers = headers
        self._timeout = timeout_s
        self._transport = transport

    async def data_key(self, case_id: str) -> tuple[str, bytes]:
        url = self.base_url + self.PATH.format(case_id=case_id)
        params = {"purpose": "referral disclosure to a Träger (§ 65 SGB VIII)"}
        try:
            async with httpx.AsyncClient(
                timeout=self._timeout, transport=self._transport
            ) as client:
                response = await client.get(url, headers=self._headers, params=params)
        except httpx.HTTPError as exc:
            raise KeyringUnavailable(f"keyring not reachable: {type(exc).__name__}") from exc
        if response.status_code in (404, 410):
            raise KeyGone("the family has no data key (erased or unknown)")
        if response.status_code != 200:
            raise KeyringUnavailable(f"keyring answered HTTP {response.status_code}")
        try:
            body = response.json()
            return str(body["kid"]), decode_data_key(str(body["key"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise KeyringUnavailable(f"keyring answer unusable: {exc}") from exc


class StaticKeyring:
    """Keys held in memory: for tests and for running the service without intake."""

    def __init__(self, keys: dict[str, tuple[str, bytes]] | None = None) -> None:
        self.keys: dict[str, tuple[str, bytes]] = dict(keys or {})

    async def data_key(self, case_id: str) -> tuple[str, bytes]:
        try:
            return self.keys[case_id]
        except KeyError:
            raise KeyGone("the family has no data key (erased or unknown)") from None


def service_headers(
    *, token_file: str | None, dev_issuer_key: Path | None, audience: str
) -> dict[str, str]:
    """How this service identifies itself to the keyring, matching the deployment's auth:
    a mounted token, or a token from the local development issuer."""
    if token_file is not None:
        return {"Authorization": f"Bearer {Path(token_file).read_text().strip()}"}
    if dev_issuer_key is not None:
        from datetime import timedelta

        from lotse_runtime.auth import DevelopmentIssuer

        issuer = DevelopmentIssuer(dev_issuer_key, audience=audience)
        token = issuer.token(role="service", subject="referrals", ttl=timedelta(days=365))
        return {"Authorization": f"Bearer {token}"}
    _log.warning("no credentials for the keyring: requests will be refused")
    return {}
