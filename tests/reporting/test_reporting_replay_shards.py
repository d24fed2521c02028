"""A rebuild shared by processes (``replay.Shard``): every record falls to exactly one shard,
the shards' cells add up to one process's, and the projections and figures it leaves are
the live consumer's. When a family's events (or copies of one event) come under different
record keys, the shards would judge them apart: the rebuild is then done by one process."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import multiprocessing
import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from aiokafka import ConsumerRecord
from fastapi.testclient import TestClient
from lotse_contracts.events.intake import FamilyRegistered
from lotse_contracts.events.referrals import ReferralAccepted
from lotse_reporting import domain
from lotse_reporting.app import create_app
from lotse_reporting.replay import SHARD_BUCKETS, Shard, ShardFailed, ShardProcess, replay
from lotse_reporting.replay_cells import merge_cells, sum_families

from tests.conftest import Broker
from tests.reporting.builders import Published, at, publish, random_city, to_records
from tests.reporting.conftest import runtime_of, settings_for, settle, wait_ready
from tests.reporting.replay_data import dortmund_rules, mixed_events
from tests.reporting.test_reporting_replay import BEZIRKE, dataset, poison, snapshot


def _record(key: bytes | None) -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord("t", 0, 0, 0, 0, key, b"", None, 0, 0, [])


@pytest.mark.parametrize("count", [1, 2, 3, 4])
def test_every_record_falls_to_exactly_one_shard(count: int) -> None:
    shards = Shard.split(count)
    assert [s.index for s in shards] == list(range(count))
    assert shards[0].low == 0
    assert shards[-1].high == SHARD_BUCKETS
    assert all(a.high == b.low for a, b in itertools.pairwise(shards))
    rng = random.Random(count)
    records = [_record(None)] + [_record(rng.randbytes(16).hex().encode()) for _ in range(2000)]
    taken = [shard.take(records) for shard in shards]
    assert sorted(id(r) for part in taken for r in part) == sorted(id(r) for r in records)
    assert records[0] in taken[0]  # no key: the coordinator's
    if count > 1:
        # The coordinator starts at once; the others first load an interpreter.
        assert len(taken[0]) > max(len(part) for part in taken[1:])
        assert all(len(part) > 0.6 * len(records) / count for part in taken[1:])


def test_the_cells_of_two_sets_of_families_add_up_to_those_of_all() -> None:
    rules = dortmund_rules()
    whole = domain.Snapshot()
    for event in mixed_events():
        with contextlib.suppress(domain.ImpossibleEvent):
            domain.apply(event, whole, rules)
    halves = (domain.Snapshot(), domain.Snapshot())

    def half(case_id: str) -> domain.Snapshot:
        return halves[hash(case_id) % 2]

    for case_id, case in whole.cases.items():
        half(case_id).cases[case_id] = case
    for fact_key, fact in whole.facts.items():
        half(fact.case_id).facts[fact_key] = fact
    for consent_key, consent in whole.consents.items():
        half(consent.case_id).consents[consent_key] = consent
    for referral_id, referral in whole.referrals.items():
        half(referral.case_id).referrals[referral_id] = referral
    expected = sum_families(whole, rules.zone)
    first, second = (sum_families(h, rules.zone) for h in halves)
    assert first
    assert second
    shared = first.keys() & second.keys()
    assert any(key[2] == domain.STOCK_DELTA for key in shared)
    assert merge_cells(first, second) == expected


def _live(broker: Broker, topics: str, url: str, records: list[Published]) -> tuple[int, int]:
    """The live consumer over the records: (applied, duplicates)."""
    settings = settings_for(broker, topics, url)
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        publish(broker.bootstrap, records)
        settle(client, len(records), timeout_s=180)
        consumer = runtime_of(client).consumers[0]
        return consumer.processed, consumer.duplicates


@pytest.mark.integration
def test_a_replay_shared_by_two_processes_rebuilds_the_live_figures(
    broker: Broker, topics: str, sqlite_url: str
) -> None:
    records, redelivered, impossible = dataset(topics, seed=17)
    malformed, invalid = poison(topics, 29)
    records = records[:150] + malformed + records[150:]
    applied, duplicates = _live(broker, topics, sqlite_url, records)
    live = asyncio.run(snapshot(sqlite_url))

    settings = settings_for(broker, topics, sqlite_url)
    stats = asyncio.run(replay(settings, idle_timeout_s=2.0, workers=2))
    assert stats.processes == 2
    assert stats.records == len(records)
    assert (stats.applied, stats.duplicates) == (applied, duplicates)
    assert duplicates == redelivered
    assert sum(stats.rejected.values()) == impossible
    assert stats.invalid == invalid  # by verdict kind, counted by whichever shard read them
    assert stats.cells_published == 0  # nothing differs from what the stream says
    assert asyncio.run(snapshot(sqlite_url)) == live


def _key_of_other_shard(key: bytes) -> bytes:
    """A key that falls to the other of two shards than ``key``."""
    shards = Shard.split(2)
    mine = next(s for s in shards if s.take([_record(key)]))
    for n in range(10_000):
        other = f"elsewhere-{n}".encode()
        if not mine.take([_record(other)]):
            return other
    raise AssertionError("no key of the other shard")


@pytest.mark.integration
def test_a_family_under_two_keys_is_rebuilt_by_one_process(
    broker: Broker, topics: str, sqlite_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """One event of a family (and a copy of another) under a key of the other shard: the
    live consumer does not look at keys, so the rebuild must not either."""
    records, _, _ = dataset(topics, seed=19)
    counts = Counter(r.key for r in records if r.key is not None)
    family = next(key for key, n in counts.most_common() if n >= 3)
    mine = [i for i, r in enumerate(records) if r.key == family]
    moved = records[mine[1]]
    records[mine[1]] = Published(
        moved.topic, _key_of_other_shard(family), moved.value, moved.headers
    )
    copied = records[mine[2]]
    records.append(
        Published(copied.topic, _key_of_other_shard(family), copied.value, copied.headers)
    )
    applied, duplicates = _live(broker, topics, sqlite_url, records)
    live = asyncio.run(snapshot(sqlite_url))

    settings = settings_for(broker, topics, sqlite_url)
    stats = asyncio.run(replay(settings, idle_timeout_s=2.0, workers=2))
    assert stats.processes == 1  # the shards overlapped: done again by one process
    assert "whose key is not their event's subject" in caplog.text
    assert (stats.applied, stats.duplicates) == (applied, duplicates)
    assert asyncio.run(snapshot(sqlite_url)) == live


@pytest.mark.integration
def test_an_event_naming_another_familys_referral_is_rebuilt_by_one_process(
    broker: Broker, topics: str, sqlite_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A referral answer under the subject (and key) of one family naming the referral of a
    family in the other shard: each shard alone would judge it without that referral. (Such
    an event makes the outcome depend on the order the topics are read in, so the reference
    here is one process's replay, not the live consumer's.)"""
    events = random_city(random.Random(23), 60, BEZIRKE, at("2024-11-04").date())
    answered = next(e for e in events if isinstance(e, ReferralAccepted))
    shards = Shard.split(2)

    def shard_of(case_id: str) -> int:
        return next(s.index for s in shards if s.take([_record(case_id.encode())]))

    other = next(
        e.case_id
        for e in events
        if isinstance(e, FamilyRegistered) and shard_of(e.case_id) != shard_of(answered.case_id)
    )
    forged = answered.model_copy(update={"case_id": other})
    publish(broker.bootstrap, to_records([*events, forged], topics))
    settings = settings_for(broker, topics, sqlite_url)
    alone = asyncio.run(replay(settings, idle_timeout_s=2.0))
    one = asyncio.run(snapshot(sqlite_url))
    assert "named in two shards" not in caplog.text

    stats = asyncio.run(replay(settings, idle_timeout_s=2.0, workers=2))
    assert stats.processes == 1
    assert "named in two shards" in caplog.text
    assert (stats.applied, stats.duplicates, stats.rejected) == (
        alone.applied,
        alone.duplicates,
        alone.rejected,
    )
    assert asyncio.run(snapshot(sqlite_url)) == one


def _exit_badly() -> None:
    raise SystemExit(3)


@pytest.mark.integration
def test_a_shard_whose_process_fails_leaves_nothing_applied(
    broker: Broker, topics: str, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rebuild's transaction rolls back: the projections stay dropped and empty (a
    replay that fails is run again), nothing is published."""
    records, _, _ = dataset(topics, seed=41)
    publish(broker.bootstrap, records)

    def failing(
        cls: type[ShardProcess], settings: Any, shard: Shard, directory: Path, *_: Any
    ) -> ShardProcess:
        process = multiprocessing.get_context("spawn").Process(target=_exit_badly)
        process.start()
        return cls(shard, directory / "shard.sqlite", process)

    monkeypatch.setattr(ShardProcess, "start", classmethod(failing))
    settings = settings_for(broker, topics, sqlite_url)
    with pytest.raises(ShardFailed, match="exited with 3"):
        asyncio.run(replay(settings, idle_timeout_s=2.0, workers=2))
    cells, facts, inbox = asyncio.run(snapshot(sqlite_url))
    assert (cells, inbox) == ({}, 0)
    assert all(rows == [] for rows in facts.values())
