"""The encrypted personal-data block: sealing, opening, and every way opening must fail."""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import date

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from lotse_contracts.cloudevents import to_kafka_binary
from lotse_contracts.events.intake import FamilyRegistered
from lotse_contracts.personal import (
    ALG,
    EXAMPLE_KEY,
    EXAMPLE_KID,
    KEY_BYTES,
    BlockUnreadable,
    EncryptedBlock,
    PersonalData,
    data_key_for,
    example_block,
    new_data_key,
    open_block,
    open_personal,
    seal,
)

CASE_ID = "3f6c1a9e-8b2d-4c71-9e55-2a7d0f4b8c13"
OTHER_CASE_ID = "0b5f2a7c-1d3e-4f60-8a9b-7c6d5e4f3a21"
KID = "family-3f6c1a9e-key-1"

PERSON = PersonalData(
    family_name="Yılmaz-Schäfer",
    parent_given_names=["Ayşe", "Tobias"],
    child_given_names=["Lina"],
    child_birth_dates=[date(2025, 2, 14)],
    street="Hermannstraße",
    house_number="7b",
    postcode="44263",
    city="Dortmund",
    phone="+49 231 555 0199",
    email="ayse.yilmaz@example.org",
)
#: Every plaintext value that must never show up in a serialised block or event.
SECRETS = [
    "Yılmaz",
    "Schäfer",
    "Ayşe",
    "Tobias",
    "Lina",
    "2025-02-14",
    "Hermannstraße",
    "+49 231 555 0199",
    "555 0199",
    "ayse.yilmaz@example.org",
]


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@pytest.fixture
def key() -> bytes:
    return new_data_key()


@pytest.fixture
def block(key: bytes) -> EncryptedBlock:
    return seal(PERSON, key=key, kid=KID, case_id=CASE_ID)


# --- round trip ------------------------------------------------------------------------------


def test_seal_and_open_round_trip(key: bytes, block: EncryptedBlock) -> None:
    assert open_personal(block, key=key, case_id=CASE_ID) == PERSON
    raw = open_block(block, key=key, case_id=CASE_ID)
    assert raw["family_name"] == "Yılmaz-Schäfer"
    assert raw["child_birth_dates"] == ["2025-02-14"]


def test_round_trip_through_json(key: bytes, block: EncryptedBlock) -> None:
    # What a consumer gets is the block as JSON; it must open the same way.
    copy = EncryptedBlock.model_validate_json(block.model_dump_json())
    assert open_personal(copy, key=key, case_id=CASE_ID) == PERSON


def test_plain_dict_payload(key: bytes) -> None:
    sealed = seal({"support_need": "acute"}, key=key, kid=KID, case_id=CASE_ID)
    assert open_block(sealed, key=key, case_id=CASE_ID) == {"support_need": "acute"}


def test_new_data_keys_are_random_and_256_bit() -> None:
    keys = {new_data_key() for _ in range(8)}
    assert len(keys) == 8
    assert all(len(k) == KEY_BYTES == 32 for k in keys)


# --- the block's shape ----------------------------------------------------------------------


def test_block_carries_the_key_id(block: EncryptedBlock) -> None:
    assert block.kid == KID
    assert block.alg == ALG == "A256GCM"
    assert json.loads(block.model_dump_json())["kid"] == KID


def test_nonce_is_96_bit(block: EncryptedBlock) -> None:
    assert len(_unb64(block.nonce)) == 12


def test_nonce_differs_per_seal(key: bytes) -> None:
    blocks = [seal(PERSON, key=key, kid=KID, case_id=CASE_ID) for _ in range(20)]
    assert len({b.nonce for b in blocks}) == 20
    assert len({b.ciphertext for b in blocks}) == 20


def test_fixed_nonce_is_reproducible(key: bytes) -> None:
    nonce = bytes(range(12))
    first = seal(PERSON, key=key, kid=KID, case_id=CASE_ID, nonce=nonce)
    second = seal(PERSON, key=key, kid=KID, case_id=CASE_ID, nonce=nonce)
    assert first == second
    assert first.nonce == _b64(nonce)


def test_no_plaintext_in_the_serialised_block(block: EncryptedBlock) -> None:
    text = block.model_dump_json()
    for secret in SECRETS:
        assert secret not in text
        assert secret.lower() not in text.lower()
    # Nor a plain encoding of it (base64 of the plaintext JSON would be a fake "seal").
    plaintext = PERSON.model_dump_json(exclude_none=True).encode()
    assert _b64(plaintext)[:24] not in text
    assert set(json.loads(text)) == {"kid", "alg", "nonce", "ciphertext"}


def test_no_plaintext_in_the_published_event() -> None:
    example = FamilyRegistered.example()
    record = to_kafka_binary(example.to_cloudevent())
    wire = (record.value or b"").decode() + repr(record.headers)
    for secret in ("Beispiel", "Elif", "Jonas", "Mira", "Musterweg", "555 0100", "example.org"):
        assert secret not in wire
    # ...and yet it is there, for whoever holds the family's key.
    person = open_personal(example.personal, key=EXAMPLE_KEY, case_id=example.case_id)
    assert person.family_name == "Beispiel"
    assert example.personal.kid == EXAMPLE_KID


def test_example_blocks_are_stable() -> None:
    first = example_block(PERSON, case_id=CASE_ID, label="a")
    assert first == example_block(PERSON, case_id=CASE_ID, label="a")
    assert first.nonce != example_block(PERSON, case_id=CASE_ID, label="b").nonce


# --- opening fails, with a reason -------------------------------------------------------------


