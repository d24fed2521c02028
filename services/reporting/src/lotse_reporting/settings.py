"""Settings of the reporting service (env: LOTSE_REPORTING_<FIELD>, then LOTSE_<FIELD>)."""

from __future__ import annotations

from typing import ClassVar

from lotse_runtime.settings import ServiceSettings
from pydantic import Field


class ReportingSettings(ServiceSettings):
    service_name: ClassVar[str] = "reporting"

    http_port: int = Field(default=8004, ge=0, le=65535, description="Port of the HTTP API.")
