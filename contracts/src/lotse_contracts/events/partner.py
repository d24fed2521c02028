"""What a Träger (independent provider agency) sends back about a referral.

Producer: the Träger itself, source ``/partner/<traeger>``, on its own topic
``lotse.partner.<traeger>.responses`` (only it may write there, only Lotse reads). The
referrals service checks each answer against the referral's state and republishes it as
the matching ``de.lotse.referrals.*`` event. An answer carries codes only, never free
text: whatever a Träger knows about the family stays with the Träger.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import ClassVar

from pydantic import AwareDatetime, ConfigDict, Field, model_validator

from lotse_contracts import topics
from lotse_contracts.cloudevents import CloudEvent
from lotse_contracts.events.base import CATALOGUE, EventModel
from lotse_contracts.events.common import (
    BERLIN_WINTER,
    DOCUMENTED,
    EXAMPLE_CASE_ID,
    EXAMPLE_REFERRAL_ID,
    EXAMPLE_TRAEGER,
    CaseId,
    Slug,
    Uuid,
)
from lotse_contracts.events.referrals import RejectionReason

TOPIC_PATTERN = "lotse.partner.{traeger}.responses"
SOURCE_PATTERN = "/partner/{traeger}"


class PartnerAnswer(StrEnum):
    """The status a Träger reports, named as the FHIR Task statuses it leads to.

    ``first-contact`` confirms the first contact with the family (the warm handover).
    """

    RECEIVED = "received"
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    IN_PROGRESS = "in-progress"
    FIRST_CONTACT = "first-contact"
    COMPLETED = "completed"


@CATALOGUE.register
class PartnerReferralAnswer(EventModel):
    """A Träger's answer to a referral addressed to it.

    The CloudEvents ``source`` is ``/partner/<traeger>`` and must match ``traeger``; the
    ``subject`` is the case id from the referral.
    """

    model_config = ConfigDict(
        **DOCUMENTED,
        json_schema_extra={
            "if": {"properties": {"answer": {"const": "rejected"}}},
            "then": {"required": ["reason"]},
            "else": {"not": {"required": ["reason"]}},
        },
    )

    event_type: ClassVar[str] = "de.lotse.partner.referral-answer.v1"
    topic: ClassVar[str] = TOPIC_PATTERN
    source: ClassVar[str] = SOURCE_PATTERN
    bezirk_field: ClassVar[str | None] = None
    traeger_field: ClassVar[str | None] = "traeger"

    referral_id: Uuid
    """Id of the referral, as received in ``referral-requested``."""
    case_id: CaseId
    """Pseudonymous case id (UUID), as received in ``referral-requested``."""
    traeger: Slug
    """The answering Träger's slug; must be the one the referral was addressed to."""
    answer: PartnerAnswer
    """The new status."""
    reason: RejectionReason | None = None
    """Why the referral is rejected (required for ``rejected``, not allowed otherwise)."""
    reason_code: str | None = Field(default=None, pattern=r"^[A-Za-z0-9._-]{1,32}$")
    """The Träger's own reason code, if any (a code, never free text)."""
    occurred_at: AwareDatetime
    """When the status change happened at the Träger."""

    @model_validator(mode="after")
    def _reason_only_for_rejection(self) -> PartnerReferralAnswer:
        if (self.answer is PartnerAnswer.REJECTED) != (self.reason is not None):
            raise ValueError("reason is required for answer 'rejected' and only there")
        return self

    def partner_topic(self) -> str:
        """The topic this answer is written to."""
        return topics.partner_responses(self.traeger)

    def partner_source(self) -> str:
        """The CloudEvents source of this answer."""
        return SOURCE_PATTERN.format(traeger=self.traeger)

    def to_cloudevent(
        self,
        *,
        event_id: str | None = None,
        time: datetime | None = None,
        source: str | None = None,
        schema_base: str | None = None,
    ) -> CloudEvent:
        """As the base, but the source defaults to this Träger's ``/partner/<traeger>``."""
        return super().to_cloudevent(
            event_id=event_id,
            time=time,
            source=source or self.partner_source(),
            schema_base=schema_base,
        )

    @classmethod
    def example(cls) -> PartnerReferralAnswer:
        return cls(
            referral_id=EXAMPLE_REFERRAL_ID,
            case_id=EXAMPLE_CASE_ID,
            traeger=EXAMPLE_TRAEGER,
            answer=PartnerAnswer.ACCEPTED,
            occurred_at=datetime(2025, 3, 4, 9, 30, tzinfo=BERLIN_WINTER),
        )
