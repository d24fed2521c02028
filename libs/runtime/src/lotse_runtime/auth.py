"""Bearer-token authentication: OAuth2/OIDC access tokens (JWT) verified against an issuer's keys.

`JwtCallerResolver` is the production `CallerResolver`: it verifies signature (keys from a
JWKS file or URL), issuer, audience and expiry, and maps Lotse's claims to a `Caller`:

    sub            pseudonymous user id
    lotse_role     one of identity.Role
    lotse_bezirk   Stadtbezirk slug (Familienbüro, Bezirksteam)
    lotse_traeger  Träger slug (Träger staff)
    lotse_clinic   clinic slug (Babylotse)

For the embedded set-up, `DevelopmentIssuer` is a local issuer: it keeps an EC P-256 key in
the data directory, serves as the JWKS source, and signs tokens for a chosen role
(`lotse token --role familienbuero --bezirk hoerde`). It is an issuer like any other, so the
verification path is the same one production uses.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from fastapi import Request
from jwt import PyJWK, PyJWKClient, PyJWKSet
from pydantic import ValidationError

from lotse_runtime.identity import Caller, NotAuthenticated

ALGORITHMS = ["ES256", "RS256", "PS256"]
DEV_ISSUER = "urn:lotse:development-issuer"
DEFAULT_AUDIENCE = "lotse"


class IssuerUnavailable(RuntimeError):
    """The issuer's signing keys could not be fetched: the token may well be valid, so the
    answer is 503 (try again), not 401."""


class JwksSource:
    """Signing keys of an issuer: a JWKS document inline, on disk or at a URL (cached)."""

    def __init__(
        self, location: str | Path | dict[str, Any], *, refresh_cooldown_s: float = 30.0
    ) -> None:
        """``refresh_cooldown_s``: a token naming an unknown key makes the URL source fetch
        the set again (the issuer rotated its key), at most once in that many seconds, so
        tokens with made-up key ids cannot make the service hammer the issuer."""
        self._client: PyJWKClient | None = None
        self._keys: PyJWKSet | None = None
        if isinstance(location, dict):
            self._keys = PyJWKSet.from_dict(location)
        elif str(location).lstrip().startswith("{"):
            # Inline, as a ConfigMap value: public keys are not secret.
            self._keys = PyJWKSet.from_dict(json.loads(str(location)))
        elif str(location).startswith(("http://", "https://")):
            self._client = PyJWKClient(
                str(location),
                cache_keys=True,
                lifespan=300,
                cooldown_duration=refresh_cooldown_s,
            )
        else:
            self._keys = PyJWKSet.from_dict(json.loads(Path(location).read_text()))

    async def key_for(self, token: str) -> PyJWK:
        if self._client is not None:
            # The client fetches (and refetches for an unknown kid) with blocking urllib.
            try:
                return await asyncio.to_thread(self._client.get_signing_key_from_jwt, token)
            except jwt.PyJWKClientConnectionError as exc:
                raise IssuerUnavailable(str(exc)) from None
        assert self._keys is not None
        kid = jwt.get_unverified_header(token).get("kid")
        for key in self._keys.keys:
            if kid is None or key.key_id == kid:
                return key
        raise jwt.InvalidTokenError("no key with this kid")


#: How many verified tokens a resolver remembers, and for how long at most (a key the issuer
#: withdrew stops a remembered token within this time, as the URL source refetches its keys
#: after as long).
VERIFIED_TOKENS = 1024
VERIFIED_FOR_S = 300.0


class JwtCallerResolver:
    """Resolves the caller from an `Authorization: Bearer <JWT>` header.

    A token seen and verified before (the same string, byte for byte) is answered from memory
    for :data:`VERIFIED_FOR_S`, and refused once it expired: a client sends one token with many
    requests, and verifying its signature again each time is most of what authentication
    costs. Only verified tokens are remembered, so a token with another signature or other
    claims is a different string and verified in full."""

    def __init__(
        self,
        *,
        keys: JwksSource,
        issuer: str,
        audience: str = DEFAULT_AUDIENCE,
        leeway_s: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.keys = keys
        self.issuer = issuer
        self.audience = audience
        self.leeway_s = leeway_s
        self._clock = clock
        # token -> (caller, when it expires, when its signature is to be verified again)
        self._verified: dict[str, tuple[Caller, float, float]] = {}

    async def resolve(self, request: Request) -> Caller:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise NotAuthenticated("missing bearer token")
        token = token.strip()
        remembered = self._verified.get(token)
        if remembered is not None:
            caller, expires, verify_again = remembered
            now = self._clock()
            if now > expires:
                del self._verified[token]
                raise NotAuthenticated("token expired")
            if now <= verify_again:
                return caller
            del self._verified[token]
        caller, claims = await self._verify(token)
        # exp is required and was checked: past exp + leeway PyJWT calls a token expired.
        expires = float(claims["exp"]) + self.leeway_s
        if len(self._verified) >= VERIFIED_TOKENS:
            del self._verified[next(iter(self._verified))]  # the oldest remembered
        self._verified[token] = (caller, expires, self._clock() + VERIFIED_FOR_S)
        return caller

    async def _verify(self, token: str) -> tuple[Caller, dict[str, Any]]:
        try:
            key = await self.keys.key_for(token)
            claims: dict[str, Any] = jwt.decode(
                token,
                key=key,
                algorithms=ALGORITHMS,
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway_s,
                options={"require": ["exp", "iat", "sub", "iss", "aud"]},
            )
        except jwt.ExpiredSignatureError:
            raise NotAuthenticated("token expired") from None
        except jwt.InvalidAudienceError:
            raise NotAuthenticated("token is not meant for this service") from None
        except jwt.InvalidIssuerError:
            raise NotAuthenticated("token from an unknown issuer") from None
        except jwt.InvalidSignatureError:
            raise NotAuthenticated("token signature invalid") from None
        except (jwt.PyJWTError, ValueError):
            raise NotAuthenticated("invalid token") from None
        try:
            caller = Caller(
                subject=claims["sub"],
                role=claims.get("lotse_role"),
                bezirk=claims.get("lotse_bezirk"),
                traeger=claims.get("lotse_traeger"),
                clinic=claims.get("lotse_clinic"),
            )
            return caller, claims
        except ValidationError:
            raise NotAuthenticated("token lacks a valid Lotse role or scope") from None


class DevelopmentIssuer:
    """A local token issuer for the embedded set-up and tests (EC P-256, ES256)."""

    def __init__(
        self, key_file: Path, *, issuer: str = DEV_ISSUER, audience: str = DEFAULT_AUDIENCE
    ) -> None:
        self.key_file = key_file
        self.issuer = issuer
        self.audience = audience
        self._key = self._load_or_create(key_file)
        public = self._key.public_key()
        self._jwk: dict[str, Any] = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(public))
        self.kid = self._jwk["kid"] = _thumbprint(self._jwk)
        self._jwk.update(use="sig", alg="ES256")

    @staticmethod
    def _load_or_create(path: Path) -> ec.EllipticCurvePrivateKey:
        if path.exists():
            loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
            if not isinstance(loaded, ec.EllipticCurvePrivateKey):
                raise ValueError(f"{path} does not hold an EC private key")
            return loaded
        key = ec.generate_private_key(ec.SECP256R1())
        path.parent.mkdir(parents=True, exist_ok=True)
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        # Write to a private temporary file, then link it into place: a process starting at
        # the same moment either wins or loads the winner's complete key.
        scratch = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
        fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(pem)
        try:
            os.link(scratch, path)
        except FileExistsError:
            return DevelopmentIssuer._load_or_create(path)
        finally:
            scratch.unlink()
        return key

    def jwks(self) -> dict[str, Any]:
        return {"keys": [dict(self._jwk)]}

    def resolver(self) -> JwtCallerResolver:
        return JwtCallerResolver(
            keys=JwksSource(self.jwks()), issuer=self.issuer, audience=self.audience
        )

    def token(
        self,
        *,
        role: str,
        subject: str,
        bezirk: str | None = None,
        traeger: str | None = None,
        clinic: str | None = None,
        ttl: timedelta = timedelta(hours=8),
        now: datetime | None = None,
        audience: str | None = None,
    ) -> str:
        issued = now or datetime.now(UTC)
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "aud": audience or self.audience,
            "sub": subject,
            "iat": issued,
            "exp": issued + ttl,
            "jti": str(uuid.uuid4()),
            "lotse_role": role,
        }
        for name, value in (("bezirk", bezirk), ("traeger", traeger), ("clinic", clinic)):
            if value is not None:
                claims[f"lotse_{name}"] = value
        return jwt.encode(claims, self._key, algorithm="ES256", headers={"kid": self.kid})


def _thumbprint(jwk: dict[str, Any]) -> str:
    """RFC 7638 thumbprint of an EC public key, base64url without padding."""
    import base64
    import hashlib

    canonical = json.dumps(
        {k: jwk[k] for k in ("crv", "kty", "x", "y")}, separators=(",", ":"), sort_keys=True
    )
    digest = hashlib.sha256(canonical.encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