def test_wrong_key(block: EncryptedBlock) -> None:
    with pytest.raises(BlockUnreadable) as info:
        open_personal(block, key=new_data_key(), case_id=CASE_ID)
    assert f"authentication failed for key {KID!r}" in info.value.reason


def test_wrong_case_id_is_refused_by_the_aad(key: bytes, block: EncryptedBlock) -> None:
    # A block copied into another family's event does not open, even with the right key.
    with pytest.raises(BlockUnreadable) as info:
        open_block(block, key=key, case_id=OTHER_CASE_ID)
    assert "block of another case" in info.value.reason


def test_tampered_ciphertext(key: bytes, block: EncryptedBlock) -> None:
    raw = bytearray(_unb64(block.ciphertext))
    raw[0] ^= 0x01
    tampered = block.model_copy(update={"ciphertext": _b64(bytes(raw))})
    with pytest.raises(BlockUnreadable) as info:
        open_block(tampered, key=key, case_id=CASE_ID)
    assert "tampered ciphertext" in info.value.reason


def test_tampered_tag(key: bytes, block: EncryptedBlock) -> None:
    raw = bytearray(_unb64(block.ciphertext))
    raw[-1] ^= 0x80
    tampered = block.model_copy(update={"ciphertext": _b64(bytes(raw))})
    with pytest.raises(BlockUnreadable, match="authentication failed"):
        open_block(tampered, key=key, case_id=CASE_ID)


def test_tampered_nonce(key: bytes, block: EncryptedBlock) -> None:
    raw = bytearray(_unb64(block.nonce))
    raw[3] ^= 0x10
    tampered = block.model_copy(update={"nonce": _b64(bytes(raw))})
    with pytest.raises(BlockUnreadable, match="authentication failed"):
        open_block(tampered, key=key, case_id=CASE_ID)


def test_truncated_ciphertext(key: bytes, block: EncryptedBlock) -> None:
    tampered = block.model_copy(update={"ciphertext": block.ciphertext[:-8]})
    with pytest.raises(BlockUnreadable) as info:
        open_block(tampered, key=key, case_id=CASE_ID)
    assert info.value.reason


def test_unknown_kid(key: bytes, block: EncryptedBlock) -> None:
    keyring = {"some-other-family": new_data_key()}
    with pytest.raises(BlockUnreadable) as info:
        data_key_for(block, keyring)
    assert f"no data key {KID!r}" in info.value.reason
    assert "destroyed when the family was erased" in info.value.reason


def test_known_kid_opens(key: bytes, block: EncryptedBlock) -> None:
    keyring = {KID: key, "some-other-family": new_data_key()}
    assert open_personal(block, key=data_key_for(block, keyring), case_id=CASE_ID) == PERSON


def test_erased_family_cannot_be_read(key: bytes, block: EncryptedBlock) -> None:
    keyring = {KID: key}
    del keyring[KID]  # crypto-shredding: the key is destroyed, the block stays
    with pytest.raises(BlockUnreadable, match="no data key"):
        data_key_for(block, keyring)


def test_key_of_wrong_length(block: EncryptedBlock) -> None:
    with pytest.raises(BlockUnreadable, match="key must be 32 bytes, got 16"):
        open_block(block, key=b"k" * 16, case_id=CASE_ID)
    with pytest.raises(ValueError, match="key must be 32 bytes"):
        seal(PERSON, key=b"k" * 16, kid=KID, case_id=CASE_ID)


def test_nonce_of_wrong_length(key: bytes, block: EncryptedBlock) -> None:
    with pytest.raises(ValueError, match="nonce must be 12 bytes"):
        seal(PERSON, key=key, kid=KID, case_id=CASE_ID, nonce=b"short")
    # A 16-character field that decodes to 12 bytes is the only valid shape.
    with pytest.raises(BlockUnreadable, match="nonce or ciphertext is not base64url"):
        open_block(block.model_copy(update={"nonce": "A" * 17}), key=key, case_id=CASE_ID)


def test_not_personal_data_names_fields_not_values(key: bytes) -> None:
    sealed = seal({"family_name": "", "phone": 4923155}, key=key, kid=KID, case_id=CASE_ID)
    with pytest.raises(BlockUnreadable) as info:
        open_personal(sealed, key=key, case_id=CASE_ID)
    assert "not valid PersonalData (family_name, phone)" in info.value.reason
    assert "4923155" not in info.value.reason


def test_block_shape_is_validated() -> None:
    with pytest.raises(ValueError, match="nonce"):
        EncryptedBlock(kid=KID, nonce="not base64!", ciphertext="A" * 40)
    with pytest.raises(ValueError, match="alg"):
        EncryptedBlock.model_validate(
            {"kid": KID, "alg": "none", "nonce": "A" * 16, "ciphertext": "A" * 40}
        )


# --- the documented wire format, checked without the package's own code ------------------------


def test_example_block_opens_with_plain_aes_gcm() -> None:
    # What contracts/README.md tells a partner without Python: key = SHA-256 of a public
    # text, AAD = "lotse.personal.v1" NUL case id, ciphertext = ciphertext || tag.
    key = hashlib.sha256(b"lotse example data key - public, fake, never for real data").digest()
    assert key == EXAMPLE_KEY
    example = FamilyRegistered.example()
    block = example.personal
    aad = b"lotse.personal.v1\x00" + example.case_id.encode()
    plaintext = AESGCM(key).decrypt(_unb64(block.nonce), _unb64(block.ciphertext), aad)
    data = json.loads(plaintext.decode("utf-8"))
    assert data["family_name"] == "Beispiel"
    assert set(data) <= set(PersonalData.model_fields)
