"""Leases of run-once jobs (lotse_runtime.lease): on PostgreSQL two replicas ask, one holds;
when the holder dies (its process killed, or its database session ended) the other takes
over at its next try, and the one that lost it does not run on; on SQLite the one process
holds every lease. Jobs declared ``once=True`` run on the holder only, and ``GET /jobs``
names the holder on every replica."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest
from lotse_runtime.app import ServiceRuntime, create_service_app
from lotse_runtime.db import Database
from lotse_runtime.lease import LeaseKeeper, lease_key
from lotse_runtime.settings import ServiceSettings
from lotse_runtime.telemetry import Telemetry, TelemetryConfig, setup_telemetry
from lotse_runtime.testing import without_broker
from lotse_tooling.embedded import free_port
from sqlalchemy import text
from sqlalchemy.engine import make_url

from tests.support import eventually

pytestmark = pytest.mark.integration


class LeaseProbeSettings(ServiceSettings):
    service_name: ClassVar[str] = "probe"


@asynccontextmanager
async def keepers(url: str, *replicas: str) -> AsyncIterator[list[LeaseKeeper]]:
    """One keeper per replica name, each with a database engine of its own (as replicas)."""
    databases = [Database(url) for _ in replicas]
    found = [
        LeaseKeeper(db, service="probe", replica=name)
        for db, name in zip(databases, replicas, strict=True)
    ]
    try:
        yield found
    finally:
        for keeper in found:
            await keeper.close()
        for db in databases:
            await db.dispose()


async def test_of_two_replicas_one_holds_until_it_lets_go(postgres_url: str) -> None:
    async with keepers(postgres_url, "pod-a", "pod-b") as (a, b):
        assert await a.hold("overdue")
        assert not await b.hold("overdue")
        assert await a.hold("overdue")  # still ours; asking again changes nothing
        # Leases are per job: another job is free for the other replica.
        assert await b.hold("escalation")
        assert a.held() == {"overdue"}
        assert b.held() == {"escalation"}
        for keeper in (a, b):
            seen = {h.name: h.holder for h in await keeper.holders(["overdue", "escalation"])}
            assert seen == {"overdue": "pod-a", "escalation": "pod-b"}

        await a.release("overdue")
        assert a.held() == frozenset()
        assert await b.hold("overdue")
        assert not await a.hold("overdue")
        await b.close()  # a clean stop gives up every lease at once
        assert await a.hold("overdue")
        assert await a.hold("escalation")


async def test_the_same_job_of_another_service_is_another_lease(postgres_url: str) -> None:
    assert lease_key("visits", "retention") != lease_key("intake", "retention")
    db = Database(postgres_url)
    try:
        visits = LeaseKeeper(db, service="visits", replica="v")
        intake = LeaseKeeper(db, service="intake", replica="i")
        assert await visits.hold("retention")
        assert await intake.hold("retention")
        await visits.close()
        await intake.close()
    finally:
        await db.dispose()


HOLDER = textwrap.dedent(
    """
    import asyncio, sys
    import asyncpg

    async def main():
        conn = await asyncpg.connect(sys.argv[1])
        await conn.execute("SELECT set_config('application_name', $1, false)", sys.argv[3])
        got = await conn.fetchval("SELECT pg_try_advisory_lock($1)", int(sys.argv[2]))
        print("held" if got else "refused", flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main())
    """
)


async def test_when_the_holder_is_killed_the_other_replica_takes_over(postgres_url: str) -> None:
    plain = make_url(postgres_url).set(drivername="postgresql").render_as_string(False)
    holder = subprocess.Popen(  # noqa: ASYNC220 - started once, read on a thread
        [
            sys.executable,
            "-c",
            HOLDER,
            plain,
            str(lease_key("probe", "overdue")),
            "lotse-probe lease pod-dying",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        line = await asyncio.to_thread(holder.stdout.readline)
        assert line.strip() == "held"
        async with keepers(postgres_url, "pod-b") as (b,):
            assert not await b.hold("overdue")
            [seen] = await b.holders(["overdue"])
            assert seen.holder == "pod-dying"
            assert not seen.held_here

            os.kill(holder.pid, signal.SIGKILL)  # no clean-up runs in the holder
            await asyncio.to_thread(holder.wait, 10)

            await eventually(lambda: b.hold("overdue"), timeout_s=20, interval_s=0.1)
            [seen] = await b.holders(["overdue"])
            assert (seen.holder, seen.held_here) == ("pod-b", True)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(10)


async def test_a_replica_whose_session_ended_gives_the_lease_up(postgres_url: str) -> None:
    """The database ended the holder's session (restart, admin): the other replica takes the
    lease, and the old holder, asking at its next tick, learns it is a standby now."""
    async with keepers(postgres_url, "pod-a", "pod-b") as (a, b):
        assert await a.hold("overdue")
        async with a.db.engine.connect() as admin:
            ended = await admin.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE application_name = :n"
                ),
                {"n": a.application_name},
            )
            assert ended.scalars().all() == [True]
        await eventually(lambda: b.hold("overdue"), timeout_s=20, interval_s=0.1)
        assert not await a.hold("overdue")
        assert a.held() == frozenset()


async def test_on_sqlite_the_one_process_holds_every_lease(sqlite_url: str) -> None:
    async with keepers(sqlite_url, "only") as (keeper,):
        assert await keeper.hold("overdue")
        assert await keeper.hold("retention")
        seen = await keeper.holders(["overdue", "retention"])
        assert [(h.holder, h.held_here) for h in seen] == [("only", True), ("only", True)]


# -- jobs on two replicas ------------------------------------------------------------------------


def _probe_app(
    url: str, tmp_path: Path, ran: list[str], replica: str, telemetry: Telemetry | None = None
) -> Any:
    settings = LeaseProbeSettings(
        kafka_bootstrap=f"127.0.0.1:{free_port()}",
        database_url=url,
        data_dir=tmp_path / replica,
    )

    async def tick(_runtime: ServiceRuntime[Any]) -> None:
        ran.append(replica)

    def wire(runtime: ServiceRuntime[Any]) -> None:
        runtime.leases.replica = replica
        runtime.add_job("once", 0.02, tick, once=True)
        runtime.add_job("everywhere", 0.02, tick_everywhere)

    async def tick_everywhere(_runtime: ServiceRuntime[Any]) -> None:
        pass

    return create_service_app(
        settings, title="probe", description="", wire=wire, telemetry=telemetry
    )


async def _jobs(app: Any) -> dict[str, Any]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://probe") as client:
        answer = await client.get("/jobs")
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


async def test_a_run_once_job_runs_on_the_lease_holder_only_and_moves_when_it_stops(
    postgres_url: str, tmp_path: Path
) -> None:
    ran: list[str] = []
    telemetry = {
        name: setup_telemetry(TelemetryConfig(service_name="probe", in_memory=True))
        for name in ("pod-a", "pod-b")
    }
    apps = {
        name: _probe_app(postgres_url, tmp_path, ran, name, telemetry[name])
        for name in ("pod-a", "pod-b")
    }
    stacks = {name: AsyncExitStack() for name in apps}
    try:
        runtimes = {
            name: await stacks[name].enter_async_context(without_broker(app))
            for name, app in apps.items()
        }
        await eventually(
            lambda: (
                len(ran) >= 10
                and all(r.jobs[0].runs + r.jobs[0].standby >= 5 for r in runtimes.values())
            ),
            timeout_s=20,
        )
        # Whoever won the first tick keeps the lease; the other only stands by.
        holder = ran[0]
        other = "pod-b" if holder == "pod-a" else "pod-a"
        assert set(ran) == {holder}
        assert runtimes[other].jobs[0].runs == 0
        for name, app in apps.items():
            view = await _jobs(app)
            assert view["replica"] == name
            by_name = {job["name"]: job for job in view["jobs"]}
            assert by_name["once"]["holder"] == holder
            assert by_name["once"]["held_here"] == (name == holder)
            assert (by_name["once"]["standby"] == 0) == (name == holder)
            assert by_name["everywhere"]["once"] is False
            assert by_name["everywhere"]["holder"] == name
            # The metrics say the same: the lease gauge is 1 on the holder only, and the
            # other replica's ticks of the job are standby ticks.
            held = _points(telemetry[name], "lotse.job.lease.held")
            assert [(p.attributes["job"], p.value) for p in held] == [
                ("once", 1 if name == holder else 0)
            ]
            ticks = {
                (p.attributes["job"], p.attributes["outcome"]): p.value
                for p in _points(telemetry[name], "lotse.job.ticks")
            }
            assert (("once", "standby") in ticks) == (name != holder)
            assert (("once", "ok") in ticks) == (name == holder)

        # The holder stops (a rolling update): the other replica carries on at its next tick.
        await stacks[holder].aclose()
        before = len(ran)
        await eventually(lambda: ran[before:].count(other) >= 5, timeout_s=20)
        assert holder not in ran[before:]
        view = await _jobs(apps[other])
        [once] = [job for job in view["jobs"] if job["name"] == "once"]
        assert (once["holder"], once["held_here"]) == (other, True)
    finally:
        for stack in stacks.values():
            await stack.aclose()
        for each in telemetry.values():
            each.shutdown()


def _points(telemetry: Telemetry, name: str) -> list[Any]:
    reader = telemetry.metric_reader
    assert reader is not None
    data = reader.get_metrics_data()
    if data is None:
        return []
    return [
        point
        for resource_metrics in data.resource_metrics
        for scope_metrics in resource_metrics.scope_metrics
        for metric in scope_metrics.metrics
        if metric.name == name
        for point in metric.data.data_points
    ]


async def test_a_run_once_job_runs_on_sqlite(sqlite_url: str, tmp_path: Path) -> None:
    ran: list[str] = []
    app = _probe_app(sqlite_url, tmp_path, ran, "only")
    async with without_broker(app):
        await eventually(lambda: len(ran) >= 3, timeout_s=20)
        view = await _jobs(app)
    [once] = [job for job in view["jobs"] if job["name"] == "once"]
    assert (once["holder"], once["held_here"], once["standby"]) == ("only", True, 0)
    assert once["runs"] >= 3


def test_a_job_name_is_one_lease_so_it_may_be_registered_once(tmp_path: Path) -> None:
    async def tick(_runtime: ServiceRuntime[Any]) -> None:
        pass

    def wire(runtime: ServiceRuntime[Any]) -> None:
        runtime.add_job("overdue", 1.0, tick, once=True)
        runtime.add_job("overdue", 1.0, tick, once=True)

    settings = LeaseProbeSettings(
        kafka_bootstrap=f"127.0.0.1:{free_port()}",
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'p.db'}",
        data_dir=tmp_path,
    )
    with pytest.raises(ValueError, match="'overdue' is registered twice"):
        create_service_app(settings, title="probe", description="", wire=wire)
