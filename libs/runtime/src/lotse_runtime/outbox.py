"""Transactional outbox and its relay.

A service adds events to the outbox in the same database transaction as the state change
that caused them; the relay publishes committed rows in id order with acks=all and marks
them sent. A crash between publishing and marking re-publishes the row on the next pass, so
delivery is at-least-once with a stable CloudEvents id; consumers dedupe with the inbox.

Audience routing happens here, in the producing service: the subscription registry says
which feeds an event also goes to and which fields they may see, and each projected copy
becomes an outbox row of its own in the same transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import zlib
from collections.abc import Callable, Collection, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from aiokafka import AIOKafkaProducer
from lotse_contracts.cloudevents import CloudEvent, to_kafka_binary
from lotse_contracts.events.base import EventModel
from lotse_contracts.subscriptions import SubscriptionRegistry
from sqlalchemy import (
    Column,
    LargeBinary,
    Table,
    Text,
    Update,
    bindparam,
    delete,
    func,
    select,
    text,
    update,
)
from sqlalchemy import event as sa_event
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlalchemy.orm import Session
from sqlmodel import Field, SQLModel, col

from lotse_runtime.db import Database, insert_at_commit, one_of
from lotse_runtime.kafka import KafkaConfig
from lotse_runtime.stopping import cancel_within, within
from lotse_runtime.telemetry import Telemetry, inject_headers

_log = logging.getLogger(__name__)


def _utcnow() -> datetime:
    return datetime.now(UTC)


class OutboxMessage(SQLModel, table=True):
    """One Kafka record waiting to be (or already) published."""

    __tablename__ = "outbox"

    id: int | None = Field(default=None, primary_key=True)
    topic: str = Field(index=False, description="Topic on the cluster (prefix applied).")
    record_key: str | None = Field(default=None, description="Kafka key: the case id.")
    value: bytes | None = Field(default=None, sa_column=Column(LargeBinary, nullable=True))
    headers: str = Field(sa_column=Column(Text, nullable=False), description="JSON [[k, v]].")
    event_id: str = Field(description="CloudEvents id, for tracing a row to its event.")
    event_type: str
    created_at: datetime = Field(default_factory=_utcnow)
    sent_at: datetime | None = Field(default=None, index=True)


_OUTBOX: Table = OutboxMessage.__table__  # type: ignore[attr-defined]


def _encode_headers(headers: Sequence[tuple[str, bytes]]) -> str:
    return json.dumps([[name, value.decode("utf-8")] for name, value in headers])


def _decode_headers(raw: str) -> list[tuple[str, bytes]]:
    return [(name, value.encode("utf-8")) for name, value in json.loads(raw)]


class Outbox:
    """Adds events, and their audience copies, to the caller's transaction."""

    def __init__(
        self,
        *,
        source: str,
        topic_prefix: str = "",
        registry: SubscriptionRegistry | None = None,
        on_commit: Callable[[], None] | None = None,
        schema_base: str | None = None,
        leading: Callable[[], bool] | None = None,
    ) -> None:
        self.source = source
        #: The contracts base URL: each event's dataschema is an absolute URI below it.
        self.schema_base = schema_base
        self.topic_prefix = topic_prefix
        self.registry = registry
        self._on_commit = on_commit
        #: Whether this process's relay holds the relays' lock (``OutboxRelay.leading``).
        self._leading = leading

    def notify(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` after each commit that added events (wakes the relay)."""
        self._on_commit = callback

    def _leads(self) -> bool:
        """Whether this process's own relay publishes: only the lock's holder listens for
        the NOTIFY, and the commit wakes it in-process already, so the NOTIFY (a round trip
        per transaction) is left out. Should the lock have gone to another replica unnoticed,
        that one still finds the rows on its next wake or poll."""
        return self._leading is not None and self._leading()

    def add(
        self,
        session: AsyncSession,
        event: EventModel,
        *,
        event_id: str | None = None,
        time: datetime | None = None,
        audiences_only: bool = False,
    ) -> CloudEvent:
        """Add an event for its domain topic and every audience feed the registry names
        (``audiences_only``: for the feeds only, e.g. a notice to one partner that is no
        fact of the domain).

        Raises ``RoutingError`` when the registry cannot place a routed event; the caller's
        transaction then fails and nothing is stored.
        """
        # A model built with model_copy(update=...) or model_construct skips validation: check
        # again here, so that no service can publish what its own contract forbids.
        type(event).model_validate(event.model_dump())
        cloudevent = event.to_cloudevent(
            event_id=event_id, time=time, source=self.source, schema_base=self.schema_base
        )
        self.add_cloudevent(session, cloudevent, None if audiences_only else type(event).topic)
        return cloudevent

    def add_cloudevent(self, session: AsyncSession, event: CloudEvent, topic: str | None) -> None:
        """Add an already-built CloudEvent (e.g. a re-published one) for ``topic`` (None:
        only for the audience feeds)."""
        trace = inject_headers()
        copies = [] if topic is None else [(topic, event)]
        if self.registry is not None:
            copies.extend(self.registry.route(event))
        for target, copy in copies:
            record = to_kafka_binary(copy, extra_headers=trace)
            insert_at_commit(
                session,
                _OUTBOX,
                {
                    "topic": self.topic_prefix + target,
                    "record_key": record.key.decode() if record.key is not None else None,
                    "value": record.value,
                    "headers": _encode_headers(record.headers),
                    "event_id": event.id,
                    "event_type": event.type,
                    "created_at": _utcnow(),
                    "sent_at": None,
                },
            )
        self._wake_after_commit(session)

    def add_records(self, session: AsyncSession, rows: Iterable[dict[str, Any]]) -> None:
        """Add outbox rows built by the caller (``kpi-updated`` records from plain values,
        say) for their topics: each row names its topic (with the prefix), key, value, headers
        (as the outbox stores them), event id and type. No audience copies are made, so an
        event type the registry routes is refused (:meth:`add_cloudevent` routes it)."""
        routed = set(self.registry.routed_types()) if self.registry is not None else set()
        for row in rows:
            if row["event_type"] in routed:
                raise ValueError(f"{row['event_type']} has audience copies: add it as an event")
            insert_at_commit(session, _OUTBOX, row)
        self._wake_after_commit(session)

    def _wake_after_commit(self, session: AsyncSession) -> None:
        sync_session = session.sync_session
        if self._on_commit is not None:
            if not sa_event.contains(sync_session, "after_commit", _wake_once):
                sa_event.listen(sync_session, "after_commit", _wake_once)
            sync_session.info["lotse_outbox_wake"] = self._on_commit
        bind = sync_session.bind
        if bind is not None and bind.dialect.name == "postgresql" and not self._leads():
            # The relay may run in another replica: PostgreSQL tells it on commit.
            if not sa_event.contains(sync_session, "before_commit", _notify_once):
                sa_event.listen(sync_session, "before_commit", _notify_once)
            sync_session.info["lotse_outbox_notify"] = True


NOTIFY_CHANNEL = "lotse_outbox"
"""PostgreSQL channel on which a commit that added outbox rows wakes the relay (whichever
process holds the relay's lock); each service has a database of its own."""


def _wake_once(session: Any) -> None:
    callback = session.info.pop("lotse_outbox_wake", None)
    if callback is not None:
        callback()


def _notify_once(session: Session) -> None:
    # NOTIFY is transactional: delivered when (and only if) this transaction commits.
    if session.info.pop("lotse_outbox_notify", False):
        session.execute(text(f"NOTIFY {NOTIFY_CHANNEL}"))


class OutboxRelay:
    """Publishes committed outbox rows in id order and marks them sent.

    One relay per service database publishes at a time: on PostgreSQL the relay holds an
    advisory lock on a connection of its own, so extra replicas stand by instead of
    reordering events; SQLite is embedded and single-process by nature.
    """

    def __init__(
        self,
        db: Database,
        kafka: KafkaConfig,
        *,
        service: str,
        telemetry: Telemetry | None = None,
        batch_size: int = 200,
        poll_interval_s: float = 5.0,
        retention: timedelta = timedelta(days=7),
    ) -> None:
        self.db = db
        self.kafka = kafka
        self.service = service
        self.telemetry = telemetry
        self.batch_size = batch_size
        self.poll_interval_s = poll_interval_s
        self.retention = retention
        self._last_prune = 0.0
        self.backlog = 0
        self.published = 0
        self.last_error: str | None = None
        self._wake = asyncio.Event()
        self._pass_lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._producer: AIOKafkaProducer | None = None
        self._leader: AsyncConnection | None = None
        self._lock_key = zlib.crc32(f"lotse-outbox-{service}".encode())
        if telemetry is not None:
            telemetry.observe_outbox_backlog(lambda: self.backlog)

    def wake(self) -> None:
        self._wake.set()

    def leading(self) -> bool:
        """Whether this relay holds the relays' lock on PostgreSQL."""
        return self._leader is not None

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"outbox-relay-{self.service}")

    async def stop(self) -> None:
        await cancel_within(self._task, "outbox relay")
        self._task = None
        if self._producer is not None:
            await within(self._producer.stop(), "outbox relay: producer.stop")
            self._producer = None
        await within(self._release_leadership(), "outbox relay: leadership")

    async def _run(self) -> None:
        delay = self.poll_interval_s
        while True:
            try:
                sent = await self.publish_pending()
                await self._prune_now_and_then()
                self.last_error = None
                delay = self.poll_interval_s
                if sent >= self.batch_size:
                    continue  # more is waiting: no pause
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                _log.warning("outbox relay pass failed", extra={"error": self.last_error})
                await self._reset_producer()
                delay = min(delay * 2, 10.0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=delay)
            self._wake.clear()

    async def _producer_ready(self) -> AIOKafkaProducer:
        if self._producer is None:
            producer = self.kafka.producer()
            try:
                await producer.start()
            except BaseException:
                await producer.stop()  # a half-started client still holds a connection
                raise
            self._producer = producer
        return self._producer

    async def _reset_producer(self) -> None:
        if self._producer is not None:
            with contextlib.suppress(Exception):
                await self._producer.stop()
            self._producer = None

    async def _is_leader(self) -> bool:
        if not self.db.is_postgres:
            return True
        if self._leader is not None:
            try:
                await self._leader.execute(text("SELECT 1"))
                return True
            except Exception:
                await self._release_leadership()
        # Autocommit: the lock is the session's, and notifications reach a connection only
        # between transactions.
        conn = await (await self.db.engine.connect()).execution_options(
            isolation_level="AUTOCOMMIT"
        )
        got = (
            await conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": self._lock_key})
        ).scalar()
        if not got:
            await conn.close()
            return False
        driver = (await conn.get_raw_connection()).driver_connection
        assert driver is not None
        await driver.add_listener(NOTIFY_CHANNEL, self._notified)
        self._leader = conn
        return True

    def _notified(self, *_args: Any) -> None:
        self.wake()

    async def _release_leadership(self) -> None:
        if self._leader is not None:
            # Closed for good, not returned to the pool: ending the database session releases
            # the advisory lock and the listener with it.
            with contextlib.suppress(Exception):
                await self._leader.invalidate()
            with contextlib.suppress(Exception):
                await self._leader.close()
            self._leader = None

    async def publish_pending(self) -> int:
        """One pass: publish up to ``batch_size`` unsent rows in order; returns how many."""
        # The loop and a drain (shutdown, tests) must not publish the same rows side by side.
        async with self._pass_lock:
            return await self._publish_pending()

    async def _publish_pending(self) -> int:
        if not await self._is_leader():
            return 0
        # A single statement outside a transaction: on SQLite it reads the last committed
        # state without taking the write lock that requests and consumers queue for.
        async with self.db.autocommit() as conn:
            rows = (
                await conn.execute(
                    select(_OUTBOX)
                    .where(_OUTBOX.c.sent_at.is_(None))
                    .order_by(_OUTBOX.c.id)
                    .limit(self.batch_size)
                )
            ).all()
        if not rows:
            self.backlog = 0
            return 0
        producer = await self._producer_ready()
        futures = []
        for row in rows:
            futures.append(
                await producer.send(
                    row.topic,
                    value=row.value,
                    key=row.record_key.encode() if row.record_key is not None else None,
                    headers=_decode_headers(row.headers),
                )
            )
        delivered: list[int] = []
        failure: BaseException | None = None
        for row, future in zip(rows, futures, strict=True):
            try:
                await future
            except Exception as exc:
                # Rows after the first failure stay unsent and go again, in order, next pass.
                failure = exc
                break
            delivered.append(row.id)
        if delivered:
            await self._mark_sent(delivered)
            self.published += len(delivered)
            if self.telemetry is not None:
                for row in rows[: len(delivered)]:
                    self.telemetry.count_published(row.topic)
        if len(rows) < self.batch_size:
            self.backlog = len(rows) - len(delivered)
        else:
            await self._update_backlog()
        if failure is not None:
            raise failure
        return len(delivered)

    async def _mark_sent(self, ids: list[int]) -> None:
        # One statement, committed on its own: the write lock is held for the UPDATE only.
        async with self.db.autocommit() as conn:
            await conn.execute(
                _mark_sent_statement(self.db.is_postgres), {"ids": ids, "sent_at": _utcnow()}
            )

    async def _prune_now_and_then(self) -> None:
        # Sent rows stay a while for diagnosis and replay of a lost topic, then go.
        now = asyncio.get_running_loop().time()
        if now - self._last_prune < 600:
            return
        self._last_prune = now
        await self.prune_sent(_utcnow() - self.retention)

    async def prune_sent(self, before: datetime) -> int:
        """Delete rows sent before ``before``; returns how many."""
        async with self.db.transaction() as session:
            result = await session.execute(
                delete(OutboxMessage).where(
                    col(OutboxMessage.sent_at).is_not(None),
                    col(OutboxMessage.sent_at) < before,
                )
            )
        return int(getattr(result, "rowcount", 0) or 0)

    async def _update_backlog(self) -> None:
        async with self.db.autocommit() as conn:
            count = await conn.scalar(
                select(func.count()).select_from(_OUTBOX).where(_OUTBOX.c.sent_at.is_(None))
            )
        self.backlog = int(count or 0)

    async def drain(self, timeout_s: float = 10.0) -> None:
        """Publish until nothing is pending (tests and shutdown)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            await self.publish_pending()
            if self.backlog == 0:
                return
            if loop.time() > deadline:
                raise TimeoutError(f"outbox still holds {self.backlog} unsent rows")
            await asyncio.sleep(0.05)


# Longer than 60 lines on purpose: an operator's one-shot: checks, selection and the publishing
# loop read in order.
async def republish(
    db: Database,
    kafka: KafkaConfig,
    *,
    since: datetime,
    until: datetime | None = None,
    topics: Collection[str] = (),
    dry_run: bool = False,
    batch_size: int = 500,
) -> int:
    """Publish the retained outbox rows created at or after ``since`` (and before ``until``)
    once more, in id order, as the relay did: for a broker that lost its data.

    Rows are published whether marked sent or not and are not changed (an unsent row is
    published by the relay as well: consumers' inboxes drop the copy). ``topics`` limits the
    run to rows for these topics (names on the cluster, prefix included). Returns how many
    rows were (or, with ``dry_run``, would be) published. Rows older than the retention of
    sent rows (``retention_outbox_sent_days``) are gone and cannot be republished.
    """
    if since.tzinfo is None or (until is not None and until.tzinfo is None):
        raise ValueError("since and until need a time-zone offset")
    since = since.astimezone(UTC)
    until = until.astimezone(UTC) if until is not None else None
    query = select(OutboxMessage).where(col(OutboxMessage.created_at) >= since)
    if until is not None:
        query = query.where(col(OutboxMessage.created_at) < until)
    if topics:
        query = query.where(col(OutboxMessage.topic).in_(list(topics)))
    producer: AIOKafkaProducer | None = None
    published = 0
    last_id = 0
    try:
        while True:
            async with db.transaction() as session:
                rows = list(
                    (
                        await session.execute(
                            query.where(col(OutboxMessage.id) > last_id)
                            .order_by(col(OutboxMessage.id))
                            .limit(batch_size)
                        )
                    ).scalars()
                )
            if not rows:
                return published
            last_id = rows[-1].id or last_id
            if dry_run:
                published += len(rows)
                continue
            if producer is None:
                producer = kafka.producer()
                await producer.start()
            futures = [
                await producer.send(
                    row.topic,
                    value=row.value,
                    key=row.record_key.encode() if row.record_key is not None else None,
                    headers=_decode_headers(row.headers),
                )
                for row in rows
            ]
            for future in futures:
                await future
                published += 1
    finally:
        if producer is not None:
            await producer.stop()
        _log.info("outbox republished", extra={"rows": published, "since": since.isoformat()})


@functools.cache
def _mark_sent_statement(postgres: bool) -> Update:
    """Built once per dialect; on PostgreSQL the same SQL for any number of rows."""
    return (
        update(_OUTBOX)
        .where(one_of(_OUTBOX.c.id, "ids", postgres=postgres))
        .values(sent_at=bindparam("sent_at"))
    )
