"""Webhook secrets at rest: sealed with AES-256-GCM under the deployment's secrets key.

A subscription's Standard Webhooks secret must be usable by the worker (it signs with it),
so it cannot be hashed like a password; it is encrypted instead, so that a copy of the
database (a backup, a dump handed to support) does not let anyone forge deliveries. The
sealed form names the key it was sealed with (a short fingerprint, not the key), so the
secrets key can be replaced: the new key seals, the old ones (``secret_old_keys``) still
open, and the periodic housekeeping seals every secret again under the new key, after
which the old key can be dropped. The associated data binds a sealed secret to its
subscription and column: copying one row's sealed secret into another row does not open.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEY_BYTES = 32
_NONCE_BYTES = 12
_FORMAT = "lsk1"
#: Secrets stored before sealing existed are plain ``whsec_…``; housekeeping seals them.
_PLAIN_PREFIX = "whsec_"


class SecretUnreadable(Exception):
    """A stored secret that none of the configured keys opens (wrong key, tampered row)."""


def key_id(key: bytes) -> str:
    """A fingerprint naming a key in the sealed form; reveals nothing usable about the key."""
    return hashlib.sha256(b"lotse-delivery-secrets-key:" + key).hexdigest()[:12]


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def decode_key(value: str, name: str) -> bytes:
    """A secrets key from its base64url text (32 bytes), or ValueError naming the setting."""
    try:
        raw = _unb64(value.strip())
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"{name} must be base64url") from exc
    if len(raw) != KEY_BYTES:
        raise ValueError(f"{name} must decode to {KEY_BYTES} bytes, got {len(raw)}")
    return raw


def encode_key(raw: bytes) -> str:
    return _b64(raw)


@dataclass(frozen=True)
class SecretBox:
    """Seals with ``current``; opens what ``current`` or one of ``older`` sealed."""

    current: bytes
    older: Sequence[bytes] = ()
    _keys: dict[str, bytes] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        keys = {key_id(k): k for k in self.older}
        keys[key_id(self.current)] = self.current
        object.__setattr__(self, "_keys", keys)

    @staticmethod
    def _aad(subscription_id: str, column: str) -> bytes:
        return f"lotse-delivery/{subscription_id}/{column}".encode()

    def seal(self, plain: str, *, subscription_id: str, column: str) -> str:
        nonce = os.urandom(_NONCE_BYTES)
        sealed = AESGCM(self.current).encrypt(
            nonce, plain.encode(), self._aad(subscription_id, column)
        )
        return f"{_FORMAT}.{key_id(self.current)}.{_b64(nonce + sealed)}"

    def open(self, stored: str, *, subscription_id: str, column: str) -> str:
        if stored.startswith(_PLAIN_PREFIX):
            return stored  # from before sealing; housekeeping seals it
        try:
            version, kid, payload = stored.split(".", 2)
            raw = _unb64(payload)
        except (ValueError, binascii.Error):
            raise SecretUnreadable(
                f"{column} of {subscription_id} is not a sealed secret"
            ) from None
        key = self._keys.get(kid)
        if version != _FORMAT or key is None:
            raise SecretUnreadable(
                f"{column} of {subscription_id} was sealed with key {kid}, which is not "
                "configured (secret_key / secret_old_keys)"
            )
        try:
            plain = AESGCM(key).decrypt(
                raw[:_NONCE_BYTES], raw[_NONCE_BYTES:], self._aad(subscription_id, column)
            )
        except InvalidTag:
            raise SecretUnreadable(
                f"{column} of {subscription_id} does not open (altered or moved)"
            ) from None
        return plain.decode()

    def stale(self, stored: str) -> bool:
        """Whether a stored secret should be sealed (again) under the current key."""
        return not stored.startswith(f"{_FORMAT}.{key_id(self.current)}.")
