"""Leases: which replica of a service runs a job that must run once per tick.

Production runs several replicas of each service on one database. A periodic job declared
run-once (``ServiceRuntime.add_job(..., once=True)``) runs only on the replica holding its
lease; the others stand by and try again at each tick, so when the holder stops or dies the
next tick of another replica takes over.

On PostgreSQL a lease is a session-level advisory lock (``pg_try_advisory_lock``) keyed by
service and job, held on one database connection of the replica's own for all its leases.
The lock lives exactly as long as that session: a clean stop closes it, a killed process's
socket is closed by the kernel and PostgreSQL ends the session, releasing every lease at
once. No expiry has to be guessed and no clock compared between replicas. The session is
named (``application_name``) after the replica, so ``pg_locks`` joined with
``pg_stat_activity`` tells anyone with a database connection who holds which lease
(:meth:`LeaseKeeper.holders`). Advisory locks are per database, as each service's are.

SQLite is embedded and serves one process: every lease is held by that process.

A lease makes a job run on one replica at a time; it is no fence. If the holder's session is
lost while a run is in flight (a database restart), another replica may start its run before
the first notices at its next tick. The jobs therefore still make each effect idempotent
(conditional updates that claim the row in the transaction that publishes the effect).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import socket
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from lotse_runtime.db import Database

_log = logging.getLogger(__name__)

#: PostgreSQL truncates application_name to 63 bytes.
_APPLICATION_NAME_BYTES = 63


def replica_name() -> str:
    """This replica's name: ``LOTSE_REPLICA`` if set, else host name (a pod's name on
    Kubernetes) and process id."""
    configured = os.environ.get("LOTSE_REPLICA")
    if configured:
        return configured
    return f"{socket.gethostname()}/{os.getpid()}"


def lease_key(service: str, name: str) -> int:
    """The advisory lock key of a lease: a signed 64-bit number derived from service and
    lease name (stable across releases and processes, unlike ``hash``)."""
    digest = hashlib.blake2b(f"lotse-lease:{service}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def _lock_ids(key: int) -> tuple[int, int]:
    """How ``pg_locks`` shows a bigint advisory key: (classid, objid), each unsigned 32 bits."""
    unsigned = key & 0xFFFF_FFFF_FFFF_FFFF
    return unsigned >> 32, unsigned & 0xFFFF_FFFF


@dataclass(frozen=True)
class LeaseHolder:
    """Who holds a lease as the database sees it (None: nobody does right now)."""

    name: str
    holder: str | None
    """The holding replica's name (its session's application_name), or None."""
    held_here: bool


class LeaseKeeper:
    """The leases of one replica of ``service``; one database session holds them all."""

    def __init__(self, db: Database, *, service: str, replica: str | None = None) -> None:
        self.db = db
        self.service = service
        self.replica = replica or replica_name()
        self._held: set[str] = set()
        self._conn: AsyncConnection | None = None
        self._lock = asyncio.Lock()

    @property
    def application_name(self) -> str:
        name = f"lotse-{self.service} lease {self.replica}"
        return name.encode()[:_APPLICATION_NAME_BYTES].decode(errors="ignore")

    def held(self) -> frozenset[str]:
        """The leases this replica believes it holds (as of its last check)."""
        return frozenset(self._held)

    def key(self, name: str) -> int:
        return lease_key(self.service, name)

    async def hold(self, name: str) -> bool:
        """Hold lease ``name`` if it is free or already ours; False when another replica
        holds it. Raises when the database cannot be asked (the caller skips the tick)."""
        if not self.db.is_postgres:
            self._held.add(name)
            return True
        async with self._lock:
            conn = await self._session()
            if name in self._held:
                return True
            got = bool(
                (
                    await conn.execute(
                        text("SELECT pg_try_advisory_lock(:k)"), {"k": self.key(name)}
                    )
                ).scalar()
            )
            await conn.commit()  # the lock is the session's; no transaction stays open
            if got:
                self._held.add(name)
                _log.info("lease acquired", extra={"lease": name, "replica": self.replica})
            return got

    async def release(self, name: str) -> None:
        """Give lease ``name`` up (another replica takes it at its next tick)."""
        async with self._lock:
            if name not in self._held:
                return
            self._held.discard(name)
            if self._conn is None:
                return
            try:
                await self._conn.execute(
                    text("SELECT pg_advisory_unlock(:k)"), {"k": self.key(name)}
                )
                await self._conn.commit()
            except Exception:
                await self._drop_session()

    async def close(self) -> None:
        """Release every lease (closing the session releases its locks)."""
        async with self._lock:
            await self._drop_session()
            self._held.clear()

    async def _session(self) -> AsyncConnection:
        """The leases' session, checked alive; a lost one means every lease is lost."""
        if self._conn is not None:
            try:
                await self._conn.execute(text("SELECT 1"))
                await self._conn.commit()
                return self._conn
            except Exception:
                lost = sorted(self._held)
                await self._drop_session()
                if lost:
                    _log.warning(
                        "lease session lost; leases given up",
                        extra={"leases": lost, "replica": self.replica},
                    )
        conn = await self.db.engine.connect()
        try:
            await conn.execute(
                text("SELECT set_config('application_name', :n, false)"),
                {"n": self.application_name},
            )
            await conn.commit()
        except BaseException:
            with contextlib.suppress(Exception):
                await conn.invalidate()
            await conn.close()
            raise
        self._conn = conn
        return conn

    async def _drop_session(self) -> None:
        conn, self._conn = self._conn, None
        self._held.clear()
        if conn is not None:
            # Closing would hand the connection back to the pool with its locks (and its
            # name) still on the session: it is discarded instead, which ends the session.
            with contextlib.suppress(Exception):
                await conn.invalidate()
            with contextlib.suppress(Exception):
                await conn.close()

    async def holders(self, names: list[str]) -> list[LeaseHolder]:
        """Who holds each of the leases ``names`` right now, as the database says."""
        if not self.db.is_postgres:
            return [LeaseHolder(n, self.replica, n in self._held) for n in names]
        async with self.db.engine.connect() as conn:
            rows = (
                await conn.execute(
                    text(
                        "SELECT l.classid, l.objid, a.application_name"
                        " FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
                        " WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1"
                        " AND l.database = (SELECT oid FROM pg_database"
                        " WHERE datname = current_database())"
                    )
                )
            ).all()
        by_ids = {(int(r[0]), int(r[1])): str(r[2] or "") for r in rows}
        prefix = f"lotse-{self.service} lease "
        found = []
        for name in names:
            session = by_ids.get(_lock_ids(self.key(name)))
            holder = None
            if session is not None:
                holder = (
                    session[len(prefix) :]
                    if session.startswith(prefix)
                    else session or "an unnamed session"
                )
            found.append(LeaseHolder(name, holder, name in self._held))
        return found
