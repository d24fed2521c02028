"""Readiness's broker check keeps one admin client across probes (a client per probe was most
of what a probed idle service cost) and starts afresh after a failed probe."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import pytest
from aiokafka.errors import KafkaConnectionError
from lotse_runtime.app import build_runtime
from lotse_runtime.settings import ServiceSettings
from lotse_tooling.embedded import free_port

from tests.conftest import Broker

pytestmark = pytest.mark.integration


class ProbeSettings(ServiceSettings):
    service_name: ClassVar[str] = "probe"


def _settings(bootstrap: str, tmp_path: Path) -> ProbeSettings:
    return ProbeSettings(
        kafka_bootstrap=bootstrap,
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'probe.db'}",
        data_dir=tmp_path,
    )


async def test_probes_share_one_admin_client(broker: Broker, tmp_path: Path) -> None:
    runtime = build_runtime(_settings(broker.bootstrap, tmp_path))
    runtime.kafka_started.set()
    try:
        await runtime.check_broker()
        first = runtime._broker_admin
        assert first is not None
        await runtime.check_broker()
        assert runtime._broker_admin is first
    finally:
        await runtime.close_broker_check()
        await runtime.db.dispose()
    assert runtime._broker_admin is None


async def test_a_failed_probe_drops_its_client(tmp_path: Path) -> None:
    # Nothing listens there: the probe fails, and keeps no half-started client.
    runtime = build_runtime(_settings(f"127.0.0.1:{free_port()}", tmp_path))
    runtime.kafka_started.set()
    try:
        with pytest.raises(KafkaConnectionError):
            await runtime.check_broker()
        assert runtime._broker_admin is None
    finally:
        await runtime.db.dispose()
