"""Intake's data classes and how long they are kept (see docs/operations.md, "Retention").

Live families are kept until erased (on request, or by ``retention_days`` after
registration in the housekeeping job, which also forgets expired Idempotency-Keys). What
an erasure leaves behind, the case's tombstone without personal data, its consent history
(proof of what the family agreed to, Art. 7 (1) GDPR), blanked screenings and handovers,
goes ``retention_erased_case_days`` after the erasure, with the erasure requests (who
requested and who confirmed it, why: the four-eyes proof).
"""

from __future__ import annotations

from lotse_runtime.app import PeriodicJob, ServiceRuntime
from lotse_runtime.retention import RetentionRule, add_retention_job, days, rule

from lotse_intake.settings import IntakeSettings
from lotse_intake.tables import (
    IntakeCase,
    IntakeConsent,
    IntakeConsentChange,
    IntakeErasureRequest,
    IntakeHandover,
    IntakeIdempotency,
    IntakeMatchKey,
    IntakeScreening,
)


def rules(settings: IntakeSettings) -> list[RetentionRule]:
    return [
        rule(
            "erased family records",
            IntakeCase,
            "erased_at",
            days(settings.retention_erased_case_days),
            dependants=[
                (IntakeConsentChange, "case_id"),
                (IntakeConsent, "case_id"),
                (IntakeScreening, "case_id"),
                (IntakeHandover, "case_id"),
                (IntakeMatchKey, "case_id"),
                (IntakeIdempotency, "case_id"),
                (IntakeErasureRequest, "case_id"),
            ],
            description="tombstone of an erased family with its consent history",
        )
    ]


def install(runtime: ServiceRuntime[IntakeSettings]) -> PeriodicJob:
    """The retention job of intake (runtime data classes included)."""
    return add_retention_job(runtime, rules(runtime.settings))
