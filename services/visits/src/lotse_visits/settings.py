"""Settings of the visits service (env: LOTSE_VISITS_<FIELD>, then LOTSE_<FIELD>)."""

from __future__ import annotations

from typing import ClassVar

from lotse_runtime.settings import ServiceSettings
from pydantic import Field


class VisitsSettings(ServiceSettings):
    service_name: ClassVar[str] = "visits"

    http_port: int = Field(default=8002, ge=0, le=65535, description="Port of the HTTP API.")
