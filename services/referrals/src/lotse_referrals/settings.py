"""Settings of the referrals service (env: LOTSE_REFERRALS_<FIELD>, then LOTSE_<FIELD>)."""

from __future__ import annotations

from typing import ClassVar

from lotse_contracts.events.referrals import PersonalField
from lotse_runtime.settings import ServiceSettings
from pydantic import Field

from lotse_referrals.domain import CONTACT_FIELDS


class ReferralsSettings(ServiceSettings):
    service_name: ClassVar[str] = "referrals"

    http_port: int = Field(default=8003, ge=0, le=65535, description="Port of the HTTP API.")
    answer_working_days: int = Field(
        default=3,
        ge=1,
        le=60,
        description=(
            "Working days a Träger has to accept or reject a referral before it escalates to "
            "the Bezirksteam (weekends and the state's public holidays do not count)."
        ),
    )
    urgent_answer_working_days: int = Field(
        default=1,
        ge=1,
        le=60,
        description="The same for urgent referrals (acute need found in the screening).",
    )
    holiday_country: str = Field(
        default="DE",
        pattern=r"^[A-Z]{2}$",
        description="Country whose public holidays are not working days; the federal state "
        "comes from the city configuration (NW for Dortmund and Hamm).",
    )
    escalation_interval_s: float = Field(
        default=300.0, gt=0, description="How often overdue answers are looked for."
    )
    wish_escalation_working_days: int = Field(
        default=5,
        ge=1,
        le=60,
        description="Working days a handover or a visit's referral wish may stay open (no "
        "consent naming a Träger, no free place, module not offered) before it is escalated "
        "to the Bezirksteam of the family's Stadtbezirk (once, event wish-escalated).",
    )
    catalogue_check_interval_s: float = Field(
        default=30.0,
        gt=0,
        description="How often the city file is looked at; when it changed, the catalogue is "
        "reconciled with it as at start (POST /catalogue/reconcile does it at once).",
    )
    placement_interval_s: float = Field(
        default=900.0,
        gt=0,
        description="How often handovers and referral wishes that could not be placed yet "
        "(no consent, no free capacity) are tried again.",
    )
    disclosed_fields: list[PersonalField] = Field(
        default_factory=lambda: list(CONTACT_FIELDS),
        description="Personal fields a traeger_contact consent covers, i.e. what a referral's "
        "sealed disclosure may contain at most (contact data only by default).",
    )
    keyring_url: str | None = Field(
        default=None,
        description="Base URL of the intake service's keyring API (family data keys), e.g. "
        "http://127.0.0.1:8001. Unset: referrals carry no disclosure (ids only).",
    )
    keyring_token_file: str | None = Field(
        default=None,
        description="File holding the bearer token this service presents to the keyring "
        "(with an external issuer); with the development issuer a token is signed locally.",
    )
    keyring_timeout_s: float = Field(default=5.0, gt=0, description="Keyring request timeout.")
    answer_clock_skew_s: float = Field(
        default=600.0,
        ge=0,
        description="How far in the future a Träger's occurred_at may lie (clock skew) before "
        "the answer is refused.",
    )
    retention_closed_referral_days: int | None = Field(
        default=1095,
        ge=1,
        description="Days a completed, rejected or cancelled referral (with its steps) is "
        "kept after its last change; unset: kept for good.",
    )
    retention_erased_case_days: int | None = Field(
        default=1095,
        ge=1,
        description="Days after an erasure until the family's tombstone (no personal data) "
        "and what hangs on it are deleted; unset: kept for good.",
    )
