"""A dead database: the visits service reaches PostgreSQL through a proxy the test stops.
/readyz must turn 503 (naming the database) within a bounded time while /healthz stays up —
Kubernetes takes the pod out of the Service but does not restart it — and once the database
is back, /readyz recovers and the service applies events again: the one that arrived during
the outage (not dead-lettered for it) and new ones."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import httpx
import pytest
from lotse_contracts.topics import dead_letter
from sqlalchemy.engine import make_url

from tests.conftest import Broker
from tests.faults.families import make_families, read_everything, register
from tests.faults.processes import Launcher, TcpProxy, build_platform, fetch
from tests.support import eventually

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

OUTAGE_S = 3.0  # longer than the consumer's retry budget (4 attempts, 0.2 s doubling)


async def test_dead_database_fails_readiness_and_the_service_recovers(
    launcher: Launcher,
    broker: Broker,
    topics: str,
    service_databases: dict[str, str],
    tmp_path: Path,
) -> None:
    families = make_families(random.Random(2), 3)
    for family in families:
        family.body["consents"] = [{"scope": "welcome_visit"}]
        family.wants_handover = False
    real = make_url(service_databases["visits"])
    proxy = TcpProxy(real.host or "127.0.0.1", real.port or 5432)
    await proxy.start()
    databases = {
        **service_databases,
        "visits": real.set(host="127.0.0.1", port=proxy.port).render_as_string(False),
    }
    platform = build_platform(
        launcher,
        bootstrap=broker.bootstrap,
        topic_prefix=topics,
        databases=databases,
        data_dir=tmp_path,
        names=["intake", "visits"],
    )
    visits = platform["visits"]
    visit_of = "SELECT count(*) AS n FROM visits_visit WHERE case_id = $1"

    async def visits_for(case_id: str | None) -> int:
        [row] = await fetch(service_databases["visits"], visit_of, case_id)
        count: int = row["n"]
        return count

    try:
        await platform.start()
        async with httpx.AsyncClient(timeout=10) as client:
            await register(client, platform["intake"].base_url, families[0])
            await eventually(lambda: visits_for(families[0].case_id), timeout_s=30)

            await proxy.stop()
            outage_ends = asyncio.get_running_loop().time() + OUTAGE_S
            readiness: dict[str, Any] = {}

            async def not_ready() -> bool:
                response = await client.get(f"{visits.base_url}/readyz")
                readiness.update(response.json())
                return response.status_code == 503

            await eventually(not_ready, timeout_s=10)
            assert readiness["checks"]["database"] != "ok", readiness
            alive = await client.get(f"{visits.base_url}/healthz")
            assert alive.status_code == 200
            assert visits.running
            # A family registered during the outage: its event reaches visits now.
            await register(client, platform["intake"].base_url, families[1])
            # The outage itself lasts a while, longer than the consumer's retries.
            await asyncio.sleep(max(0.0, outage_ends - asyncio.get_running_loop().time()))

            await proxy.start()

            async def ready() -> bool:
                response = await client.get(f"{visits.base_url}/readyz")
                return response.status_code == 200

            await eventually(ready, timeout_s=20)
            await eventually(lambda: visits_for(families[1].case_id), timeout_s=30)
            await register(client, platform["intake"].base_url, families[2])
            await eventually(lambda: visits_for(families[2].case_id), timeout_s=30)
            assert [await visits_for(f.case_id) for f in families] == [1, 1, 1]
            dead_letters = await asyncio.to_thread(
                read_everything,
                broker.bootstrap,
                topics + dead_letter("visits"),
                lambda _records: True,
                timeout_s=5,
            )
            assert not dead_letters, "an event was dead-lettered because the database was down"
    except BaseException:
        for service in platform.services.values():
            print(f"--- {service.name} log ---\n{service.tail()}")
        raise
    finally:
        await asyncio.to_thread(platform.stop)
        await proxy.stop()
