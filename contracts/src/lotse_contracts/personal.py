"""Personal data and the encrypted block it travels in.

Names, address, phone, e-mail and dates of birth never appear in clear in an event. They
are serialised to JSON and sealed with AES-256-GCM under the family's own data key (one key
per family, held by the intake service's keyring). Erasing a family destroys that key, so
every copy of the block in every topic, backup and database becomes unreadable at once
(crypto-shredding).

The additional authenticated data (AAD) binds a block to its case id: a block copied into
another family's event does not open. The AAD is derived, not stored.

Sealing and opening need the optional ``cryptography`` dependency
(``lotse-contracts[crypto]``); it is imported inside the functions so that reading the
clear fields of an event needs nothing but pydantic.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import secrets
from collections.abc import Mapping
from datetime import date
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

ALG: Literal["A256GCM"] = "A256GCM"
KEY_BYTES = 32
NONCE_BYTES = 12
_AAD_PREFIX = b"lotse.personal.v1\x00"
_BASE64URL = r"^[A-Za-z0-9_-]+$"

#: The key of the committed example events. It is public and fake: derived from a fixed
#: string so that regenerated examples are byte-identical. Never use it for real data.
EXAMPLE_KEY = hashlib.sha256(b"lotse example data key - public, fake, never for real data").digest()
#: Key id of :data:`EXAMPLE_KEY`.
EXAMPLE_KID = "example-public-fake-key"


class BlockUnreadable(ValueError):
    """An encrypted block cannot be opened; ``reason`` says why (never what it contains)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class PersonalData(BaseModel):
    """Identifying data of a family: the plaintext of the ``personal`` block.

    Only ``family_name`` is required; a Babylotse (baby pilot in a birth clinic) or the
    citizens' office fills in what it has.
    """

    model_config = ConfigDict(frozen=True, use_attribute_docstrings=True)

    family_name: str = Field(min_length=1, max_length=200)
    """Family name of the household."""
    parent_given_names: list[str] = Field(default_factory=list)
    """Given names of the parents or guardians."""
    child_given_names: list[str] = Field(default_factory=list)
    """Given names of the children the case is about."""
    child_birth_dates: list[date] = Field(default_factory=list)
    """Dates of birth of the children, in the order of ``child_given_names``."""
    street: str | None = None
    """Street of the home address."""
    house_number: str | None = None
    """House number, including any letter suffix."""
    postcode: str | None = None
    """Postcode (PLZ) of the home address."""
    city: str | None = None
    """City of the home address."""
    phone: str | None = None
    """Phone number for arranging the welcome visit."""
    email: str | None = None
    """E-mail address."""


class EncryptedBlock(BaseModel):
    """Data sealed with AES-256-GCM under the family's data key (JWE-like, compact).

    The AAD is ``"lotse.personal.v1" NUL case_id``; it is not stored, so the block only
    opens in the context of the case it belongs to.
    """

    model_config = ConfigDict(frozen=True, use_attribute_docstrings=True)

    kid: str = Field(min_length=1, max_length=128)
    """Id of the family's data key in the keyring."""
    alg: Literal["A256GCM"] = ALG
    """Content encryption algorithm: AES-256 in Galois/Counter Mode."""
    nonce: str = Field(pattern=_BASE64URL, min_length=16, max_length=16)
    """The 96-bit nonce, base64url without padding."""
    ciphertext: str = Field(pattern=_BASE64URL, min_length=22)
    """Ciphertext followed by the 128-bit authentication tag, base64url without padding."""


def _b64encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def encode_data_key(key: bytes) -> str:
    """A family's data key as it travels (keyring answers, Träger disclosure keys):
    base64url without padding."""
    return _b64encode(key)


def decode_data_key(text: str) -> bytes:
    """A data key from its travelling form (padding optional); raises ValueError."""
    try:
        raw = _b64decode(text)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("key is not base64url") from exc
    if len(raw) != KEY_BYTES:
        raise ValueError(f"key must be {KEY_BYTES} bytes, got {len(raw)}")
    return raw


def _aad(case_id: str) -> bytes:
    return _AAD_PREFIX + case_id.encode("utf-8")


def _cipher(key: bytes) -> AESGCM:
    try:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    except ImportError as exc:  # pragma: no cover - depends on the installed extras
        raise ImportError(
            "sealing or opening personal data needs the crypto extra: "
            "pip install 'lotse-contracts[crypto]'"
        ) from exc
    return AESGCM(key)


