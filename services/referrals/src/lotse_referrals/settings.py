"""Settings of the referrals service (env: LOTSE_REFERRALS_<FIELD>, then LOTSE_<FIELD>)."""

from __future__ import annotations

from typing import ClassVar

from lotse_runtime.settings import ServiceSettings
from pydantic import Field


class ReferralsSettings(ServiceSettings):
    service_name: ClassVar[str] = "referrals"

    http_port: int = Field(default=8003, ge=0, le=65535, description="Port of the HTTP API.")
