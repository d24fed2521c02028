"""The broker killed (SIGKILL) and started again while families flow. Only a broker that keeps
its data can be restarted meaningfully: the embedded Tansu does so with its S3 storage engine
(its memory engine forgets every topic). Afterwards the ground truth must hold as after a
service crash: nothing lost, nothing done twice, reporting counts each family once."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import httpx
import pytest
from lotse_contracts.city import load_city
from lotse_contracts.subscriptions import load_registry
from lotse_runtime.kafka import KafkaConfig, ensure_topics, platform_topics

from tests.faults.families import (
    Findings,
    check_databases,
    check_topics,
    describe,
    make_families,
    register,
)
from tests.faults.processes import Launcher, ProxiedBroker, S3Storage, build_platform

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]

PREFIX = "restart."
FAMILIES = 10


async def test_broker_restart_mid_flow_keeps_the_ground_truth(
    launcher: Launcher,
    service_databases: dict[str, str],
    s3_storage: S3Storage,
    rng: random.Random,
    fault_seed: int,
    tmp_path: Path,
) -> None:
    families = make_families(rng, FAMILIES, handovers_at_least=5)
    restart_after = rng.randint(2, FAMILIES - 3)
    delay_s, down_s = rng.uniform(0.0, 0.3), rng.uniform(0.2, 1.0)
    print(f"broker restart after family {restart_after} (+{delay_s:.2f} s, down {down_s:.2f} s)")
    broker = ProxiedBroker(tmp_path, storage_engine=s3_storage.url, env=s3_storage.env)
    await broker.start()
    platform = build_platform(
        launcher,
        bootstrap=broker.bootstrap,
        topic_prefix=PREFIX,
        databases=service_databases,
        data_dir=tmp_path,
    )
    try:
        registry = load_registry(load_city("dortmund"))
        await ensure_topics(
            KafkaConfig(bootstrap=broker.bootstrap),
            platform_topics(registry, prefix=PREFIX, partitions=2),
        )
        started = time.monotonic()
        await platform.start()
        print(f"platform up after {time.monotonic() - started:.1f} s")
        async with httpx.AsyncClient() as client:
            for number, family in enumerate(families):
                await register(client, platform["intake"].base_url, family)
                if number == restart_after:
                    await asyncio.sleep(delay_s)
                    await asyncio.to_thread(broker.kill)
                    await asyncio.sleep(down_s)
                    await broker.start()
        print(f"families registered after {time.monotonic() - started:.1f} s")
        await asyncio.gather(*(service.wait_ready() for service in platform.services.values()))
        print(f"services ready after {time.monotonic() - started:.1f} s")

        findings = Findings()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 45
        while loop.time() < deadline:
            findings = await check_databases(families, service_databases)
            if findings:
                break
            await asyncio.sleep(0.5)
        assert findings, describe(findings, fault_seed)
        print(f"databases agree after {time.monotonic() - started:.1f} s")
        findings = await check_topics(families, broker.bootstrap, PREFIX)
        assert findings, describe(findings, fault_seed)
    except BaseException:
        for service in platform.services.values():
            print(f"--- {service.name} log ---\n{service.tail()}")
        print(f"--- broker log ---\n{broker.log.read_text(errors='replace')[-3000:]}")
        raise
    finally:
        await asyncio.to_thread(platform.stop)
        await broker.stop()
