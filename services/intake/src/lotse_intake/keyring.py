"""The keyring: one data key per family, for crypto-shredding.

Every personal or screening block of a family, in every event and in intake's own rows, is
sealed with that family's data key. The key is stored wrapped (AES-256-GCM under the
service's key encryption key, bound to the case id), so a copy of the table alone opens
nothing. Erasure deletes the key row: from then on no block of the family opens anywhere.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from lotse_contracts.personal import (
    BlockUnreadable,
    EncryptedBlock,
    decode_data_key,
    encode_data_key,
    new_data_key,
    open_block,
    seal,
)
from pydantic import BaseModel
from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from lotse_intake.tables import IntakeDataKey

#: Key id of the key encryption key; a rotated KEK gets a new one.
KEK_ID = "intake-kek-1"


class Keyring:
    """Creates, finds and destroys families' data keys inside the caller's transaction."""

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

    def create(self, session: AsyncSession, case_id: str, now: datetime) -> tuple[str, bytes]:
        """A fresh data key for a new family: (kid, key)."""
        kid = f"fk-{uuid.uuid4().hex}"
        key = new_data_key()
        session.add(
            IntakeDataKey(
                case_id=case_id, kid=kid, wrapped_key=self._wrap(key, case_id), created_at=now
            )
        )
        return kid, key

    async def find(self, session: AsyncSession, case_id: str) -> tuple[str, bytes] | None:
        """(kid, key) of a family, or None when it has none (erased, or unknown)."""
        row = await session.get(IntakeDataKey, case_id)
        if row is None:
            return None
        return row.kid, self._unwrap(row.wrapped_key, case_id)

    async def find_by_kid(self, session: AsyncSession, kid: str) -> tuple[str, bytes] | None:
        """(case_id, key) for a key id, or None when no such key exists (any more)."""
        row = (
            await session.execute(select(IntakeDataKey).where(col(IntakeDataKey.kid) == kid))
        ).scalar_one_or_none()
        if row is None:
            return None
        return row.case_id, self._unwrap(row.wrapped_key, row.case_id)

    async def destroy(self, session: AsyncSession, case_id: str) -> None:
        """Delete the family's key: every block sealed with it becomes unreadable."""
        await session.execute(delete(IntakeDataKey).where(col(IntakeDataKey.case_id) == case_id))


def seal_for(payload: BaseModel, *, key: bytes, kid: str, case_id: str) -> EncryptedBlock:
    """Seal a payload (personal data, screening) with a family's key."""
    return seal(payload, key=key, kid=kid, case_id=case_id)


def open_for(block_json: str, *, key: bytes, case_id: str) -> dict[str, Any]:
    """Open a stored block of a family."""
    return open_block(EncryptedBlock.model_validate_json(block_json), key=key, case_id=case_id)
