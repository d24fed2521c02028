"""What the keyring releases to other Lotse services: a family's key for one purpose, a
referral's disclosure sealed for one Träger, and that disclosure's key.

Use cases of the same shape as operations.py (load → decide → record), each inside the
session it is given; every release is audited. Which service may obtain which purpose is
``keyring.RELEASES`` (by the subject of its service token); whether a disclosure may be
made is ``domain.disclosure_refusal`` (§ 65 SGB VIII), checked at sealing and again at
every key release, so a withdrawal or an erasure closes the disclosure at once.
"""

from __future__ import annotations

from lotse_contracts.events.common import ConsentScope, ConsentState
from lotse_contracts.events.referrals import PersonalField
from lotse_contracts.personal import (
    KeyPurpose,
    disclosure_subset,
    encode_data_key,
    seal_both_envelopes,
)
from lotse_runtime.audit import AuditAction
from lotse_runtime.identity import AccessDenied
from lotse_runtime.refusal import Refusal
from sqlalchemy.ext.asyncio import AsyncSession

from lotse_intake import domain
from lotse_intake import operations as ops
from lotse_intake.keyring import RELEASES, FamilyKeys
from lotse_intake.tables import DataKeyPublic, DisclosureCreate, DisclosureSealed, IntakeConsent


def ensure_may_obtain(call: ops.Call, purpose: KeyPurpose) -> None:
    """The policy admits services only; of those, each gets only the purposes it needs."""
    if purpose not in RELEASES.get(call.caller.subject, frozenset()) or not (
        call.is_keyring_client()
    ):
        raise AccessDenied(f"service {call.caller.subject} may not obtain {purpose.value} keys")


async def _family_of(session: AsyncSession, call: ops.Call, case_id: str) -> FamilyKeys:
    case = await ops.load_case(session, case_id)
    if case is None:
        raise Refusal("case_id", "no such case", status=404)
    return await ops.family_key(session, call.intake.keyring, case)


async def _ensure_disclosable(
    session: AsyncSession, case_id: str, traeger: str, consent_id: str
) -> None:
    row = await session.get(IntakeConsent, consent_id)
    record = None
    if row is not None and row.case_id == case_id:
        record = domain.ConsentRecord(
            consent_id=row.consent_id,
            terms=domain.ConsentTerms(ConsentScope(row.scope), row.traeger, row.purpose),
            state=ConsentState(row.state),
        )
    refusal = domain.disclosure_refusal(record, traeger, erased=False)
    if refusal is not None:
        raise refusal


async def purpose_key(
    session: AsyncSession, call: ops.Call, case_id: str, purpose: KeyPurpose, reason: str
) -> DataKeyPublic:
    """The family's key of one purpose, for a service whose task needs it (410 once erased)."""
    if purpose is KeyPurpose.DISCLOSURE:
        raise Refusal("purpose", "disclosure keys are bound to a referral and a Träger")
    ensure_may_obtain(call, purpose)
    keys = await _family_of(session, call, case_id)
    kid, key = keys.key(purpose)
    call.audit(session, AuditAction.key_release, case_id, f"{purpose.value} key: {reason}")
    return DataKeyPublic(case_id=case_id, kid=kid, purpose=purpose, key=encode_data_key(key))


async def seal_disclosure(
    session: AsyncSession, call: ops.Call, case_id: str, body: DisclosureCreate
) -> DisclosureSealed:
    """The requested fields the family gave, sealed under the key of this referral and this
    Träger (EncryptedBlock and compact JWE); nothing sealed when none of them was given."""
    ensure_may_obtain(call, KeyPurpose.DISCLOSURE)
    keys = await _family_of(session, call, case_id)
    await _ensure_disclosable(session, case_id, body.traeger, body.consent_id)
    case = await ops.load_case(session, case_id)
    assert case is not None
    assert case.personal is not None
    subset = disclosure_subset(ops.personal_data_of(keys, case), (f.value for f in body.fields))
    fields = [PersonalField(name) for name in subset]
    call.audit(
        session,
        AuditAction.key_release,
        case_id,
        f"disclosure of referral {body.referral_id} to {body.traeger}: "
        + (", ".join(f.value for f in fields) or "nothing"),
    )
    if not fields:
        return DisclosureSealed(kid=None, disclosed_fields=[])
    kid, key = keys.key(KeyPurpose.DISCLOSURE, referral_id=body.referral_id, traeger=body.traeger)
    block, jwe = seal_both_envelopes(subset, key=key, kid=kid, case_id=case_id)
    return DisclosureSealed(kid=kid, disclosed_fields=fields, disclosure=block, disclosure_jwe=jwe)


async def disclosure_key(
    session: AsyncSession,
    call: ops.Call,
    case_id: str,
    referral_id: str,
    traeger: str,
    consent_id: str,
) -> DataKeyPublic:
    """The key of one referral's disclosure for the addressed Träger, while the consent
    stands and the family is not erased."""
    ensure_may_obtain(call, KeyPurpose.DISCLOSURE)
    keys = await _family_of(session, call, case_id)
    await _ensure_disclosable(session, case_id, traeger, consent_id)
    kid, key = keys.key(KeyPurpose.DISCLOSURE, referral_id=referral_id, traeger=traeger)
    call.audit(
        session,
        AuditAction.key_release,
        case_id,
        f"disclosure key of referral {referral_id} for {traeger}",
    )
    return DataKeyPublic(
        case_id=case_id, kid=kid, purpose=KeyPurpose.DISCLOSURE, key=encode_data_key(key)
    )
