"""Inbox: which events a consumer has already applied.

The entry is written in the same transaction as the handler's effects, so either both
commit or neither does; a redelivered event finds its entry and causes no second effect.
The dedup key is (consumer, CloudEvents source, CloudEvents id).

Each entry also keeps a SHA-256 of the event's type, subject and data (:func:`fingerprint`),
so that a second event with the same source and id tells apart a redelivery (same content:
skipped silently) from a *conflicting duplicate* (other content under an id already used:
dead-lettered, never applied). Entries written before the column existed, or by a bulk
writer that does not fill it, have no fingerprint and count as redeliveries.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import json
import json.encoder
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from lotse_contracts.cloudevents import CloudEvent
from sqlalchemy import Dialect, Select, Table, bindparam, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import Field, SQLModel, col

from lotse_runtime.db import executemany_on_sqlite, insert_at_commit, on_postgres, one_of


def _utcnow() -> datetime:
    return datetime.now(UTC)


class InboxEntry(SQLModel, table=True):
    """One event applied by one consumer."""

    __tablename__ = "inbox"

    consumer: str = Field(primary_key=True, description="Consumer name within the service.")
    source: str = Field(primary_key=True, description="CloudEvents source of the event.")
    event_id: str = Field(primary_key=True, description="CloudEvents id of the event.")
    event_type: str
    topic: str
    partition: int
    offset: int
    processed_at: datetime = Field(default_factory=_utcnow)
    data_sha256: str | None = Field(
        default=None,
        max_length=64,
        description="SHA-256 (hex) of type, subject and data: tells a redelivery from a "
        "conflicting duplicate.",
    )


class Claim(enum.Enum):
    """What :func:`claim` found."""

    new = "new"
    duplicate = "duplicate"
    """Applied before with the same content: a redelivery, skip it."""
    conflict = "conflict"
    """Applied before with other content under the same source and id."""


CONFLICTING_DUPLICATE = "conflicting duplicate"
"""The dead-letter reason of an event whose source and id were applied with other content."""


def fingerprint(event: CloudEvent) -> str:
    """SHA-256 (hex) of the event's type, subject and data in canonical JSON.

    Canonical, so that the same event read in binary or structured mode, or re-serialised
    with other whitespace or key order, has the same fingerprint.
    """
    canonical = _canonical_json()([event.type, event.subject, event.data])
    return hashlib.sha256(canonical.encode()).hexdigest()


@functools.cache
def _canonical_json() -> Callable[[Any], str]:
    """The fingerprint's JSON encoding: ``json.dumps(value, sort_keys=True, separators=(",",
    ":"), ensure_ascii=False, default=str)``.

    Made once from the json module's C encoder where there is one: ``JSONEncoder.encode``
    builds that encoder anew on every call, and its check for circular references keeps a
    dict of every container it passes; event data read from JSON cannot hold a cycle. Together
    that is about a quarter of the fingerprint's time. The output is the same text
    (tests/runtime/test_envelope_equivalence.py)."""
    # Not in typeshed; the json module itself falls back to Python when it is None.
    make: Callable[..., Callable[[Any, int], Sequence[str]]] | None = getattr(
        json.encoder, "c_make_encoder", None
    )
    if make is None:
        encoder = json.JSONEncoder(
            sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str
        )
        return encoder.encode
    chunks = make(
        None, str, json.encoder.encode_basestring, None, ":", ",", True, False, True
    )  # markers (None: no cycle check), default, string encoder, indent, key and item
    # separators, sort_keys, skipkeys, allow_nan: the arguments JSONEncoder passes.
    return lambda value: "".join(chunks(value, 0))


def judge(stored: str | None, event: CloudEvent) -> Claim:
    """A duplicate's verdict against the stored fingerprint (None: unknown, a redelivery)."""
    if stored is None or stored == fingerprint(event):
        return Claim.duplicate
    return Claim.conflict


async def claim(
    session: AsyncSession,
    *,
    consumer: str,
    event: CloudEvent,
    topic: str,
    partition: int,
    offset: int,
) -> Claim:
    """Record the event as processed, or say why not: applied before with the same content
    (``duplicate``: do nothing) or with other content (``conflict``: dead-letter it). Nothing
    stored changes unless the claim is ``new``.

    Two deliveries racing each other both pass the lookup, but only one commit can insert
    the primary key; the other fails and, retried, finds the entry.
    """
    existing = await session.get(InboxEntry, (consumer, event.source, event.id))
    if existing is not None:
        return judge(existing.data_sha256, event)
    record(session, consumer=consumer, event=event, topic=topic, partition=partition, offset=offset)
    return Claim.new


async def already_processed(
    session: AsyncSession, *, consumer: str, events: Sequence[CloudEvent]
) -> dict[tuple[str, str], str | None]:
    """(source, id) of those ``events`` the consumer has applied, with their fingerprints:
    one query for a batch.

    The query names the sources as well as the ids: the primary key leads with consumer and
    source, so without the sources SQLite walks every entry of the consumer (a cost that
    grows with the inbox, per batch); with them it looks each key up. An entry of another
    source that happens to share an id may come back too; callers look up (source, id)."""
    if not events:
        return {}
    rows = await session.execute(
        _already_processed_query(on_postgres(session)),
        {
            "consumer": consumer,
            "sources": list({e.source for e in events}),
            "ids": list({e.id for e in events}),
        },
    )
    return {(source, event_id): digest for source, event_id, digest in rows.all()}


