"""Fixtures of the fault tests: a PostgreSQL database per service, and a seeded random source
whose seed is printed, so that a failing run can be repeated (LOTSE_FAULT_SEED=<seed>)."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from lotse_tooling.embedded import free_port

from tests.conftest import PostgresServer
from tests.faults.processes import (
    NO_DURABLE_BROKER,
    SERVICES,
    Launcher,
    S3Storage,
    create_databases,
    drop_databases,
)
from tests.support import eventually


@pytest.fixture
async def service_databases(
    postgres_server: PostgresServer | None,
) -> AsyncIterator[dict[str, str]]:
    """A fresh PostgreSQL database for each of the four services, dropped afterwards."""
    if postgres_server is None:
        pytest.skip("no PostgreSQL: set DATABASE_URL or run one on 127.0.0.1:5432")
    databases = await create_databases(postgres_server.admin_url, SERVICES)
    yield databases
    await drop_databases(postgres_server.admin_url, databases.values())


@pytest.fixture
async def delivery_database(postgres_server: PostgresServer | None) -> AsyncIterator[str]:
    """A fresh PostgreSQL database for the delivery service (the fifth consuming service),
    dropped afterwards."""
    if postgres_server is None:
        pytest.skip("no PostgreSQL: set DATABASE_URL or run one on 127.0.0.1:5432")
    databases = await create_databases(postgres_server.admin_url, ["delivery"])
    yield databases["delivery"]
    await drop_databases(postgres_server.admin_url, databases.values())


@pytest.fixture
def fault_seed() -> int:
    configured = os.environ.get("LOTSE_FAULT_SEED")
    seed = int(configured) if configured else random.SystemRandom().randrange(2**32)
    print(f"fault seed: {seed} (repeat with LOTSE_FAULT_SEED={seed})")
    return seed


@pytest.fixture
def rng(fault_seed: int) -> random.Random:
    return random.Random(fault_seed)


@pytest.fixture(scope="session")
def launcher() -> Iterator[Launcher]:
    """Forks service processes from one parent that has imported them (see zygote.py)."""
    front = Launcher()
    yield front
    front.close()


def _start_moto(server: str, port: int, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as handle:
        return subprocess.Popen(
            [server, "-H", "127.0.0.1", "-p", str(port)], stdout=handle, stderr=subprocess.STDOUT
        )


@pytest.fixture
async def s3_storage(tmp_path: Path) -> AsyncIterator[S3Storage]:
    """An S3 endpoint for the broker's storage: LOTSE_TEST_S3_ENDPOINT, or a local
    moto server started for this test; skipped when neither is there."""
    credentials = {
        "AWS_ACCESS_KEY_ID": os.environ.get("AWS_ACCESS_KEY_ID", "lotse-test"),
        "AWS_SECRET_ACCESS_KEY": os.environ.get("AWS_SECRET_ACCESS_KEY", "lotse-test"),
        "AWS_DEFAULT_REGION": os.environ.get("AWS_DEFAULT_REGION", "eu-central-1"),
        "AWS_ALLOW_HTTP": "true",
    }
    configured = os.environ.get("LOTSE_TEST_S3_ENDPOINT")
    if configured:
        yield S3Storage("s3://tansu/", {**credentials, "AWS_ENDPOINT": configured})
        return
    server = shutil.which("moto_server")
    if server is None:
        pytest.skip(NO_DURABLE_BROKER)
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    process = _start_moto(server, port, tmp_path / "moto.log")
    try:
        async with httpx.AsyncClient() as client:

            async def bucket_created() -> bool:
                try:
                    response = await client.put(f"{endpoint}/tansu")
                except httpx.HTTPError:
                    return False
                return response.status_code == 200

            await eventually(bucket_created, timeout_s=30, interval_s=0.2)
        yield S3Storage("s3://tansu/", {**credentials, "AWS_ENDPOINT": endpoint})
    finally:
        process.kill()
        process.wait(10)
