"""Referrals' data classes and how long they are kept (see docs/operations.md, "Retention").

A closed referral (completed, rejected or cancelled) and its steps are kept
``retention_closed_referral_days`` after their last change; open ones never go. An erased
family's case row, consents and referral wishes go ``retention_erased_case_days`` after the
erasure. Family data keys are never cached here (each use asks intake's keyring), so there
is no key copy to purge.
"""

from __future__ import annotations

from lotse_contracts.events.referrals import ReferralStatus
from lotse_runtime.app import PeriodicJob, ServiceRuntime
from lotse_runtime.retention import RetentionRule, add_retention_job, days, rule
from sqlalchemy import ColumnElement, Table

from lotse_referrals.settings import ReferralsSettings
from lotse_referrals.tables import Case, ConsentRecord, Referral, ReferralStep, Wish

CLOSED = (ReferralStatus.COMPLETED, ReferralStatus.REJECTED, ReferralStatus.CANCELLED)


def _closed(table: Table) -> ColumnElement[bool]:
    return table.c["status"].in_([status.value for status in CLOSED])


def rules(settings: ReferralsSettings) -> list[RetentionRule]:
    return [
        rule(
            "closed referrals",
            Referral,
            "updated_at",
            days(settings.retention_closed_referral_days),
            only=_closed,
            dependants=[(ReferralStep, "referral_id")],
            description="completed, rejected or cancelled referrals with their steps",
        ),
        rule(
            "erased family records",
            Case,
            "erased_at",
            days(settings.retention_erased_case_days),
            dependants=[(ConsentRecord, "case_id"), (Wish, "case_id")],
            description="case row of an erased family with its consents and wishes",
        ),
    ]


def install(runtime: ServiceRuntime[ReferralsSettings]) -> PeriodicJob:
    """The retention job of referrals (runtime data classes included)."""
    return add_retention_job(runtime, rules(runtime.settings))
