"""Retention: how long each class of stored data is kept, and the job that purges the rest.

A service names its data classes as :class:`RetentionRule` s (which table, which time
column says how old a row is, which rows qualify, what goes with them); the runtime adds
its own (inbox entries, sent outbox rows, the audit log). :func:`add_retention_job` purges
everything past its retention on a schedule, measured by the runtime's clock; rows with
dependants go in batches, each batch with its dependants in one transaction.

The audit log's triggers refuse to delete entries younger than a year, whatever the setting
says; reporting's anonymised aggregates are kept for good (no rule names them).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import ColumnElement, Table, delete, select
from sqlmodel import SQLModel

from lotse_runtime.audit import AuditEntry
from lotse_runtime.inbox import InboxEntry
from lotse_runtime.outbox import OutboxMessage

if TYPE_CHECKING:
    from lotse_runtime.app import PeriodicJob, ServiceRuntime
    from lotse_runtime.db import Database
    from lotse_runtime.settings import ServiceSettings

_log = logging.getLogger(__name__)

#: Parent rows deleted per transaction (with their dependants), so a first purge of a large
#: backlog never holds long locks.
BATCH = 500


def table_of(model: type[SQLModel] | Table) -> Table:
    if isinstance(model, Table):
        return model
    table = model.__table__  # type: ignore[attr-defined]
    assert isinstance(table, Table)
    return table


@dataclass(frozen=True)
class Dependant:
    """Rows of another table that go when their parent row goes (e.g. a referral's steps)."""

    table: Table
    column: str
    """Column of ``table`` holding the parent's (single-column) primary key."""


@dataclass(frozen=True)
class RetentionRule:
    """One class of data: rows of ``table`` whose ``age_column`` lies more than ``keep``
    before now (and that satisfy ``only``, e.g. "closed") are deleted, dependants first.
    ``keep=None`` keeps the class for good."""

    data_class: str
    table: Table
    age_column: str
    keep: timedelta | None
    only: Callable[[Table], ColumnElement[bool]] | None = None
    dependants: tuple[Dependant, ...] = ()
    description: str = ""

    def __post_init__(self) -> None:
        if self.age_column not in self.table.c:
            raise ValueError(f"{self.table.name} has no column {self.age_column}")
        if self.dependants and len(self.table.primary_key.columns) != 1:
            raise ValueError(f"{self.table.name}: dependants need a single-column primary key")

    def expired(self, cutoff: datetime) -> list[ColumnElement[bool]]:
        """Conditions of the rows this rule no longer keeps, given the cutoff time."""
        age = self.table.c[self.age_column]
        conditions: list[ColumnElement[bool]] = [age.is_not(None), age < cutoff]
        if self.only is not None:
            conditions.append(self.only(self.table))
        return conditions


def rule(
    data_class: str,
    model: type[SQLModel] | Table,
    age_column: str,
    keep: timedelta | None,
    *,
    only: Callable[[Table], ColumnElement[bool]] | None = None,
    dependants: Sequence[tuple[type[SQLModel] | Table, str]] = (),
    description: str = "",
) -> RetentionRule:
    """A rule from SQLModel classes (the usual way a service declares one)."""
    return RetentionRule(
        data_class=data_class,
        table=table_of(model),
        age_column=age_column,
        keep=keep,
        only=only,
        dependants=tuple(Dependant(table_of(t), c) for t, c in dependants),
        description=description,
    )


def days(value: int | None) -> timedelta | None:
    """A retention setting in days (None: kept for good)."""
    return None if value is None else timedelta(days=value)


def runtime_rules(settings: ServiceSettings) -> list[RetentionRule]:
    """The runtime's own data classes, present in every service database."""
    return [
        rule(
            "inbox entries",
            InboxEntry,
            "processed_at",
            days(settings.retention_inbox_days),
            description="which events a consumer applied (guards against redelivery)",
        ),
        rule(
            "sent outbox rows",
            OutboxMessage,
            "sent_at",
            days(settings.retention_outbox_sent_days),
            description="published events kept for diagnosis; unsent rows are never purged",
        ),
        rule(
            "audit log",
            AuditEntry,
            "at",
            days(settings.retention_audit_days),
            description="who accessed which case; younger than a year undeletable (triggers)",
        ),
    ]


class RetentionFailed(RuntimeError):
    """Some data classes could not be purged (the others were)."""


@dataclass
class PurgeReport:
    """Rows deleted per data class by one purge (dependants counted with their parents)."""

    deleted: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.deleted.values())


async def purge_rule(db: Database, rule: RetentionRule, now: datetime) -> int:
    """Delete what ``rule`` no longer keeps at ``now``; returns the rows deleted."""
    if rule.keep is None:
        return 0
    cutoff = now - rule.keep
    if not rule.dependants:
        async with db.transaction() as session:
            result = await session.execute(delete(rule.table).where(*rule.expired(cutoff)))
        return int(getattr(result, "rowcount", 0) or 0)
    deleted = 0
    (pk_column,) = rule.table.primary_key.columns
    while True:
        async with db.transaction() as session:
            ids = list(
                (
                    await session.execute(
                        select(pk_column).where(*rule.expired(cutoff)).limit(BATCH)
                    )
                ).scalars()
            )
            if not ids:
                return deleted
            for dependant in rule.dependants:
                await session.execute(
                    delete(dependant.table).where(dependant.table.c[dependant.column].in_(ids))
                )
            await session.execute(delete(rule.table).where(pk_column.in_(ids)))
        deleted += len(ids)
        if len(ids) < BATCH:
            return deleted


async def purge(db: Database, rules: Sequence[RetentionRule], now: datetime) -> PurgeReport:
    """Apply every rule once at ``now``."""
    report = PurgeReport()
    failed: list[str] = []
    for each in rules:
        # One class failing (say, a lock timeout) must not keep the others from their purge.
        try:
            report.deleted[each.data_class] = await purge_rule(db, each, now)
        except Exception as exc:
            failed.append(f"{each.data_class} ({type(exc).__name__})")
    if failed:
        raise RetentionFailed(f"purge failed for: {', '.join(failed)}")
    return report


def add_retention_job(
    runtime: ServiceRuntime[Any], rules: Sequence[RetentionRule] = ()
) -> PeriodicJob:
    """Purge the runtime's data classes and the service's ``rules`` every
    ``retention_interval_s`` seconds, measured by the runtime's clock."""
    every = [*runtime_rules(runtime.settings), *rules]

    async def run(rt: ServiceRuntime[Any]) -> None:
        report = await purge(rt.db, every, rt.clock())
        if report.total:
            # Counts per class only: what was deleted is nobody's business in a log line.
            _log.info("retention purge", extra={"deleted": report.deleted})

    return runtime.add_job("retention", runtime.settings.retention_interval_s, run, once=True)
