"""Fixtures of the intake tests (helpers in tests/intake/helpers.py)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tests.conftest import Broker
from tests.intake.helpers import Intake, run_intake


@pytest.fixture
def intake(broker: Broker, topics: str, sqlite_url: str) -> Iterator[Intake]:
    """Intake on SQLite with its own topics."""
    yield from run_intake(broker, sqlite_url, topics)


@pytest.fixture
def intake_any_db(broker: Broker, topics: str, database_url: str) -> Iterator[Intake]:
    """Intake on each database backend (SQLite and PostgreSQL)."""
    yield from run_intake(broker, database_url, topics)


@pytest.fixture(scope="module")
def shared_intake(broker: Broker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Intake]:
    """One intake for a module's tests that only look at answers and row counts."""
    database = tmp_path_factory.mktemp("intake") / "intake.db"
    prefix = f"t{uuid.uuid4().hex[:10]}."
    yield from run_intake(broker, f"sqlite+aiosqlite:///{database}", prefix)
