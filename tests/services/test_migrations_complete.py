"""Every service's tables are created by its migrations — on both database backends — so a
deployment never depends on the create-unmigrated fallback meant for work in progress."""

from __future__ import annotations

import pytest
from lotse_runtime.db import Database
from lotse_runtime.migrations import check_migrations, service_tables

pytestmark = pytest.mark.integration

SERVICES = ["intake", "visits", "referrals", "reporting", "delivery"]


@pytest.mark.parametrize("service", SERVICES)
async def test_migrations_create_exactly_what_the_models_declare(
    service: str, database_url: str
) -> None:
    db = Database(database_url)
    try:
        tables = service_tables(service)
        assert all(t.__tablename__.startswith(f"{service}_") for t in tables)  # type: ignore[union-attr]
        differences = await check_migrations(db, tables, service=service)
    finally:
        await db.dispose()
    assert differences == [], (
        f"{service}: write a revision (python -m lotse_runtime.migrations revision {service})"
    )
