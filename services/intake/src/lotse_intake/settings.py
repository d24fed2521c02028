"""Settings of the intake service (env: LOTSE_INTAKE_<FIELD>, then LOTSE_<FIELD>)."""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import secrets
from dataclasses import dataclass
from typing import ClassVar

from lotse_runtime.settings import ServiceSettings
from pydantic import Field, SecretStr, field_validator

_log = logging.getLogger(__name__)

SECRET_BYTES = 32
DEV_SECRETS_FILE = "intake-secrets.json"


@dataclass(frozen=True)
class IntakeSecrets:
    """The two secrets intake works with, as raw bytes."""

    key_encryption_key: bytes
    """Wraps every family data key at rest (envelope encryption)."""
    match_key_secret: bytes
    """HMAC key for the duplicate guard's match keys and for request fingerprints."""


def _decode_secret(value: str, name: str) -> bytes:
    try:
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"{name} must be base64url") from exc
    if len(raw) != SECRET_BYTES:
        raise ValueError(f"{name} must decode to {SECRET_BYTES} bytes, got {len(raw)}")
    return raw


def _encode_secret(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


class IntakeSettings(ServiceSettings):
    service_name: ClassVar[str] = "intake"

    http_port: int = Field(default=8001, ge=0, le=65535, description="Port of the HTTP API.")
    key_encryption_key: SecretStr | None = Field(
        default=None,
        description=(
            "Key encryption key (32 bytes, base64url) wrapping every family's data key at rest. "
            "Unset: a development key is generated in data_dir/intake-secrets.json. Losing it "
            "makes every stored family unreadable; mount it from a Secret in production."
        ),
    )
    match_key_secret: SecretStr | None = Field(
        default=None,
        description=(
            "HMAC secret (32 bytes, base64url) of the duplicate guard: only keyed hashes of "
            "name + birth date + address are stored. Changing it makes earlier registrations "
            "invisible to the guard. Unset: generated like key_encryption_key."
        ),
    )
    keyring_clients: list[str] = Field(
        default_factory=lambda: ["visits", "referrals"],
        description=(
            "Subjects of the services (role 'service') that may obtain a family's data key. "
            "Reporting is left out on purpose: it sees anonymised data only."
        ),
    )
    idempotency_ttl_hours: int = Field(
        default=24,
        ge=1,
        le=24 * 30,
        description="How long an Idempotency-Key is remembered (its first response replayed).",
    )
    retention_days: int | None = Field(
        default=None,
        ge=1,
        description=(
            "Erase a family (reason retention_expired) this many days after registration; "
            "unset: no automatic erasure."
        ),
    )
    housekeeping_interval_s: float = Field(
        default=3600.0,
        gt=0,
        description="How often expired Idempotency-Keys and expired families are purged.",
    )
    retention_erased_case_days: int | None = Field(
        default=1095,
        ge=1,
        description="Days after an erasure until the family's tombstone (no personal data) "
        "and what hangs on it are deleted; unset: kept for good.",
    )
    clinic_max_child_age_days: int = Field(
        default=365,
        ge=1,
        le=6 * 366,
        description=(
            "A Babylotse registers families around a birth: a child older than this is "
            "refused on the clinic channel (catches mistyped birth years)."
        ),
    )

    @field_validator("key_encryption_key", "match_key_secret")
    @classmethod
    def _secret_well_formed(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            _decode_secret(value.get_secret_value(), "secret")
        return value

    def secrets(self) -> IntakeSecrets:
        """The configured secrets; unset ones come from (or go to) a development file."""
        kek = self.key_encryption_key
        match = self.match_key_secret
        if kek is not None and match is not None:
            return IntakeSecrets(
                key_encryption_key=_decode_secret(kek.get_secret_value(), "key_encryption_key"),
                match_key_secret=_decode_secret(match.get_secret_value(), "match_key_secret"),
            )
        stored = self._development_secrets()
        return IntakeSecrets(
            key_encryption_key=(
                _decode_secret(kek.get_secret_value(), "key_encryption_key")
                if kek is not None
                else stored["key_encryption_key"]
            ),
            match_key_secret=(
                _decode_secret(match.get_secret_value(), "match_key_secret")
                if match is not None
                else stored["match_key_secret"]
            ),
        )

    def _development_secrets(self) -> dict[str, bytes]:
        path = self.data_dir / DEV_SECRETS_FILE
        if not path.exists():
            _log.warning(
                "intake secrets not configured: generating development secrets",
                extra={"path": str(path)},
            )
            path.parent.mkdir(parents=True, exist_ok=True)
            content = {
                name: _encode_secret(secrets.token_bytes(SECRET_BYTES))
                for name in ("key_encryption_key", "match_key_secret")
            }
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                pass  # another process of this deployment was faster: use its file
            else:
                with os.fdopen(fd, "w") as handle:
                    json.dump(content, handle)
        loaded = json.loads(path.read_text())
        return {name: _decode_secret(loaded[name], name) for name in loaded}
