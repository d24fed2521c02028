"""Purpose-bound keys and the JWE envelope partners open: a key derived for one purpose
(contact, children, screening, one disclosure to one Träger) opens nothing sealed for
another, and the disclosure opens with an off-the-shelf JOSE library."""

from __future__ import annotations

import base64
import json
from datetime import date

import pytest
from joserfc import jwe
from joserfc.errors import JoseError
from joserfc.jwk import OctKey
from lotse_contracts.events.referrals import ReferralRequested
from lotse_contracts.personal import (
    EXAMPLE_KEY,
    BlockUnreadable,
    ChildrenData,
    KeyPurpose,
    PersonalData,
    derive_key,
    jwe_header,
    kid_purpose,
    new_data_key,
    open_block,
    open_jwe,
    purpose_kid,
    seal,
    seal_jwe,
    split_personal,
)

from examples.partner_client import open_disclosure

CASE = "3f6c1a9e-8b2d-4c71-9e55-2a7d0f4b8c13"
REFERRAL = "8d1f0c7e-2b4a-4e63-9f10-5a6b7c8d9e0f"
OTHER_REFERRAL = "9e2f1d8f-3c5b-4f74-8a21-6b7c8d9e0f1a"
TRAEGER = "hebammenzentrum-dortmund"
SECRET = bytes(range(32))
PERSON = PersonalData(
    family_name="Yılmaz-Schäfer",
    parent_given_names=["Ayşe"],
    child_given_names=["Lina"],
    child_birth_dates=[date(2025, 2, 14)],
    phone="+49 231 555 0101",
)


def every_key() -> dict[str, bytes]:
    keys = {
        p.value: derive_key(SECRET, p, case_id=CASE) for p in KeyPurpose if p.value != "disclosure"
    }
    keys["disclosure"] = derive_key(
        SECRET, KeyPurpose.DISCLOSURE, case_id=CASE, referral_id=REFERRAL, traeger=TRAEGER
    )
    keys["other referral"] = derive_key(
        SECRET, KeyPurpose.DISCLOSURE, case_id=CASE, referral_id=OTHER_REFERRAL, traeger=TRAEGER
    )
    keys["other Träger"] = derive_key(
        SECRET, KeyPurpose.DISCLOSURE, case_id=CASE, referral_id=REFERRAL, traeger="awo"
    )
    keys["other case"] = derive_key(SECRET, KeyPurpose.CONTACT, case_id=REFERRAL)
    keys["family secret"] = SECRET
    return keys


def test_every_purpose_has_its_own_key_and_each_opens_only_its_blocks() -> None:
    keys = every_key()
    assert len(set(keys.values())) == len(keys)
    contact, children = split_personal(PERSON)
    assert children == ChildrenData(
        child_given_names=["Lina"], child_birth_dates=[date(2025, 2, 14)]
    )
    assert (contact.child_given_names, contact.child_birth_dates) == ([], [])
    blocks = {
        "contact": seal(contact, key=keys["contact"], kid="fk-1/contact", case_id=CASE),
        "children": seal(children, key=keys["children"], kid="fk-1/children", case_id=CASE),
        "screening": seal({"support_need": "acute"}, key=keys["screening"], kid="s", case_id=CASE),
        "disclosure": seal({"phone": "x"}, key=keys["disclosure"], kid="d", case_id=CASE),
    }
    for block_purpose, block in blocks.items():
        for key_name, key in keys.items():
            if key_name == block_purpose:
                open_block(block, key=key, case_id=CASE)
            else:
                with pytest.raises(BlockUnreadable):
                    open_block(block, key=key, case_id=CASE)


def test_derivation_is_fixed_so_intake_and_its_records_agree() -> None:
    # HKDF-SHA256, info "lotse.key.v1" NUL purpose NUL case [NUL referral NUL Träger]: a
    # change here would make every stored block unreadable, so the value is pinned.
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    info = b"lotse.key.v1\x00disclosure\x00" + f"{CASE}\x00{REFERRAL}\x00{TRAEGER}".encode()
    expected = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(SECRET)
    assert (
        derive_key(
            SECRET, KeyPurpose.DISCLOSURE, case_id=CASE, referral_id=REFERRAL, traeger=TRAEGER
        )
        == expected
    )