def new_data_key() -> bytes:
    """A fresh random 256-bit data key for one family."""
    return secrets.token_bytes(KEY_BYTES)


def seal(
    payload: BaseModel | dict[str, Any],
    *,
    key: bytes,
    kid: str,
    case_id: str,
    nonce: bytes | None = None,
) -> EncryptedBlock:
    """Encrypt ``payload`` (as compact JSON) for the case ``case_id``.

    ``nonce`` is for reproducible examples and tests only; production code leaves it out so
    that every block gets a fresh random nonce (a repeated nonce under one key breaks GCM).
    """
    if len(key) != KEY_BYTES:
        raise ValueError(f"key must be {KEY_BYTES} bytes, got {len(key)}")
    if nonce is None:
        nonce = os.urandom(NONCE_BYTES)
    if len(nonce) != NONCE_BYTES:
        raise ValueError(f"nonce must be {NONCE_BYTES} bytes, got {len(nonce)}")
    data = (
        payload.model_dump(mode="json", exclude_none=True)
        if isinstance(payload, BaseModel)
        else payload
    )
    plaintext = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    ciphertext = _cipher(key).encrypt(nonce, plaintext.encode("utf-8"), _aad(case_id))
    return EncryptedBlock(kid=kid, nonce=_b64encode(nonce), ciphertext=_b64encode(ciphertext))


def data_key_for(block: EncryptedBlock, keys: Mapping[str, bytes]) -> bytes:
    """The data key a block was sealed with, looked up by its ``kid`` in ``keys``.

    Raises :class:`BlockUnreadable` when the keyring has no such key: it never existed
    here, or it was destroyed when the family was erased (crypto-shredding). Either way
    the block cannot be opened, and the caller must treat its content as gone.
    """
    try:
        return keys[block.kid]
    except KeyError:
        raise BlockUnreadable(
            f"no data key {block.kid!r} in the keyring: unknown, or destroyed when the "
            "family was erased"
        ) from None


def open_block(block: EncryptedBlock, *, key: bytes, case_id: str) -> dict[str, Any]:
    """Decrypt a block of the case ``case_id`` and return its JSON object.

    Raises :class:`BlockUnreadable` for a wrong or destroyed key, a block of another case,
    or tampered bytes. GCM cannot tell these apart, and the message does not pretend to.
    """
    if len(key) != KEY_BYTES:
        raise BlockUnreadable(f"key must be {KEY_BYTES} bytes, got {len(key)}")
    try:
        nonce = _b64decode(block.nonce)
        ciphertext = _b64decode(block.ciphertext)
    except (binascii.Error, ValueError) as exc:
        raise BlockUnreadable("nonce or ciphertext is not base64url") from exc
    if len(nonce) != NONCE_BYTES:
        raise BlockUnreadable(f"nonce must be {NONCE_BYTES} bytes, got {len(nonce)}")
    cipher = _cipher(key)
    from cryptography.exceptions import InvalidTag

    try:
        plaintext = cipher.decrypt(nonce, ciphertext, _aad(case_id))
    except InvalidTag as exc:
        raise BlockUnreadable(
            f"authentication failed for key {block.kid!r}: "
            "wrong key, block of another case, or tampered ciphertext"
        ) from exc
    try:
        data = json.loads(plaintext)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BlockUnreadable("decrypted block is not JSON") from exc
    if not isinstance(data, dict):
        raise BlockUnreadable("decrypted block is not a JSON object")
    return data


def open_personal(block: EncryptedBlock, *, key: bytes, case_id: str) -> PersonalData:
    """Decrypt a ``personal`` block into :class:`PersonalData`."""
    data = open_block(block, key=key, case_id=case_id)
    try:
        return PersonalData.model_validate(data)
    except ValidationError as exc:
        fields = ", ".join(".".join(str(p) for p in e["loc"]) for e in exc.errors())
        # Only field names, never values: the values are the personal data.
        raise BlockUnreadable(f"decrypted block is not valid PersonalData ({fields})") from exc


def example_block(
    payload: BaseModel | dict[str, Any], *, case_id: str, label: str
) -> EncryptedBlock:
    """A reproducible block under the public fake :data:`EXAMPLE_KEY`, for example events.

    The nonce is derived from ``label`` so that each example has its own nonce and the
    committed example files do not change when regenerated.
    """
    nonce = hashlib.sha256(label.encode("utf-8")).digest()[:NONCE_BYTES]
    return seal(payload, key=EXAMPLE_KEY, kid=EXAMPLE_KID, case_id=case_id, nonce=nonce)
