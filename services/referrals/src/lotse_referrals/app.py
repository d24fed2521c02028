"""App factory of the referrals service."""

from __future__ import annotations

from fastapi import FastAPI
from lotse_runtime.app import create_service_app

from lotse_referrals.settings import ReferralsSettings

DESCRIPTION = """
Offer catalogue of the Träger (independent provider agencies), referral lifecycle, partner
topics and escalation: the warm handover.
"""


def create_app(settings: ReferralsSettings | None = None) -> FastAPI:
    """Build the app; settings come from the environment unless given (tests)."""
    return create_service_app(
        settings or ReferralsSettings(),
        title="Lotse referrals",
        description=DESCRIPTION,
    )
