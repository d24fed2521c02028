"""Settings of the visits service (env: LOTSE_VISITS_<FIELD>, then LOTSE_<FIELD>)."""

from __future__ import annotations

from typing import ClassVar

from lotse_runtime.app import ServiceRuntime
from lotse_runtime.settings import ServiceSettings
from pydantic import Field


class VisitsSettings(ServiceSettings):
    service_name: ClassVar[str] = "visits"

    http_port: int = Field(default=8002, ge=0, le=65535, description="Port of the HTTP API.")
    visit_target_days: int | None = Field(
        default=None,
        ge=1,
        le=365,
        description=(
            "Days after the reference date (the birth, or the move-in notice) by which the "
            "welcome visit should have happened; unset means the city's "
            "welcome_visit_target_days."
        ),
    )
    proposal_lead_days: int = Field(
        default=1,
        ge=0,
        le=30,
        description=(
            "Whole days between making an automatic proposal and the earliest day it may "
            "fall on, so that the family hears of the appointment before it."
        ),
    )
    scheduling_horizon_days: int = Field(
        default=180,
        ge=7,
        le=730,
        description="How far ahead the scheduler looks for a free slot before giving up.",
    )
    overdue_check_interval_s: float = Field(
        default=300.0, gt=0, description="How often the overdue check runs."
    )
    overdue_batch_size: int = Field(
        default=500, ge=1, description="Cases the overdue check handles per transaction."
    )
    retention_finished_visit_days: int | None = Field(
        default=1095,
        ge=1,
        description="Days a completed, missed, declined or cancelled visit is kept after it "
        "closed; unset: kept for good.",
    )
    retention_erased_case_days: int | None = Field(
        default=1095,
        ge=1,
        description="Days after an erasure until the family's tombstone (no personal data) "
        "and what hangs on it are deleted; unset: kept for good.",
    )


#: The runtime of the visits service, typed by its settings.
VisitsRuntime = ServiceRuntime[VisitsSettings]
