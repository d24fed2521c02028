"""Async database access for one service: PostgreSQL in production, SQLite embedded.

Every service owns its database. Its schema is the service's own tables plus the runtime's
outbox and inbox tables; :func:`lotse_runtime.migrations.create_schema` migrates to exactly
those (Alembic), so services that share one Python process (tests) never create each other's
tables. This module imports nothing of the migrations (they build on it, not the reverse).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

_log = logging.getLogger(__name__)


class DatabaseConfigError(ValueError):
    """The database URL names a backend Lotse does not run on."""


def async_url(url: str) -> str:
    """Normalise a URL to the async driver: postgresql:// → asyncpg, sqlite:// → aiosqlite."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "postgresql":
        parsed = parsed.set(drivername="postgresql+asyncpg")
    elif backend == "sqlite":
        parsed = parsed.set(drivername="sqlite+aiosqlite")
    else:
        raise DatabaseConfigError(
            f"database URL {parsed.render_as_string(hide_password=True)!r}: "
            "only postgresql and sqlite are supported"
        )
    return parsed.render_as_string(hide_password=False)


#: How long a SQLite transaction waits for the write lock before it fails as busy.
SQLITE_BUSY_TIMEOUT_MS = 15_000


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # The driver's own transaction handling would open transactions DEFERRED; _sqlite_begin
    # opens them instead (see there).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    # WAL lets the relay read while a request writes; busy_timeout waits instead of failing.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    # Freed row space is zeroed instead of lingering in the file: an erased family's bytes
    # (and a destroyed data key) must not be recoverable from free pages.
    cursor.execute("PRAGMA secure_delete=ON")
    cursor.close()


def _sqlite_begin(conn: Any) -> None:
    """Open every SQLite transaction IMMEDIATE, i.e. with the write lock.

    A DEFERRED transaction that reads and then writes must upgrade its lock; in WAL mode that
    upgrade fails at once with "database is locked" when another connection committed in
    between, and busy_timeout does not apply to it. Nearly every Lotse transaction writes
    (inbox, outbox, audit), so taking the lock up front makes writers queue for up to
    busy_timeout instead of failing under load. Connections asked for AUTOCOMMIT (the WAL
    checkpoint) stay outside any transaction.
    """
    if conn.get_execution_options().get("isolation_level") == "AUTOCOMMIT":
        return
    conn.exec_driver_sql("BEGIN IMMEDIATE")


# SQLite's words for lock contention (SQLITE_BUSY, SQLITE_LOCKED); other OperationalErrors such
# as "no such table" or "too many SQL variables" would fail again the same way.
_SQLITE_BUSY_WORDS = ("database is locked", "database table is locked", "database is busy")


def transient_error(exc: BaseException) -> bool:
    """Whether ``exc`` is a database error saying the database is busy or unreachable rather
    than that the work is wrong: retrying the same work later can succeed (lock contention, a
    lost connection, an exhausted pool, a serialisation conflict or deadlock on PostgreSQL).
    Errors from elsewhere (a handler's own HTTP call, say) are not judged here."""
    if isinstance(exc, PoolTimeoutError):
        return True
    if isinstance(exc, DBAPIError):
        if exc.connection_invalidated:
            return True
        if isinstance(exc, OperationalError) and any(
            word in str(exc.orig).lower() for word in _SQLITE_BUSY_WORDS
        ):
            return True
        code = getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)
        # 40001 serialization_failure, 40P01 deadlock_detected, 08xxx connection exceptions,
        # 57P0x operator intervention (shutdown), 53xxx insufficient resources.
        if isinstance(code, str) and (
            code in ("40001", "40P01") or code[:2] in ("08", "53") or code.startswith("57P0")
        ):
            return True
    return False


class Database:
    """Engine and sessions of one service database."""

    def __init__(self, url: str, *, echo: bool = False) -> None:
        self.url = async_url(url)
        parsed = make_url(self.url)
        self.dialect = parsed.get_backend_name()
        kwargs: dict[str, Any] = {"echo": echo}
        if self.dialect == "sqlite":
            database = parsed.database
            if database and database != ":memory:":
                Path(database).parent.mkdir(parents=True, exist_ok=True)
        else:
            kwargs.update(pool_pre_ping=True, pool_size=10, max_overflow=10)
        self.engine: AsyncEngine = create_async_engine(self.url, **kwargs)
        if self.dialect == "sqlite":
            event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas)
            event.listen(self.engine.sync_engine, "begin", _sqlite_begin)
        self._sessions = async_sessionmaker(self.engine, expire_on_commit=False)
        self._background: set[asyncio.Task[None]] = set()

    @property
    def is_postgres(self) -> bool:
        return self.dialect == "postgresql"

    def session(self) -> AsyncSession:
        """A new session; use ``async with db.session() as s, s.begin(): ...``."""
        return self._sessions()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncSession]:
        """A session inside one transaction: committed on success, rolled back on error."""
        async with self._sessions() as session, session.begin():
            yield session

    @asynccontextmanager
    async def autocommit(self) -> AsyncIterator[AsyncConnection]:
        """A connection outside any transaction: each statement commits on its own. On SQLite
        a read this way takes no write lock (see :func:`_sqlite_begin`)."""
        async with self.engine.connect() as conn:
            yield await conn.execution_options(isolation_level="AUTOCOMMIT")

    def forget_after_commit(self, session: AsyncSession) -> None:
        """After `session` commits, drop superseded page images from SQLite's write-ahead log.

        Erasure overwrites a family's rows, but the WAL still holds the earlier versions of
        those pages until a checkpoint; a truncating checkpoint right after the commit removes
        them from disk. (PostgreSQL keeps dead tuples until VACUUM; its files are not a
        service's to manage, see docs/operations.md.)
        """
        if self.dialect != "sqlite":
            return

        def schedule(_session: Any) -> None:
            task = asyncio.get_running_loop().create_task(self._checkpoint())
            self._background.add(task)
            task.add_done_callback(self._background.discard)

        event.listen(session.sync_session, "after_commit", schedule, once=True)

    async def _checkpoint(self) -> None:
        try:
            async with self.autocommit() as conn:
                await conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
        except Exception:
            _log.warning("WAL checkpoint after erasure failed; the next one will catch up")

    async def ping(self) -> None:
        """Raise if the database does not answer a trivial query."""
        async with self.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    async def dispose(self) -> None:
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        await self.engine.dispose()
