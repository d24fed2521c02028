"""Settings of the intake service (env: LOTSE_INTAKE_<FIELD>, then LOTSE_<FIELD>)."""

from __future__ import annotations

from typing import ClassVar

from lotse_runtime.settings import ServiceSettings
from pydantic import Field


class IntakeSettings(ServiceSettings):
    service_name: ClassVar[str] = "intake"

    http_port: int = Field(default=8001, ge=0, le=65535, description="Port of the HTTP API.")