@pytest.mark.parametrize(
    ("purpose", "referral_id", "traeger"),
    [
        (KeyPurpose.DISCLOSURE, None, TRAEGER),
        (KeyPurpose.DISCLOSURE, REFERRAL, None),
        (KeyPurpose.CONTACT, REFERRAL, None),
        (KeyPurpose.SCREENING, None, TRAEGER),
    ],
)
def test_a_disclosure_key_is_bound_to_a_referral_and_a_traeger_and_only_it(
    purpose: KeyPurpose, referral_id: str | None, traeger: str | None
) -> None:
    with pytest.raises(ValueError, match="bound"):
        derive_key(SECRET, purpose, case_id=CASE, referral_id=referral_id, traeger=traeger)


def test_key_ids_name_family_purpose_and_referral() -> None:
    assert purpose_kid("fk-1", KeyPurpose.CONTACT) == "fk-1/contact"
    disclosure = purpose_kid("fk-1", KeyPurpose.DISCLOSURE, referral_id=REFERRAL)
    assert kid_purpose(disclosure) == ("fk-1", KeyPurpose.DISCLOSURE, REFERRAL)
    assert kid_purpose("fk-1") == ("fk-1", None, None)  # sealed before purposes existed
    for broken in ("fk-1/unknown", "fk-1/disclosure", "fk-1/contact/" + REFERRAL):
        with pytest.raises(BlockUnreadable):
            kid_purpose(broken)
    assert len(disclosure.replace("fk-1", "fk-" + "0" * 32)) <= 128  # fits EncryptedBlock.kid


def test_the_jwe_opens_with_an_off_the_shelf_jose_library() -> None:
    key = new_data_key()
    kid = purpose_kid("fk-1", KeyPurpose.DISCLOSURE, referral_id=REFERRAL)
    token = seal_jwe({"family_name": "Yılmaz-Schäfer", "phone": "+49 231"}, key=key, kid=kid)
    assert token.count(".") == 4
    assert token.split(".")[1] == ""  # compact, dir: no encrypted-key part
    decrypted = jwe.decrypt_compact(token, OctKey.import_key(key))
    assert decrypted.protected == {"alg": "dir", "enc": "A256GCM", "kid": kid, "cty": "json"}
    assert json.loads(decrypted.plaintext or b"") == {
        "family_name": "Yılmaz-Schäfer",
        "phone": "+49 231",
    }
    assert jwe_header(token)["kid"] == kid
    # And the other way round: what a JOSE library seals, open_jwe opens.
    foreign = jwe.encrypt_compact(
        {"alg": "dir", "enc": "A256GCM", "kid": kid}, b'{"phone":"1"}', OctKey.import_key(key)
    )
    assert open_jwe(foreign, key=key) == {"phone": "1"}


def test_a_jwe_refuses_the_wrong_key_and_tampering() -> None:
    key = new_data_key()
    token = seal_jwe({"phone": "1"}, key=key, kid="fk-1/disclosure/" + REFERRAL)
    with pytest.raises(BlockUnreadable):
        open_jwe(token, key=new_data_key())
    with pytest.raises(JoseError):
        jwe.decrypt_compact(token, OctKey.import_key(new_data_key()))
    protected, _, iv, ciphertext, tag = token.split(".")
    header = json.loads(base64.urlsafe_b64decode(protected + "=="))
    header["kid"] = "fk-1/contact"
    swapped = base64.urlsafe_b64encode(json.dumps(header).encode()).rstrip(b"=").decode()
    for broken in (
        ".".join([swapped, "", iv, ciphertext, tag]),  # the header is authenticated
        ".".join([protected, "", iv, ciphertext[:-2] + "AA", tag]),
        token.replace("..", ".x."),
        "not-a-jwe",
    ):
        with pytest.raises(BlockUnreadable):
            open_jwe(broken, key=key)


def test_the_example_partner_client_opens_both_envelopes() -> None:
    example = ReferralRequested.example()
    assert example.disclosure_jwe is not None
    from_jwe = open_disclosure(example, EXAMPLE_KEY)
    older = example.model_copy(update={"disclosure_jwe": None})
    assert open_disclosure(older, EXAMPLE_KEY) == from_jwe
    assert from_jwe["family_name"] == "Beispiel"
    with pytest.raises(BlockUnreadable):
        open_disclosure(example, new_data_key())
