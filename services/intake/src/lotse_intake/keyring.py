"""The keyring: one secret per family, keys derived from it per purpose, for crypto-shredding.

A family's secret never leaves this service. Every block is sealed under a key derived from
it for one purpose (``lotse_contracts.personal.KeyPurpose``: contact data, children's data,
the Art. 9 screening, one disclosure to one Träger), so a key released for one purpose opens
nothing else of the family. The secret is stored wrapped (AES-256-GCM under the service's
key encryption key, bound to the case id), so a copy of the table alone opens nothing.
Erasure deletes the secret row: from then on no key of the family can be derived and no
block of it opens anywhere.

Who may obtain which key is :data:`RELEASES`; the use cases in ``releases.py`` enforce it
and audit every release.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from lotse_contracts.personal import (
    BlockUnreadable,
    EncryptedBlock,
    KeyPurpose,
    decode_data_key,
    derive_key,
    encode_data_key,
    kid_purpose,
    new_data_key,
    open_block,
    purpose_kid,
    seal,
)
from lotse_runtime.db import add_at_commit
from pydantic import BaseModel
from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from lotse_intake.tables import IntakeDataKey

#: Key id of the key encryption key; a rotated KEK gets a new one.
KEK_ID = "intake-kek-1"

#: Which Lotse service may obtain which purpose's key directly (the subject of its service
#: token). Visits may read the contact data a welcome visit needs. Referrals gets no family
#: key at all: intake seals each disclosure itself and releases only that referral's
#: disclosure key, for the addressed Träger (``/keyring/cases/{case_id}/disclosures``).
#: Reporting gets nothing: it sees anonymised data only.
RELEASES: Mapping[str, frozenset[KeyPurpose]] = {
    "visits": frozenset({KeyPurpose.CONTACT}),
    "referrals": frozenset({KeyPurpose.DISCLOSURE}),
}


@dataclass(frozen=True)
class FamilyKeys:
    """A family's unwrapped secret, from which its purpose keys are derived. Lives only for
    the duration of one request or event inside intake."""

    case_id: str
    kid: str
    """Key id of the family secret; derived keys' ids start with it."""
    secret: bytes

    def key(
        self,
        purpose: KeyPurpose,
        *,
        referral_id: str | None = None,
        traeger: str | None = None,
    ) -> tuple[str, bytes]:
        """(kid, key) for one purpose (a disclosure: for one referral and one Träger)."""
        key = derive_key(
            self.secret, purpose, case_id=self.case_id, referral_id=referral_id, traeger=traeger
        )
        return purpose_kid(self.kid, purpose, referral_id=referral_id), key

    def seal(self, payload: BaseModel, purpose: KeyPurpose) -> EncryptedBlock:
        """Seal a block of this family for ``purpose`` (not for disclosures: those are
        bound to a Träger, see :meth:`key`)."""
        kid, key = self.key(purpose)
        return seal(payload, key=key, kid=kid, case_id=self.case_id)

    def open(self, block_json: str, *expected: KeyPurpose) -> dict[str, Any]:
        """Open one of this family's stored blocks, refusing one sealed for another purpose
        than ``expected``. Blocks sealed before keys were bound to purposes (their kid is the
        family's) open with the secret itself; only intake can do that."""
        block = EncryptedBlock.model_validate_json(block_json)
        family_kid, purpose, _ = kid_purpose(block.kid)
        if family_kid != self.kid:
            raise BlockUnreadable(f"block sealed under another family's key {block.kid!r}")
        if purpose is None:
            key = self.secret
        elif purpose in expected and purpose is not KeyPurpose.DISCLOSURE:
            key = self.key(purpose)[1]
        else:
            raise BlockUnreadable(f"block sealed for {purpose.value}, not for this use")
        return open_block(block, key=key, case_id=self.case_id)


class Keyring:
    """Creates, finds and destroys families' secrets inside the caller's transaction."""

    def __init__(self, key_encryption_key: bytes) -> None:
        self._kek = key_encryption_key

    def _wrap(self, key: bytes, case_id: str) -> str:
        block = seal({"k": encode_data_key(key)}, key=self._kek, kid=KEK_ID, case_id=case_id)
        return block.model_dump_json()

    def _unwrap(self, wrapped: str, case_id: str) -> bytes:
        block = EncryptedBlock.model_validate_json(wrapped)
        if block.kid != KEK_ID:
            raise BlockUnreadable(f"data key wrapped with unknown key encryption key {block.kid}")
        return decode_data_key(open_block(block, key=self._kek, case_id=case_id)["k"])

    def create(self, session: AsyncSession, case_id: str, now: datetime) -> FamilyKeys:
        """A fresh secret for a new family, stored when the transaction commits (a new
        family's key is not looked up in the transaction that registers it)."""
        kid = f"fk-{uuid.uuid4().hex}"
        secret = new_data_key()
        add_at_commit(
            session,
            IntakeDataKey.model_construct(
                case_id=case_id, kid=kid, wrapped_key=self._wrap(secret, case_id), created_at=now
            ),
        )
        return FamilyKeys(case_id=case_id, kid=kid, secret=secret)

    async def find(self, session: AsyncSession, case_id: str) -> FamilyKeys | None:
        """The family's keys, or None when it has none (erased, or unknown)."""
        row = await session.get(IntakeDataKey, case_id)
        if row is None:
            return None
        return FamilyKeys(
            case_id=case_id, kid=row.kid, secret=self._unwrap(row.wrapped_key, case_id)
        )

    async def find_by_kid(self, session: AsyncSession, kid: str) -> FamilyKeys | None:
        """The keys of the family a (family or derived) key id belongs to, or None."""
        family_kid = kid.partition("/")[0]
        row = (
            await session.execute(select(IntakeDataKey).where(col(IntakeDataKey.kid) == family_kid))
        ).scalar_one_or_none()
        if row is None:
            return None
        return FamilyKeys(
            case_id=row.case_id, kid=row.kid, secret=self._unwrap(row.wrapped_key, row.case_id)
        )

    async def destroy(self, session: AsyncSession, case_id: str) -> None:
        """Delete the family's secret: every block sealed under any of its keys becomes
        unreadable, and no key of the family can be released any more."""
        await session.execute(delete(IntakeDataKey).where(col(IntakeDataKey.case_id) == case_id))
