"""Personal data and the encrypted blocks it travels in.

Names, address, phone, e-mail and dates of birth never appear in clear in an event. They
are serialised to JSON and sealed with AES-256-GCM. Intake's keyring holds one secret per
family; every block is sealed under a key derived from that secret **for one purpose**
(:class:`KeyPurpose`: contact data, children's data, the Art. 9 screening, and one key per
disclosure to one Träger for one referral), so a key released for one purpose opens nothing
else. Erasing a family destroys its secret, so no key of the family can be derived any more
and every copy of every block in every topic, backup and database becomes unreadable at
once (crypto-shredding).

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
from collections.abc import Iterable, Mapping
from datetime import date
from enum import StrEnum
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
    return _json_object(plaintext, "block")


def _json_object(plaintext: bytes, what: str) -> dict[str, Any]:
    """The decrypted plaintext as the JSON object every sealed payload is."""
    try:
        data = json.loads(plaintext)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BlockUnreadable(f"decrypted {what} is not JSON") from exc
    if not isinstance(data, dict):
        raise BlockUnreadable(f"decrypted {what} is not a JSON object")
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


# -- purpose-bound keys ----------------------------------------------------------------------


class KeyPurpose(StrEnum):
    """What a derived key may open. Each purpose has its own key, so releasing one (to a
    service or a Träger) discloses nothing sealed for another."""

    CONTACT = "contact"
    """The ``personal`` block of ``family-registered``: names of the household, address,
    phone, e-mail (:data:`CONTACT_FIELDS`)."""
    CHILDREN = "children"
    """The ``children`` block of ``family-registered``: the children's given names and
    dates of birth (:class:`ChildrenData`)."""
    SCREENING = "screening"
    """The ``screening`` block of ``needs-assessed`` (special-category data, Art. 9 GDPR)."""
    DISCLOSURE = "disclosure"
    """One referral's ``disclosure`` to the one Träger it is addressed to."""


#: The PersonalData fields that are the family's contact data (the ``contact`` purpose).
CONTACT_FIELDS = (
    "family_name",
    "parent_given_names",
    "street",
    "house_number",
    "postcode",
    "city",
    "phone",
    "email",
)
#: The PersonalData fields about the children (the ``children`` purpose).
CHILDREN_FIELDS = ("child_given_names", "child_birth_dates")

_KDF_LABEL = b"lotse.key.v1"


class ChildrenData(BaseModel):
    """The children's identifying data: the plaintext of the ``children`` block."""

    model_config = ConfigDict(frozen=True, use_attribute_docstrings=True)

    child_given_names: list[str] = Field(default_factory=list)
    """Given names of the children; "" for a child not named yet."""
    child_birth_dates: list[date] = Field(default_factory=list)
    """Dates of birth, in the order of ``child_given_names``."""


def split_personal(personal: PersonalData) -> tuple[PersonalData, ChildrenData | None]:
    """The family's data as its two blocks: contact data, and the children's data (None
    when nothing about the children is known)."""
    contact = personal.model_copy(update={"child_given_names": [], "child_birth_dates": []})
    if not personal.child_given_names and not personal.child_birth_dates:
        return contact, None
    return contact, ChildrenData(
        child_given_names=list(personal.child_given_names),
        child_birth_dates=list(personal.child_birth_dates),
    )


def derive_key(
    family_secret: bytes,
    purpose: KeyPurpose,
    *,
    case_id: str,
    referral_id: str | None = None,
    traeger: str | None = None,
) -> bytes:
    """The 256-bit key for one purpose of one family: HKDF-SHA256 (RFC 5869) of the family's
    secret, no salt, info = ``lotse.key.v1`` NUL purpose NUL case id, and for a disclosure
    NUL referral id NUL Träger slug. A disclosure key is therefore bound to one referral and
    one Träger; deriving needs the secret, which never leaves intake's keyring."""
    if len(family_secret) != KEY_BYTES:
        raise ValueError(f"family secret must be {KEY_BYTES} bytes, got {len(family_secret)}")
    parts = [purpose.value, case_id]
    if purpose is KeyPurpose.DISCLOSURE:
        if not referral_id or not traeger:
            raise ValueError("a disclosure key is bound to a referral and a Träger")
        parts += [referral_id, traeger]
    elif referral_id is not None or traeger is not None:
        raise ValueError(f"a {purpose.value} key is not bound to a referral")
    try:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.kdf.hkdf import HKDF
    except ImportError as exc:  # pragma: no cover - depends on the installed extras
        raise ImportError("deriving keys needs the crypto extra") from exc
    info = _KDF_LABEL + b"\x00" + b"\x00".join(p.encode("utf-8") for p in parts)
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(
        family_secret
    )


def purpose_kid(family_kid: str, purpose: KeyPurpose, *, referral_id: str | None = None) -> str:
    """Key id of a derived key: ``<family kid>/<purpose>``, for a disclosure
    ``<family kid>/disclosure/<referral id>``. It names the key, never contains it."""
    if purpose is KeyPurpose.DISCLOSURE:
        if not referral_id:
            raise ValueError("a disclosure kid names its referral")
        return f"{family_kid}/{purpose.value}/{referral_id}"
    return f"{family_kid}/{purpose.value}"


