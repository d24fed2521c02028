"""Client for the intake service's keyring: sealed disclosures and their keys, asked for
when needed.

The referrals service holds no key of a family and never sees its personal data in clear.
It asks intake to seal a referral's disclosure (the consented fields, under a key bound to
that referral and that Träger), and, when the addressed Träger asks for it, for that one
disclosure key. Intake checks the consent at both steps; keys are never cached here, so
after a withdrawal or an erasure the keyring's refusal is this service's answer too.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import aiohttp
from lotse_contracts.events.referrals import PersonalField
from lotse_contracts.personal import (
    EncryptedBlock,
    KeyPurpose,
    PersonalData,
    decode_data_key,
    derive_key,
    disclosure_subset,
    purpose_kid,
    seal_both_envelopes,
)
from pydantic import BaseModel, ValidationError

_log = logging.getLogger(__name__)


class KeyGone(LookupError):
    """The family has no keys (erased, or never registered with intake)."""


class KeyRefused(PermissionError):
    """The keyring refuses: the consent does not (or no longer) cover the Träger."""


class KeyringUnavailable(RuntimeError):
    """The keyring did not answer usefully; try again later."""


class SealedDisclosure(BaseModel):
    """A referral's disclosure as intake sealed it (empty when the family gave none of the
    fields)."""

    kid: str | None
    disclosed_fields: list[PersonalField]
    disclosure: EncryptedBlock | None = None
    disclosure_jwe: str | None = None


@dataclass(frozen=True)
class DisclosureFor:
    """Which disclosure: one referral of one case to one Träger, on one consent."""

    case_id: str
    referral_id: str
    traeger: str
    consent_id: str


class Keyring(Protocol):
    async def seal_disclosure(
        self, which: DisclosureFor, fields: Sequence[PersonalField]
    ) -> SealedDisclosure:
        """Raises KeyGone, KeyRefused or KeyringUnavailable."""
        ...

    async def disclosure_key(self, which: DisclosureFor) -> tuple[str, bytes]:
        """(kid, key) of the disclosure; raises KeyGone, KeyRefused or KeyringUnavailable."""
        ...


#: How long an idle connection to the keyring is kept for the next call.
KEEPALIVE_S = 4.0


class HttpKeyring:
    """The intake keyring over HTTP (``/keyring/cases/{case_id}/disclosures``): 404 (no such
    case) or 410 (erased) mean gone, 409 a consent that does not cover the Träger.

    One aiohttp session for the service's life (a TLS context per request cost ~27 ms of
    CPU), made at first use in the event loop that runs it. aiohttp rather than httpx: on
    this machine a call cost ~0.08 ms of the caller's CPU with aiohttp and ~0.6 ms with
    httpx, whose client layer and pure-Python HTTP parser were a tenth of the referrals
    service's CPU in ``bench/pipeline.py``."""

    def __init__(self, base_url: str, *, headers: dict[str, str], timeout_s: float = 5.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._headers = headers
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # Idle connections are dropped before intake's server would close them (uvicorn:
            # after 5 s), so a request is never sent on a connection being closed.
            connector = aiohttp.TCPConnector(keepalive_timeout=KEEPALIVE_S)
            self._session = aiohttp.ClientSession(
                connector=connector, headers=self._headers, timeout=self._timeout
            )
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def _call(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, str] | None = None,
        payload: object = None,
    ) -> bytes:
        """The body of a 200 answer; every other outcome as the exception it means."""
        try:
            # No redirects (aiohttp would follow them with the service's token): the keyring
            # answers itself or not at all.
            async with self._client().request(
                method, self.base_url + path, params=params, json=payload, allow_redirects=False
            ) as response:
                status, body = response.status, await response.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise KeyringUnavailable(f"keyring not reachable: {type(exc).__name__}") from exc
        if status in (404, 410):
            raise KeyGone("the family has no keys (erased or unknown)")
        if status == 409:
            raise KeyRefused(_detail(status, body))
        if status != 200:
            raise KeyringUnavailable(f"keyring answered HTTP {status}")
        return body

    async def seal_disclosure(
        self, which: DisclosureFor, fields: Sequence[PersonalField]
    ) -> SealedDisclosure:
        body = await self._call(
            "POST",
            f"/keyring/cases/{which.case_id}/disclosures",
            payload={
                "referral_id": which.referral_id,
                "traeger": which.traeger,
                "consent_id": which.consent_id,
                "fields": [f.value for f in fields],
            },
        )
        try:
            return SealedDisclosure.model_validate_json(body)
        except ValidationError as exc:
            raise KeyringUnavailable(
                f"keyring answer unusable: {exc.error_count()} errors"
            ) from exc

    async def disclosure_key(self, which: DisclosureFor) -> tuple[str, bytes]:
        body = await self._call(
            "GET",
            f"/keyring/cases/{which.case_id}/disclosures/{which.referral_id}/key",
            params={"traeger": which.traeger, "consent_id": which.consent_id},
        )
        try:
            answer = json.loads(body)
            return str(answer["kid"]), decode_data_key(str(answer["key"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise KeyringUnavailable(f"keyring answer unusable: {exc}") from exc


def _detail(status: int, body: bytes) -> str:
    try:
        detail = json.loads(body).get("detail")
    except (ValueError, AttributeError):
        detail = None
    return str(detail or f"keyring refused (HTTP {status})")


@dataclass
class StaticFamily:
    """A family as the in-memory keyring knows it: its secret and its data."""

    kid: str
    secret: bytes
    personal: PersonalData
    traeger_consents: dict[str, str] = field(default_factory=dict)
    """consent id → the Träger it names (only given ones)."""


class StaticKeyring:
    """Intake's keyring semantics held in memory: for tests and for running the service
    without intake. Seals and derives exactly as intake does."""

    def __init__(self) -> None:
        self.families: dict[str, StaticFamily] = {}

    def _family(self, which: DisclosureFor) -> StaticFamily:
        family = self.families.get(which.case_id)
        if family is None:
            raise KeyGone("the family has no keys (erased or unknown)")
        if family.traeger_consents.get(which.consent_id) != which.traeger:
            raise KeyRefused(f"the consent does not name the Träger {which.traeger}")
        return family

    def _key(self, family: StaticFamily, which: DisclosureFor) -> tuple[str, bytes]:
        key = derive_key(
            family.secret,
            KeyPurpose.DISCLOSURE,
            case_id=which.case_id,
            referral_id=which.referral_id,
            traeger=which.traeger,
        )
        kid = purpose_kid(family.kid, KeyPurpose.DISCLOSURE, referral_id=which.referral_id)
        return kid, key

    async def seal_disclosure(
        self, which: DisclosureFor, fields: Sequence[PersonalField]
    ) -> SealedDisclosure:
        family = self._family(which)
        subset = disclosure_subset(family.personal, (f.value for f in fields))
        if not subset:
            return SealedDisclosure(kid=None, disclosed_fields=[])
        kid, key = self._key(family, which)
        block, jwe = seal_both_envelopes(subset, key=key, kid=kid, case_id=which.case_id)
        return SealedDisclosure(
            kid=kid,
            disclosed_fields=[PersonalField(name) for name in subset],
            disclosure=block,
            disclosure_jwe=jwe,
        )

    async def disclosure_key(self, which: DisclosureFor) -> tuple[str, bytes]:
        return self._key(self._family(which), which)


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
