"""The embedded broker helper: starts, answers, stops, and says clearly why it cannot."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from lotse_runtime.kafka import KafkaConfig, TopicSpec, ensure_topics
from lotse_tooling import embedded
from lotse_tooling.embedded import BrokerStartError, EmbeddedBroker, free_port

pytestmark = pytest.mark.integration


def answers(bootstrap: str) -> bool:
    host, port = bootstrap.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=0.5):
            return True
    except OSError:
        return False


async def test_starts_on_a_free_port_serves_kafka_and_stops(tmp_path: Path) -> None:
    broker = EmbeddedBroker(log_path=tmp_path / "tansu.log")
    bootstrap = broker.start()
    try:
        assert broker.running
        assert answers(bootstrap)
        config = KafkaConfig(bootstrap=bootstrap)
        created = await ensure_topics(config, [TopicSpec("probe", partitions=3)])
        assert created == ["probe"]
        assert await ensure_topics(config, [TopicSpec("probe", partitions=3)]) == []
    finally:
        broker.stop()
    assert not broker.running
    assert not answers(bootstrap)


def test_port_in_use_is_refused_with_a_clear_reason() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(BrokerStartError, match=f"port 127.0.0.1:{port} is already in use"):
            EmbeddedBroker(port=port).start()


def test_missing_binary_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing() -> Path:
        raise BrokerStartError("broker binary /nowhere/tansu does not exist")

    monkeypatch.setattr(embedded, "broker_binary", missing)
    with pytest.raises(BrokerStartError, match="does not exist"):
        EmbeddedBroker(port=free_port()).start()


def test_a_broker_that_exits_at_once_is_reported(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake = tmp_path / "tansu"
    fake.write_text("#!/bin/sh\necho 'Address already in use' >&2\nexit 0\n")
    fake.chmod(0o755)
    monkeypatch.setattr(embedded, "broker_binary", lambda: fake)
    with pytest.raises(BrokerStartError, match="exited with status 0") as caught:
        EmbeddedBroker(port=free_port()).start()
    assert "Address already in use" in str(caught.value)
