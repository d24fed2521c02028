"""Intake's secrets: configured ones are checked, missing ones are development files."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from lotse_intake.settings import IntakeSettings
from pydantic import ValidationError

GOOD = "A" * 43  # 32 bytes, base64url without padding


def test_configured_secrets_are_used(tmp_path: Path) -> None:
    settings = IntakeSettings(data_dir=tmp_path, key_encryption_key=GOOD, match_key_secret=GOOD)
    secrets = settings.secrets()
    assert secrets.key_encryption_key == bytes(32)
    assert secrets.match_key_secret == bytes(32)
    assert list(tmp_path.iterdir()) == []  # nothing generated


@pytest.mark.parametrize("bad", ["not base64!", "AAAA"])
def test_malformed_secrets_are_refused(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ValidationError, match="key_encryption_key"):
        IntakeSettings(data_dir=tmp_path, key_encryption_key=bad)


def test_missing_secrets_come_from_a_private_development_file(tmp_path: Path) -> None:
    first = IntakeSettings(data_dir=tmp_path).secrets()
    again = IntakeSettings(data_dir=tmp_path).secrets()
    assert first == again  # restarts keep the keys (else every family becomes unreadable)
    assert first.key_encryption_key != first.match_key_secret
    [path] = tmp_path.iterdir()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    mixed = IntakeSettings(data_dir=tmp_path, match_key_secret=GOOD).secrets()
    assert mixed.key_encryption_key == first.key_encryption_key
    assert mixed.match_key_secret == bytes(32)


def test_secrets_come_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LOTSE_INTAKE_KEY_ENCRYPTION_KEY", GOOD)
    monkeypatch.setenv("LOTSE_INTAKE_MATCH_KEY_SECRET", GOOD)
    monkeypatch.setenv("LOTSE_INTAKE_KEYRING_CLIENTS", '["visits"]')
    settings = IntakeSettings(data_dir=tmp_path)
    assert settings.secrets().key_encryption_key == bytes(32)
    assert settings.keyring_clients == ["visits"]
    assert "AAAA" not in repr(settings)  # secrets are not printed
