"""Settings of the delivery service (env: LOTSE_DELIVERY_<FIELD>, then LOTSE_<FIELD>)."""

from __future__ import annotations

from typing import ClassVar, Literal

from lotse_runtime.app import ServiceRuntime
from lotse_runtime.settings import ServiceSettings
from pydantic import Field


class DeliverySettings(ServiceSettings):
    service_name: ClassVar[str] = "delivery"

    http_port: int = Field(default=8005, ge=0, le=65535, description="Port of the HTTP API.")
    sink_policy: Literal["production", "development"] = Field(
        default="production",
        description="production: a sink must be https:// and must not resolve to a loopback, "
        "private, link-local, shared, reserved or multicast address (SSRF), checked when the "
        "subscription is made and again before every delivery. development: additionally "
        "http:// and https:// to a loopback address (127.0.0.0/8, ::1, localhost).",
    )
    verify_sinks: bool = Field(
        default=True,
        description="Before a subscription is stored, send the CloudEvents webhook validation "
        "request (OPTIONS with WebHook-Request-Origin) to the sink; it must answer 2xx with "
        "WebHook-Allowed-Origin naming this origin or '*'.",
    )
    webhook_origin: str = Field(
        default="lotse.example",
        description="What Lotse names itself in WebHook-Request-Origin (the validation handshake).",
    )
    deliver_interval_s: float = Field(
        default=0.5, gt=0, description="How often the delivery worker looks for due events."
    )
    deliver_timeout_s: float = Field(
        default=10.0, gt=0, description="Connect + read timeout of one delivery attempt."
    )
    deliver_concurrency: int = Field(
        default=32,
        ge=1,
        description="Subscriptions delivered to at the same time (each has its own task, so a "
        "slow receiver holds one slot, never another subscription's events).",
    )
    deliver_batch: int = Field(
        default=50, ge=1, description="Events one subscription's task takes per round."
    )
    retry_base_s: float = Field(
        default=2.0, gt=0, description="First retry delay; doubles per attempt, with jitter."
    )
    retry_max_s: float = Field(
        default=3600.0, gt=0, description="Longest retry delay, also for a Retry-After."
    )
    failure_budget_attempts: int = Field(
        default=50,
        ge=1,
        description="Consecutive failed attempts (no success in between) after which a "
        "subscription is paused automatically.",
    )
    failure_budget_s: float = Field(
        default=72 * 3600.0,
        gt=0,
        description="Seconds a subscription may fail without one success (since its first "
        "failure) before it is paused automatically, whichever budget is spent first.",
    )
    secret_rotation_grace_s: float = Field(
        default=24 * 3600.0,
        ge=0,
        description="After a secret rotation, deliveries carry a signature with the old "
        "secret too for this long, so the receiver can switch without losing events.",
    )
    delivered_keep_days: int = Field(
        default=14,
        ge=1,
        description="Days a delivered event (the projected copy) is kept for redelivery on "
        "request; the delivery log (no payload) is kept as long.",
    )
    max_subscriptions_per_owner: int = Field(
        default=20, ge=1, description="Subscriptions one Träger or Bezirksteam may hold."
    )


#: The runtime of the delivery service, typed by its settings.
DeliveryRuntime = ServiceRuntime[DeliverySettings]
