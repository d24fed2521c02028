"""Settings shared by every service, read from the environment by pydantic-settings.

Each service subclasses :class:`ServiceSettings` and sets ``service_name``. A value is looked
up as ``LOTSE_<SERVICE>_<FIELD>`` first (one service's own setting), then ``LOTSE_<FIELD>``
(shared by all services of a deployment); the database URL also answers to the conventional
``DATABASE_URL``. Settings are built inside the app factory, never at import time.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from lotse_runtime.kafka import MAX_RECORD_BYTES

DEFAULT_DATA_DIR = Path("var")

DEAD_LETTER_HEADROOM_BYTES = 64 * 1024
"""Room a dead letter needs besides the original value (its headers, key, batch overhead)."""


class _DatabaseUrlSource(PydanticBaseSettingsSource):
    """``DATABASE_URL`` as the last fallback for ``database_url``."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        if field_name == "database_url" and os.environ.get("DATABASE_URL"):
            return os.environ["DATABASE_URL"], field_name, False
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        url = os.environ.get("DATABASE_URL")
        return {"database_url": url} if url else {}


class ServiceSettings(BaseSettings):
    """What every Lotse service needs to run; defaults are the embedded set-up."""

    model_config = SettingsConfigDict(env_prefix="LOTSE_", extra="ignore", frozen=True)

    service_name: ClassVar[str] = "service"

    kafka_bootstrap: str = Field(
        default="127.0.0.1:9092", description="Kafka bootstrap servers, comma-separated."
    )
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        default="PLAINTEXT", description="SSL for mTLS, SASL_SSL for SCRAM over TLS."
    )
    kafka_sasl_mechanism: Literal["SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN"] | None = Field(
        default=None, description="SASL mechanism (Strimzi KafkaUser scram-sha-512)."
    )
    kafka_sasl_username: str | None = Field(default=None, description="SASL user name.")
    kafka_sasl_password: SecretStr | None = Field(
        default=None, description="SASL password; prefer kafka_sasl_password_file."
    )
    kafka_sasl_password_file: Path | None = Field(
        default=None, description="File holding the SASL password (a mounted Secret)."
    )
    kafka_ssl_cafile: Path | None = Field(default=None, description="CA bundle of the brokers.")
    kafka_ssl_certfile: Path | None = Field(default=None, description="Client cert (mTLS).")
    kafka_ssl_keyfile: Path | None = Field(default=None, description="Client key (mTLS).")
    topic_prefix: str = Field(
        default="",
        description="Prepended to every topic name: separates cities or test runs on one cluster.",
    )
    create_topics: bool = Field(
        default=True, description="Create missing topics at start-up (off where Strimzi owns them)."
    )
    topic_partitions: int = Field(default=3, ge=1, description="Partitions of created topics.")
    topic_replication: int = Field(default=1, ge=1, description="Replication of created topics.")
    topic_check_interval_s: float = Field(
        default=60.0,
        gt=0,
        description="How often a service checks that its topics exist with their partition "
        "count (re-creating missing ones where create_topics allows).",
    )
    kafka_max_record_bytes: int = Field(
        default=MAX_RECORD_BYTES,
        ge=64 * 1024,
        description="Largest Kafka record (key, value, headers): the producer's "
        "max_request_size, the topics' max.message.bytes and the consumer's "
        "max_partition_fetch_bytes alike; deploy/topics.toml must state the same.",
    )
    database_url: str = Field(
        default="",
        description="SQLAlchemy URL; empty means the embedded SQLite file var/<service>.db.",
    )
    database_pool_size: int = Field(
        default=20,
        ge=1,
        le=100,
        description="PostgreSQL: connections a replica keeps open once it needed them. "
        "Replicas x (pool size + max overflow) + leases must stay below the server's "
        "max_connections.",
    )
    database_max_overflow: int = Field(
        default=0,
        ge=0,
        le=100,
        description="PostgreSQL: extra connections under load, closed again when returned. "
        "Each new connection costs several round trips, and asyncpg prepares every "
        "statement again on it: keep them in the pool size instead.",
    )
    database_ping_after_idle_s: float = Field(
        default=10.0,
        ge=0,
        le=3600,
        description="PostgreSQL: a pooled connection idle this long is pinged before use (0: "
        "at every use). A connection broken sooner fails one transaction as transient "
        "(consumers retry, HTTP answers 503 with Retry-After) and the pool is renewed.",
    )
    data_dir: Path = Field(default=DEFAULT_DATA_DIR, description="Where embedded files live.")
    city: str = Field(default="dortmund", description="City configuration (name or TOML path).")
    subscriptions_file: str | None = Field(
        default=None, description="Subscription registry TOML; default is the packaged one."
    )
    http_host: str = Field(default="127.0.0.1", description="Address the HTTP API binds to.")
    http_port: int = Field(default=8000, ge=0, le=65535, description="Port of the HTTP API.")
    contracts_base_url: str | None = Field(
        default=None,
        description="Public URL of the contract documents (e.g. "
        "https://lotse.example/contracts): events name <base>/schemas/<type>.json as their "
        "dataschema, and the service serves the schemas and <base>/asyncapi.json at that "
        "URL's path. Unset: the service's own http://<http_host>:<http_port>/contracts "
        "(development; set it wherever partners reach the services by another name).",
    )
    log_level: str = Field(default="INFO", description="Python log level.")
    otlp_endpoint: str | None = Field(
        default=None, description="OTLP/HTTP collector base URL; unset means no export."
    )
    max_request_body_bytes: int = Field(
        default=64 * 1024,
        ge=1024,
        le=16 * 1024 * 1024,
        description="Larger HTTP request bodies are refused with 413 before they are parsed.",
    )
    max_event_bytes: int = Field(
        default=256 * 1024,
        gt=0,
        description="Larger incoming events are dead-lettered (by reference if they do not "
        "fit a dead letter); at most kafka_max_record_bytes minus 64 KiB for headers.",
    )
    consumer_stall_s: float = Field(
        default=120.0,
        gt=0,
        description="/readyz fails when a consumer has not advanced a partition with pending "
        "records for this long.",
    )
    consumer_session_timeout_ms: int = Field(default=10_000, ge=1000)
    consumer_heartbeat_interval_ms: int = Field(default=3_000, ge=100)
    consumer_max_attempts: int = Field(
        default=4, ge=1, description="Handler attempts before an event is dead-lettered."
    )
    consumer_backoff_s: float = Field(
        default=0.2, gt=0, description="First retry delay; doubles per attempt."
    )
    consumer_fetch_max_wait_ms: int = Field(
        default=100,
        ge=1,
        le=30_000,
        description="How long the broker may hold a consumer's fetch when nothing is there. "
        "Apache Kafka answers as soon as records arrive, so 500 costs no latency and saves "
        "idle fetches; the embedded broker may hold it longer (about a quarter of the wait "
        "per hop), so keep it short there.",
    )
    consumer_fetch_max_wait_idle_ms: int = Field(
        default=500,
        ge=1,
        le=30_000,
        description="The fetch wait of a consumer that has had no record for a few seconds "
        "(back to consumer_fetch_max_wait_ms with the first record): fewer idle fetches, so "
        "an idle service uses less CPU. On Apache Kafka it costs no latency; the embedded "
        "broker holds part of it, so the first event after a quiet spell waits ~100 ms "
        "longer there. Set it equal to consumer_fetch_max_wait_ms to never switch.",
    )
    relay_poll_interval_s: float = Field(
        default=5.0,
        gt=0,
        description="How often the outbox relay looks for rows nobody woke it for (commits "
        "wake it: in the process directly, across replicas through PostgreSQL NOTIFY).",
    )
    relay_batch_size: int = Field(default=200, ge=1)
    readiness_timeout_s: float = Field(default=2.0, gt=0)
    retention_interval_s: float = Field(
        default=3600.0, gt=0, description="How often the retention job purges expired rows."
    )
    retention_inbox_days: int | None = Field(
        default=90,
        ge=1,
        description="Days an inbox entry (an applied event's id) is kept; unset: for good.",
    )
    retention_outbox_sent_days: int | None = Field(
        default=7,
        ge=1,
        description="Days a published outbox row is kept for diagnosis; unset: for good.",
    )
    retention_audit_days: int | None = Field(
        default=3650,
        ge=366,
        description="Days an audit log entry is kept; unset: for good. Entries younger than "
        "a year cannot be deleted at all (database triggers).",
    )
    auth_issuer: str | None = Field(
        default=None, description="Expected token issuer; unset means the development issuer."
    )
    auth_audience: str = Field(default="lotse", description="Expected token audience.")
    auth_jwks: str | None = Field(
        default=None,
        description="Issuer keys: JWKS file path, URL or inline JSON document; unset means the "
        "local development issuer's (key in data_dir, tokens from `lotse token`).",
    )

    @field_validator("contracts_base_url")
    @classmethod
    def _contracts_base_is_absolute(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value.strip())
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError("contracts_base_url must be an absolute http(s) URL")
        if parts.query or parts.fragment:
            raise ValueError("contracts_base_url must have no query or fragment")
        return value.strip().rstrip("/")

    @field_validator("kafka_bootstrap")
    @classmethod
    def _bootstrap_not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("kafka_bootstrap must name at least one host:port")
        return value.strip()

    @model_validator(mode="after")
    def _kafka_security_is_complete(self) -> ServiceSettings:
        if self.kafka_security_protocol.startswith("SASL"):
            has_password = self.kafka_sasl_password or self.kafka_sasl_password_file
            if not (self.kafka_sasl_mechanism and self.kafka_sasl_username and has_password):
                raise ValueError(
                    f"kafka_security_protocol {self.kafka_security_protocol} needs "
                    "kafka_sasl_mechanism, kafka_sasl_username and a password (or password file)"
                )
        if bool(self.kafka_ssl_certfile) != bool(self.kafka_ssl_keyfile):
            raise ValueError("kafka_ssl_certfile and kafka_ssl_keyfile go together (mTLS)")
        if self.max_event_bytes + DEAD_LETTER_HEADROOM_BYTES > self.kafka_max_record_bytes:
            raise ValueError(
                f"max_event_bytes ({self.max_event_bytes}) must leave "
                f"{DEAD_LETTER_HEADROOM_BYTES} bytes of kafka_max_record_bytes "
                f"({self.kafka_max_record_bytes}) for a dead letter's headers"
            )
        return self

    def kafka_client_options(self) -> dict[str, Any]:
        """aiokafka connection options for the configured security (empty for PLAINTEXT)."""
        options: dict[str, Any] = {}
        protocol = self.kafka_security_protocol
        if protocol == "PLAINTEXT":
            return options
        options["security_protocol"] = protocol
        if protocol.endswith("SSL"):
            from aiokafka.helpers import create_ssl_context

            options["ssl_context"] = create_ssl_context(
                cafile=self.kafka_ssl_cafile,
                certfile=self.kafka_ssl_certfile,
                keyfile=self.kafka_ssl_keyfile,
            )
        if protocol.startswith("SASL"):
            if self.kafka_sasl_password_file is not None:
                password = self.kafka_sasl_password_file.read_text().strip()
            else:
                assert self.kafka_sasl_password is not None
                password = self.kafka_sasl_password.get_secret_value()
            options.update(
                sasl_mechanism=self.kafka_sasl_mechanism,
                sasl_plain_username=self.kafka_sasl_username,
                sasl_plain_password=password,
            )
        return options

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        own = EnvSettingsSource(
            settings_cls, env_prefix=f"LOTSE_{cls.service_name.upper()}_", case_sensitive=False
        )
        return (
            init_settings,
            own,
            env_settings,
            _DatabaseUrlSource(settings_cls),
            file_secret_settings,
        )

    @property
    def service(self) -> str:
        return self.service_name

    def resolved_database_url(self) -> str:
        """The database URL, with the embedded SQLite default filled in."""
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{self.data_dir / (self.service_name + '.db')}"

    def contracts_base(self) -> str:
        """The contracts base URL (configured, or this service's own address)."""
        if self.contracts_base_url is not None:
            return self.contracts_base_url
        host = self.http_host
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"  # bound to every address: the loopback one answers too
        elif ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.http_port}/contracts"

    def dev_issuer_key_file(self) -> Path:
        """Key of the local development token issuer (``lotse token`` signs with it)."""
        return self.data_dir / "dev-issuer-key.pem"

    def topic(self, name: str) -> str:
        """A topic's name on the cluster (with this deployment's prefix)."""
        return self.topic_prefix + name

    def consumer_group(self, name: str) -> str:
        """A consumer group's name on the cluster (prefixed like topics)."""
        return f"{self.topic_prefix}lotse-{self.service_name}-{name}"
