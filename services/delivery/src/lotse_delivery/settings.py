"""Settings of the delivery service (env: LOTSE_DELIVERY_<FIELD>, then LOTSE_<FIELD>)."""

from __future__ import annotations

import json
import logging
import os
import secrets
from pathlib import Path
from typing import ClassVar, Literal

from lotse_runtime.app import ServiceRuntime
from lotse_runtime.settings import ServiceSettings
from pydantic import Field, SecretStr, field_validator, model_validator

from lotse_delivery.sealing import KEY_BYTES, SecretBox, decode_key, encode_key

_log = logging.getLogger(__name__)
DEV_KEY_FILE = "delivery-key.json"


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
    lease_s: float = Field(
        default=120.0,
        gt=0,
        description="How long a claimed event is reserved for the instance that claimed it "
        "(row lease: several replicas never post the same event at once). An attempt starts "
        "only if it can end (deliver_timeout_s) before the lease does; an instance that dies "
        "holding a lease delays that case's events by at most this long.",
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
    secret_key: SecretStr | None = Field(
        default=None,
        description="Key (32 bytes, base64url) sealing the webhook secrets at rest "
        "(AES-256-GCM). Unset and no secret_key_file: a development key is generated in "
        "data_dir/delivery-key.json. Losing it makes every subscription's secret "
        "unreadable (rotate them); mount it from a Secret in production.",
    )
    secret_key_file: Path | None = Field(
        default=None,
        description="File holding secret_key (base64url), e.g. a mounted Kubernetes Secret; "
        "used when secret_key is unset.",
    )
    secret_old_keys: list[SecretStr] = Field(
        default_factory=list,
        description="Earlier secret keys (base64url): still opened, and housekeeping seals "
        "every secret again under secret_key; drop them once that ran.",
    )

    @field_validator("secret_key")
    @classmethod
    def _key_well_formed(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            decode_key(value.get_secret_value(), "secret_key")
        return value

    @field_validator("secret_old_keys")
    @classmethod
    def _old_keys_well_formed(cls, value: list[SecretStr]) -> list[SecretStr]:
        for i, key in enumerate(value):
            decode_key(key.get_secret_value(), f"secret_old_keys.{i}")
        return value

    def secret_box(self) -> SecretBox:
        """What seals and opens the webhook secrets, from the configured keys."""
        older = [
            decode_key(k.get_secret_value(), f"secret_old_keys.{i}")
            for i, k in enumerate(self.secret_old_keys)
        ]
        if self.secret_key is not None:
            current = decode_key(self.secret_key.get_secret_value(), "secret_key")
        elif self.secret_key_file is not None:
            try:
                text = self.secret_key_file.read_text(encoding="utf-8")
            except OSError as exc:
                raise ValueError(
                    f"secret_key_file {self.secret_key_file}: {exc.strerror}"
                ) from None
            current = decode_key(text, f"secret_key_file {self.secret_key_file}")
        else:
            current = self._development_key()
        return SecretBox(current, older)

    def _development_key(self) -> bytes:
        path = self.data_dir / DEV_KEY_FILE
        if not path.exists():
            _log.warning(
                "delivery secret_key not configured: generating a development key",
                extra={"path": str(path)},
            )
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                pass  # another process of this deployment was faster: use its key
            else:
                with os.fdopen(fd, "w") as handle:
                    json.dump({"secret_key": encode_key(secrets.token_bytes(KEY_BYTES))}, handle)
        return decode_key(json.loads(path.read_text())["secret_key"], str(path))

    @model_validator(mode="after")
    def _lease_outlasts_an_attempt(self) -> DeliverySettings:
        if self.lease_s <= self.deliver_timeout_s:
            raise ValueError(
                f"lease_s ({self.lease_s}) must be longer than deliver_timeout_s "
                f"({self.deliver_timeout_s}): a lease must outlast one attempt"
            )
        return self


#: The runtime of the delivery service, typed by its settings.
DeliveryRuntime = ServiceRuntime[DeliverySettings]
