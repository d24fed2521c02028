"""The delivery service's tables and the models of its HTTP API.

Nothing personal is stored here beyond what the subscription registry lets the subscriber's
audience see anyway: a pending delivery holds the registry's projected copy of one event (the
same bytes of data the audience topic carries), and only until it is delivered and its
redelivery window (``delivered_keep_days``) has passed. The delivery log holds no payload.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from lotse_runtime.inputs import RequestModel
from pydantic import AwareDatetime, BaseModel, Field
from sqlalchemy import JSON, Column, Index, Text
from sqlmodel import Field as TableField
from sqlmodel import SQLModel

# -- tables --------------------------------------------------------------------------------------


class DeliverySubscription(SQLModel, table=True):
    """One webhook subscription of a Träger or a Bezirksteam."""

    __tablename__ = "delivery_subscription"
    __table_args__ = (Index("ix_delivery_subscription_owner", "owner_kind", "owner"),)

    id: str = TableField(primary_key=True, max_length=36)
    owner_kind: str = TableField(max_length=16, description="traeger or bezirksteam.")
    owner: str = TableField(max_length=64, description="The Träger's or Stadtbezirk's slug.")
    sink: str = TableField(max_length=2048)
    mode: str = TableField(max_length=16, description="binary or structured.")
    types: list[str] = TableField(sa_column=Column(JSON, nullable=False))
    filters: list[dict[str, Any]] = TableField(sa_column=Column(JSON, nullable=False))
    fields: list[str] | None = TableField(default=None, sa_column=Column(JSON, nullable=True))
    description: str | None = TableField(default=None, max_length=200)
    status: str = TableField(max_length=16, description="active or paused.")
    paused_reason: str | None = TableField(default=None, sa_column=Column(Text, nullable=True))
    paused_at: datetime | None = None
    secret: str = TableField(
        max_length=256,
        description="Standard Webhooks secret (whsec_…), sealed with the secrets key "
        "(sealing.py); never stored in the clear.",
    )
    previous_secret: str | None = TableField(
        default=None, max_length=256, description="The secret before a rotation, sealed too."
    )
    previous_secret_until: datetime | None = None
    failing_since: datetime | None = None
    consecutive_failures: int = 0
    hold_until: datetime | None = TableField(
        default=None, description="No attempt before this (backoff, Retry-After)."
    )
    created_by: str = TableField(max_length=200)
    created_at: datetime
    updated_at: datetime


class DeliveryPending(SQLModel, table=True):
    """One event to deliver to one subscription (written in the consumer's transaction,
    with its inbox entry: the outbox of the webhook path). ``id`` gives the order."""

    __tablename__ = "delivery_pending"
    __table_args__ = (
        Index("ix_delivery_pending_due", "subscription_id", "state", "id"),
        Index("ix_delivery_pending_event", "subscription_id", "event_id", unique=True),
    )

    id: int | None = TableField(default=None, primary_key=True)
    subscription_id: str = TableField(max_length=36)
    ordering_key: str = TableField(max_length=64, description="Case id (CloudEvent subject).")
    event_id: str = TableField(max_length=200)
    event_type: str = TableField(max_length=200)
    event_time: datetime | None = None
    cloudevent: dict[str, Any] = TableField(sa_column=Column(JSON, nullable=False))
    state: str = TableField(max_length=16, description="pending or delivered.")
    attempts: int = 0
    created_at: datetime
    delivered_at: datetime | None = None
    lease_until: datetime | None = TableField(
        default=None,
        description="Claimed by lease_owner until then (row lease across replicas); "
        "a lapsed lease may be claimed again.",
    )
    lease_owner: str | None = TableField(
        default=None, max_length=64, description="The worker instance holding the lease."
    )


class DeliveryAttempt(SQLModel, table=True):
    """The delivery log a subscriber can read: attempts, status, latency; no payload."""

    __tablename__ = "delivery_attempt"
    __table_args__ = (Index("ix_delivery_attempt_subscription", "subscription_id", "id"),)

    id: int | None = TableField(default=None, primary_key=True)
    subscription_id: str = TableField(max_length=36)
    event_id: str = TableField(max_length=200)
    event_type: str = TableField(max_length=200)
    attempt: int
    at: datetime
    outcome: str = TableField(max_length=16, description="delivered, retry, paused.")
    status_code: int | None = None
    latency_ms: int | None = None
    error: str | None = TableField(default=None, max_length=300)
    next_attempt_at: datetime | None = None


TABLES: list[type[SQLModel]] = [DeliverySubscription, DeliveryPending, DeliveryAttempt]

# -- API models ----------------------------------------------------------------------------------

FilterAttribute = Literal["bezirk", "traeger", "module"]


class ExactFilter(RequestModel):
    """CloudEvents Subscriptions API ``exact`` filter: every named attribute must equal."""

    exact: dict[FilterAttribute, str] = Field(
        min_length=1,
        max_length=3,
        description="Attribute → value, e.g. {'bezirk': 'hoerde'}; module is the event's "
        "module field.",
    )


class AnyFilter(RequestModel):
    """CloudEvents Subscriptions API ``any`` filter: one of the nested filters must match."""

    any: list[ExactFilter] = Field(min_length=1, max_length=50)


Filter = ExactFilter | AnyFilter


class HttpProtocolSettings(RequestModel):
    """How the events are posted (CloudEvents HTTP protocol binding)."""

    mode: Literal["binary", "structured"] = Field(
        default="binary",
        description="binary: attributes as ce-* headers, the data as the JSON body; "
        "structured: the whole event as application/cloudevents+json.",
    )


class SubscriptionCreate(RequestModel):
    """A new subscription, shaped after the CloudEvents Subscriptions API."""

    sink: str = Field(
        min_length=8, max_length=2048, description="HTTPS URL the events are posted to."
    )
    protocol: Literal["HTTP"] = Field(default="HTTP", description="Only HTTP (webhooks).")
    protocolsettings: HttpProtocolSettings = Field(default_factory=HttpProtocolSettings)
    types: list[str] = Field(
        min_length=1,
        max_length=50,
        description="CloudEvents types; only those the subscription registry gives your audience.",
    )
    filters: list[Filter] = Field(
        default_factory=list, max_length=10, description="All must match (AND)."
    )
    fields: list[str] | None = Field(
        default=None,
        max_length=100,
        description="Further limit the data fields (within the registry's fields per type).",
    )
    description: str | None = Field(default=None, max_length=200)


class SubscriptionChange(RequestModel):
    """Pause or resume a subscription."""

    status: Literal["active", "paused"]


class SubscriptionPublic(BaseModel):
    id: str
    sink: str
    protocol: Literal["HTTP"] = "HTTP"
    protocolsettings: HttpProtocolSettings
    types: list[str]
    filters: list[dict[str, Any]]
    fields: list[str] | None
    description: str | None
    status: str
    paused_reason: str | None
    paused_at: datetime | None
    consecutive_failures: int
    pending: int = Field(description="Events waiting for delivery.")
    created_at: datetime


class SubscriptionCreated(SubscriptionPublic):
    secret: str = Field(description="Standard Webhooks secret (whsec_…): shown only now; store it.")


class SecretRotated(BaseModel):
    id: str
    secret: str = Field(description="The new secret, shown only now.")
    previous_valid_until: datetime = Field(
        description="Until then deliveries are also signed with the previous secret."
    )


class AttemptPublic(BaseModel):
    event_id: str
    event_type: str
    attempt: int
    at: datetime
    outcome: str
    status_code: int | None
    latency_ms: int | None
    error: str | None
    next_attempt_at: datetime | None


class RedeliverRequest(RequestModel):
    since: AwareDatetime = Field(
        description="Deliver again every kept event of this subscription that happened at or "
        "after this moment (CloudEvent time)."
    )


class RedeliverAccepted(BaseModel):
    requeued: int


class AnswerAccepted(BaseModel):
    id: str
    status: Literal["accepted", "duplicate"]
    topic: str
