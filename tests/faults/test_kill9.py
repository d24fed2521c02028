"""kill -9 while families flow: every service is killed (SIGKILL, no shutdown) at seeded
random moments and started again; afterwards the platform's state must equal what the test
did — no registration lost, no welcome visit or referral twice, reporting counts each family
once, and no effect published twice under different event ids."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import Broker
from tests.faults.families import (
    Family,
    Findings,
    check_databases,
    check_topics,
    describe,
    make_families,
    register,
)
from tests.faults.processes import SERVICES, Launcher, Platform, build_platform

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]

FAMILIES = 16


@dataclass(frozen=True)
class Kill:
    service: str
    after_family: int  # when this many families have been sent to intake ...
    delay_s: float  # ... and this much later
    down_s: float  # how long the service stays dead


def kill_plan(rng: random.Random, families: int) -> list[Kill]:
    """Each service killed once, one of them once more, at random moments of the flow."""
    victims = [*SERVICES, rng.choice(SERVICES)]
    rng.shuffle(victims)
    return sorted(
        (
            Kill(
                service=name,
                after_family=rng.randint(1, families - 2),
                delay_s=round(rng.uniform(0.0, 0.4), 3),
                down_s=round(rng.uniform(0.0, 0.5), 3),
            )
            for name in victims
        ),
        key=lambda kill: (kill.after_family, kill.delay_s),
    )


class Progress:
    """How many families have been sent to intake; kills wait for their moment in it."""

    def __init__(self) -> None:
        self.sent = 0
        self._changed = asyncio.Condition()

    async def one_more(self) -> None:
        async with self._changed:
            self.sent += 1
            self._changed.notify_all()

    async def reached(self, count: int) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self.sent >= count)


async def chaos(platform: Platform, plan: list[Kill], progress: Progress) -> None:
    for kill in plan:
        await progress.reached(kill.after_family)
        await asyncio.sleep(kill.delay_s)
        victim = platform[kill.service]
        await asyncio.to_thread(victim.kill)
        await asyncio.sleep(kill.down_s)
        victim.start()


async def test_kill9_each_service_while_families_flow(
    launcher: Launcher,
    broker: Broker,
    topics: str,
    service_databases: dict[str, str],
    rng: random.Random,
    fault_seed: int,
    tmp_path: Path,
) -> None:
    families = make_families(rng, FAMILIES, handovers_at_least=5)
    plan = kill_plan(rng, FAMILIES)
    print("kill plan:", plan)
    platform = build_platform(
        launcher,
        bootstrap=broker.bootstrap,
        topic_prefix=topics,
        databases=service_databases,
        data_dir=tmp_path,
    )
    try:
        started = time.monotonic()
        await platform.start()
        print(f"platform up after {time.monotonic() - started:.1f} s")
        progress = Progress()
        intake_url = platform["intake"].base_url

        async def flow(group: list[Family]) -> None:
            async with httpx.AsyncClient() as client:
                for family in group:
                    await progress.one_more()
                    await register(client, intake_url, family)

        # Two clinics registering at once, so kills land between and inside requests.
        await asyncio.wait_for(
            asyncio.gather(
                flow(families[0::2]), flow(families[1::2]), chaos(platform, plan, progress)
            ),
            timeout=90,
        )
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
        findings = await check_topics(families, broker.bootstrap, topics)
        assert findings, describe(findings, fault_seed)
        for service in platform.services.values():
            assert service.starts >= 2, f"{service.name} was never killed"
    except BaseException:
        for service in platform.services.values():
            print(f"--- {service.name} log ---\n{service.tail()}")
        raise
    finally:
        await asyncio.to_thread(platform.stop)
