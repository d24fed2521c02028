"""What every use case of the service works with besides a session: settings, the city and
its working calendar, intake's keyring, the database, the outbox and the clock.

Built once by the app factory (app.py) and handed to routes (``ContextDep`` in api.py),
event handlers (consumers.py) and periodic jobs alike.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time
from typing import Any

from lotse_contracts.city import Municipality
from lotse_runtime.db import Database
from lotse_runtime.outbox import Outbox

from lotse_referrals import domain
from lotse_referrals.domain import WorkingCalendar
from lotse_referrals.keyring import Keyring
from lotse_referrals.settings import ReferralsSettings

SERVICE = "referrals"


@dataclass
class SealedWishes:
    """Wishes whose disclosures were sealed ahead, waiting for their transaction. The seals
    of a fetch's wishes run concurrently and end at about the same time: whichever
    placement gets the lock first places all that are ready, in one transaction (they lock
    the same Träger rows, and on SQLite only one transaction can write anyway)."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    ready: list[tuple[str, Any]] = field(default_factory=list)
    """(wish id, ``operations.SealedAhead``)."""

    def take(self) -> list[tuple[str, Any]]:
        taken, self.ready = self.ready, []
        return taken


def _utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass
class Context:
    """What the operations need besides a session: settings, city, calendar, keyring."""

    settings: ReferralsSettings
    city: Municipality
    calendar: WorkingCalendar
    keyring: Keyring | None
    db: Database
    outbox: Outbox
    clock: Callable[[], datetime] = _utc_now
    """Current time, aware UTC (the runtime's clock; tests control it)."""
    city_fingerprint: str | None = None
    """SHA-256 of the city file as the catalogue was last reconciled with it (set at start;
    the periodic check reconciles when the file's differs)."""
    sealed: SealedWishes = field(default_factory=SealedWishes)
    """Wishes whose disclosures intake has sealed, waiting to be placed
    (``operations.place_sealed``)."""

    def today(self, now: datetime) -> date:
        return domain.local_date(now, self.city.zone())

    def month_start_utc(self, now: datetime) -> datetime:
        first = domain.month_start(self.today(now))
        return datetime.combine(first, time(0), tzinfo=self.city.zone()).astimezone(UTC)
