"""Settings: per-service prefix over the shared prefix over DATABASE_URL; defaults embedded."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import ClassVar

import pytest
from lotse_runtime.db import DatabaseConfigError, async_url
from lotse_runtime.settings import ServiceSettings
from pydantic import ValidationError


class ProbeSettings(ServiceSettings):
    service_name: ClassVar[str] = "probe"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("DATABASE_URL", "LOTSE_DATABASE_URL", "LOTSE_KAFKA_BOOTSTRAP", "LOTSE_CITY"):
        monkeypatch.delenv(name, raising=False)


def test_embedded_defaults() -> None:
    settings = ProbeSettings()
    assert settings.resolved_database_url() == "sqlite+aiosqlite:///var/probe.db"
    assert settings.city == "dortmund"
    assert settings.consumer_group("main") == "lotse-probe-main"


def test_service_prefix_beats_shared_prefix_beats_database_url(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://db/any")
    assert ProbeSettings().database_url == "postgresql://db/any"
    monkeypatch.setenv("LOTSE_DATABASE_URL", "postgresql://db/shared")
    assert ProbeSettings().database_url == "postgresql://db/shared"
    monkeypatch.setenv("LOTSE_PROBE_DATABASE_URL", "postgresql://db/probe")
    assert ProbeSettings().database_url == "postgresql://db/probe"


def test_topic_prefix_applies_to_topics_and_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOTSE_TOPIC_PREFIX", "hamm.")
    settings = ProbeSettings()
    assert settings.topic("lotse.intake") == "hamm.lotse.intake"
    assert settings.consumer_group("main") == "hamm.lotse-probe-main"


def test_bad_values_name_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOTSE_PROBE_HTTP_PORT", "seventy")
    with pytest.raises(ValidationError, match="http_port"):
        ProbeSettings()


def test_database_urls_are_normalised_to_async_drivers() -> None:
    assert async_url("postgresql://u@h/db") == "postgresql+asyncpg://u@h/db"
    assert async_url("sqlite:///x.db") == "sqlite+aiosqlite:///x.db"
    with pytest.raises(DatabaseConfigError, match="only postgresql and sqlite"):
        async_url("mysql://u@h/db")


def test_kafka_security_settings_become_client_options(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    secret = tmp_path / "password"
    secret.write_text("s3cret\n")
    monkeypatch.setenv("LOTSE_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("LOTSE_KAFKA_SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("LOTSE_KAFKA_SASL_USERNAME", "lotse-visits")
    monkeypatch.setenv("LOTSE_KAFKA_SASL_PASSWORD_FILE", str(secret))
    options = ProbeSettings().kafka_client_options()
    assert options["security_protocol"] == "SASL_SSL"
    assert options["sasl_mechanism"] == "SCRAM-SHA-512"
    assert options["sasl_plain_username"] == "lotse-visits"
    assert options["sasl_plain_password"] == "s3cret"
    assert isinstance(options["ssl_context"], ssl.SSLContext)
    assert "s3cret" not in repr(ProbeSettings())  # never printed with the settings


def test_incomplete_kafka_security_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOTSE_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    with pytest.raises(ValidationError, match="needs kafka_sasl_mechanism"):
        ProbeSettings()
    monkeypatch.setenv("LOTSE_KAFKA_SECURITY_PROTOCOL", "SSL")
    monkeypatch.setenv("LOTSE_KAFKA_SSL_CERTFILE", "/etc/lotse/tls.crt")
    with pytest.raises(ValidationError, match="go together"):
        ProbeSettings()