@functools.cache
def _already_processed_query(postgres: bool) -> Select[str, str, str | None]:
    """Built once per dialect: its list parameters take each batch's sources and ids."""
    return select(
        col(InboxEntry.source), col(InboxEntry.event_id), col(InboxEntry.data_sha256)
    ).where(
        col(InboxEntry.consumer) == bindparam("consumer"),
        one_of(col(InboxEntry.source), "sources", postgres=postgres),
        one_of(col(InboxEntry.event_id), "ids", postgres=postgres),
    )


def record(
    session: AsyncSession,
    *,
    consumer: str,
    event: CloudEvent,
    topic: str,
    partition: int,
    offset: int,
) -> None:
    """Add the entry for an event known to be new to the session (one event at a time)."""
    session.add(InboxEntry(**entry(consumer, event, topic, partition, offset)))


def entry(
    consumer: str, event: CloudEvent, topic: str, partition: int, offset: int
) -> dict[str, Any]:
    """The column values of an event's entry (see :func:`record_all`)."""
    return {
        "consumer": consumer,
        "source": event.source,
        "event_id": event.id,
        "event_type": event.type,
        "topic": topic,
        "partition": partition,
        "offset": offset,
        "processed_at": _utcnow(),
        "data_sha256": fingerprint(event),
    }


async def record_all(session: AsyncSession, entries: Sequence[Mapping[str, Any]]) -> None:
    """Insert the entries of a batch of new events in one statement (a Core executemany,
    in the session's transaction: they commit together with the handlers' effects)."""
    if entries:
        await session.execute(_TABLE.insert(), list(entries))


Row = tuple[str, str, str, str, str, int, int, str]
"""An entry as the consumer's batch path collects it: consumer, source, event id, type, topic,
partition, offset, fingerprint (see :func:`row`; the time is added by :func:`record_rows`)."""


def row(consumer: str, event: CloudEvent, topic: str, partition: int, offset: int) -> Row:
    """An event's entry as a plain tuple for :func:`record_rows`."""
    return (
        consumer,
        event.source,
        event.id,
        event.type,
        topic,
        partition,
        offset,
        fingerprint(event),
    )


async def record_rows(session: AsyncSession, rows: Sequence[Row]) -> None:
    """Insert a batch's entries in the session's transaction through the driver's executemany
    (on PostgreSQL at commit, with the other rows added at commit).

    The rows go as plain tuples into the statement compiled once per dialect: the consumer's
    batch path writes one entry per event, and SQLAlchemy's per-row parameter processing
    (a dict and a bind processor per row) cost more than the insert. All rows of a batch carry
    one processed_at (they commit in one transaction), converted once by the column's own
    bind processor, so the stored value is what an ORM entry would hold.
    """
    if not rows:
        return
    connection = await session.connection()
    if connection.dialect.name == "postgresql":
        # At commit, in one statement with the rows the handlers added at commit (the
        # outbox's, the audit's: lotse_runtime.db.run_together): a round trip less per
        # transaction. Nothing in the transaction reads them back (duplicates within the
        # batch are known from the consumer's own map).
        now = _utcnow()
        for entry in rows:
            stamped = (*entry[:7], now, entry[7])
            insert_at_commit(session, _TABLE, dict(zip(_ROW_ORDER, stamped, strict=True)))
        return
    prepared = _insert_rows(connection.dialect)
    if prepared is None:  # a driver with named parameters: SQLAlchemy's own executemany
        now = _utcnow()
        await session.execute(
            _TABLE.insert(), [dict(zip(_ROW_ORDER, (*r[:7], now, r[7]), strict=True)) for r in rows]
        )
        return
    sql, stamp = prepared
    processed_at = stamp(_utcnow())
    values = [(*r[:7], processed_at, r[7]) for r in rows]
    sync = connection.sync_connection
    # On SQLite straight to the driver (lotse_runtime.db.executemany_on_sqlite).
    if sync is None or not executemany_on_sqlite(sync, sql, values):
        await connection.exec_driver_sql(sql, values)


@functools.lru_cache(maxsize=8)
def _insert_rows(dialect: Dialect) -> tuple[str, Callable[[datetime], Any]] | None:
    """The positional INSERT of the inbox for a dialect, and processed_at's bind processor
    (None: the dialect binds by name, or in another order)."""
    compiled = _TABLE.insert().compile(dialect=dialect)
    if compiled.positiontup != _ROW_ORDER:
        return None
    process = _TABLE.c.processed_at.type._cached_bind_processor(dialect)
    return str(compiled), process if process is not None else (lambda value: value)


_TABLE: Table = InboxEntry.__table__  # type: ignore[attr-defined]
_ROW_ORDER = [
    "consumer", "source", "event_id", "event_type", "topic", "partition", "offset",
    "processed_at", "data_sha256",
]  # fmt: skip
