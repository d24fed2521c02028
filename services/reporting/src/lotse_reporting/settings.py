"""Settings of the reporting service (env: LOTSE_REPORTING_<FIELD>, then LOTSE_<FIELD>)."""

from __future__ import annotations

from typing import ClassVar

from lotse_runtime.settings import ServiceSettings
from pydantic import Field


class ReportingSettings(ServiceSettings):
    service_name: ClassVar[str] = "reporting"

    http_port: int = Field(default=8004, ge=0, le=65535, description="Port of the HTTP API.")
    k_anonymity: int = Field(
        default=5,
        ge=2,
        le=100,
        description=(
            "Smallest number of families a published cell may stand for; smaller cells (and "
            "cells that would let one be computed back) are published as suppressed."
        ),
    )
    publish_interval_s: float = Field(
        default=60.0,
        gt=0,
        description=(
            "How often the publisher looks for changed cells without being told: a safety net "
            "for changes a replica applied but stopped before publishing. Each replica "
            "publishes its own changes right after they commit (publish_debounce_s), so an "
            "idle service does nothing in between."
        ),
    )
    publish_debounce_s: float = Field(
        default=0.15,
        gt=0,
        le=10,
        description=(
            "How long after an event applied by this process committed the changed cells are "
            "published (events arriving meanwhile go into the same pass); also the least time "
            "between two passes. Between changes a pass is not even started."
        ),
    )
    completion_grace_minutes: int = Field(
        default=60,
        ge=0,
        le=24 * 60,
        description=(
            "How much earlier than its appointment a visit may be recorded as completed; an "
            "earlier completion is impossible and the event is dead-lettered."
        ),
    )
    dashboard_public: bool = Field(
        default=False,
        description=(
            "Serve the dashboard page and its data without a token. They show only the "
            "anonymised figures that the reporting stream publishes anyway, but nothing but "
            "health is open unless someone decides so: in production the page sits behind the "
            "city's login proxy, which adds the bearer token. `./lotse up` (with the local "
            "development issuer) and `./lotse demo` open it."
        ),
    )
    dashboard_poll_s: float = Field(
        default=1.0,
        gt=0,
        description="How often the dashboard's live stream looks for newly published figures.",
    )
    replay_batch_size: int = Field(
        default=2000, ge=1, le=50_000, description="Events per transaction in a replay."
    )
