"""Inbox: which events a consumer has already applied.

The entry is written in the same transaction as the handler's effects, so either both
commit or neither does; a redelivered event finds its entry and causes no second effect.
The dedup key is (consumer, CloudEvents source, CloudEvents id).
"""

from __future__ import annotations

from datetime import UTC, datetime

from lotse_contracts.cloudevents import CloudEvent
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import Field, SQLModel, col


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


async def claim(
    session: AsyncSession,
    *,
    consumer: str,
    event: CloudEvent,
    topic: str,
    partition: int,
    offset: int,
) -> bool:
    """Record the event as processed; False when it already was (then do nothing).

    Two deliveries racing each other both pass the lookup, but only one commit can insert
    the primary key; the other fails and, retried, finds the entry.
    """
    existing = await session.get(InboxEntry, (consumer, event.source, event.id))
    if existing is not None:
        return False
    record(session, consumer=consumer, event=event, topic=topic, partition=partition, offset=offset)
    return True


async def already_processed(
    session: AsyncSession, *, consumer: str, events: list[CloudEvent]
) -> set[tuple[str, str]]:
    """(source, id) of those ``events`` the consumer has applied: one query for a batch."""
    if not events:
        return set()
    rows = await session.execute(
        select(col(InboxEntry.source), col(InboxEntry.event_id)).where(
            col(InboxEntry.consumer) == consumer,
            col(InboxEntry.event_id).in_({e.id for e in events}),
        )
    )
    return {(source, event_id) for source, event_id in rows.all()}


def record(
    session: AsyncSession,
    *,
    consumer: str,
    event: CloudEvent,
    topic: str,
    partition: int,
    offset: int,
) -> None:
    """Add the entry for an event known to be new (after :func:`already_processed`)."""
    session.add(
        InboxEntry(
            consumer=consumer,
            source=event.source,
            event_id=event.id,
            event_type=event.type,
            topic=topic,
            partition=partition,
            offset=offset,
        )
    )