def kid_purpose(kid: str) -> tuple[str, KeyPurpose | None, str | None]:
    """(family kid, purpose, referral id) of a key id; purpose None for a block sealed
    before keys were bound to purposes (under the family secret itself)."""
    family_kid, _, rest = kid.partition("/")
    if not rest:
        return family_kid, None, None
    purpose_text, _, referral_id = rest.partition("/")
    try:
        purpose = KeyPurpose(purpose_text)
    except ValueError:
        raise BlockUnreadable(f"key id {kid!r} names no known purpose") from None
    if (purpose is KeyPurpose.DISCLOSURE) != bool(referral_id):
        raise BlockUnreadable(f"key id {kid!r} is malformed")
    return family_kid, purpose, referral_id or None


# -- JWE compact serialisation (RFC 7516), alg "dir", enc "A256GCM" ---------------------------

_JWE_COMPACT = r"^[A-Za-z0-9_-]+\.\.[A-Za-z0-9_-]{16}\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]{22}$"
#: Pattern of a compact JWE with direct encryption (empty encrypted-key part).
JWE_COMPACT_PATTERN = _JWE_COMPACT


def seal_jwe(
    payload: BaseModel | dict[str, Any],
    *,
    key: bytes,
    kid: str,
    nonce: bytes | None = None,
) -> str:
    """``payload`` as a compact JWE: protected header ``{"alg":"dir","enc":"A256GCM",
    "kid":…,"cty":"json"}``, no encrypted key, 96-bit IV, ciphertext, 128-bit tag. Any JOSE
    library opens it with the 256-bit key and no options. Only registered header parameters
    are used (strict libraries refuse others); the token needs no binding to its case in the
    header because its key is derived for one referral of one case and one Träger."""
    if len(key) != KEY_BYTES:
        raise ValueError(f"key must be {KEY_BYTES} bytes, got {len(key)}")
    if nonce is None:
        nonce = os.urandom(NONCE_BYTES)
    header = {"alg": "dir", "enc": ALG, "kid": kid, "cty": "json"}
    protected = _b64encode(json.dumps(header, separators=(",", ":")).encode("utf-8"))
    data = (
        payload.model_dump(mode="json", exclude_none=True)
        if isinstance(payload, BaseModel)
        else payload
    )
    plaintext = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    sealed = _cipher(key).encrypt(nonce, plaintext.encode("utf-8"), protected.encode("ascii"))
    ciphertext, tag = sealed[:-16], sealed[-16:]
    return ".".join([protected, "", _b64encode(nonce), _b64encode(ciphertext), _b64encode(tag)])


def jwe_header(token: str) -> dict[str, Any]:
    """The (not yet authenticated) protected header of a compact JWE, e.g. for its ``kid``."""
    try:
        header = json.loads(_b64decode(token.split(".", 1)[0]))
    except (binascii.Error, ValueError, UnicodeDecodeError) as exc:
        raise BlockUnreadable("not a compact JWE") from exc
    if not isinstance(header, dict):
        raise BlockUnreadable("JWE header is not a JSON object")
    return header


def open_jwe(token: str, *, key: bytes) -> dict[str, Any]:
    """Decrypt a compact JWE of :func:`seal_jwe` (``dir`` + ``A256GCM``)."""
    parts = token.split(".")
    if len(parts) != 5 or parts[1] != "":
        raise BlockUnreadable("not a compact JWE with direct encryption")
    header = jwe_header(token)
    if header.get("alg") != "dir" or header.get("enc") != ALG:
        raise BlockUnreadable("JWE is not alg dir / enc A256GCM")
    if len(key) != KEY_BYTES:
        raise BlockUnreadable(f"key must be {KEY_BYTES} bytes, got {len(key)}")
    try:
        nonce, ciphertext, tag = (_b64decode(p) for p in parts[2:])
    except (binascii.Error, ValueError) as exc:
        raise BlockUnreadable("JWE parts are not base64url") from exc
    from cryptography.exceptions import InvalidTag

    try:
        plaintext = _cipher(key).decrypt(nonce, ciphertext + tag, parts[0].encode("ascii"))
    except (InvalidTag, ValueError) as exc:
        raise BlockUnreadable(
            f"authentication failed for key {header.get('kid')!r}: wrong key or tampered JWE"
        ) from exc
    return _json_object(plaintext, "JWE")


def example_jwe(payload: BaseModel | dict[str, Any], *, label: str) -> str:
    """A reproducible compact JWE under the public fake :data:`EXAMPLE_KEY`."""
    nonce = hashlib.sha256(label.encode("utf-8")).digest()[:NONCE_BYTES]
    return seal_jwe(payload, key=EXAMPLE_KEY, kid=EXAMPLE_KID, nonce=nonce)


def disclosure_subset(personal: PersonalData, wanted: Iterable[str]) -> dict[str, Any]:
    """What a disclosure carries: the wanted fields the family actually gave (an empty value
    discloses nothing), in PersonalData's field order."""
    plain = personal.model_dump(mode="json", exclude_none=True)
    chosen = set(wanted)
    return {
        name: plain[name]
        for name in PersonalData.model_fields
        if name in chosen and plain.get(name) not in (None, "", [])
    }


def seal_both_envelopes(
    subset: Mapping[str, Any], *, key: bytes, kid: str, case_id: str
) -> tuple[EncryptedBlock, str]:
    """A disclosure in both envelopes under its one key: the EncryptedBlock (``disclosure``)
    and the compact JWE (``disclosure_jwe``)."""
    data = dict(subset)
    return seal(data, key=key, kid=kid, case_id=case_id), seal_jwe(data, key=key, kid=kid)
