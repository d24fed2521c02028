"""Visits' data classes and how long they are kept (see docs/operations.md, "Retention").

A finished visit (completed, missed, declined or cancelled) is kept
``retention_finished_visit_days`` after it closed, for the Familienbüro's follow-up and
questions; open visits are never purged. An erased family's case row, consents and visits
go ``retention_erased_case_days`` after the erasure.
"""

from __future__ import annotations

from lotse_runtime.app import PeriodicJob
from lotse_runtime.retention import RetentionRule, add_retention_job, days, rule

from lotse_visits.settings import VisitsRuntime, VisitsSettings
from lotse_visits.tables import VisitsCase, VisitsConsent, VisitsVisit


def rules(settings: VisitsSettings) -> list[RetentionRule]:
    return [
        rule(
            "finished visits",
            VisitsVisit,
            "closed_at",
            days(settings.retention_finished_visit_days),
            description="completed, missed, declined or cancelled visits",
        ),
        rule(
            "erased family records",
            VisitsCase,
            "erased_at",
            days(settings.retention_erased_case_days),
            dependants=[(VisitsConsent, "case_id"), (VisitsVisit, "case_id")],
            description="case row of an erased family with its consents and visits",
        ),
    ]


def install(runtime: VisitsRuntime) -> PeriodicJob:
    """The retention job of visits (runtime data classes included)."""
    return add_retention_job(runtime, rules(runtime.settings))
