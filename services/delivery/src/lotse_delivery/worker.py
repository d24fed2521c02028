"""The delivery worker: posts pending events to their subscribers' sinks.

Every ``deliver_interval_s`` it looks for active subscriptions with due events and gives
each its own task (at most ``deliver_concurrency`` at once), so a slow or broken receiver
only ever holds its own subscription. A task claims, in the order they were stored, the
oldest pending event of each case (so one case's events arrive in order) and posts them
one by one.

Several replicas share the database: a claim is a row lease (``lease_until``,
``lease_owner``), taken with ``SELECT … FOR UPDATE SKIP LOCKED`` on PostgreSQL, so two
instances never hold the same event; only the head of a case is claimable, so a case's
next event waits until its head is delivered, whichever instance posts it. An attempt
starts only if it can end before the lease does; an instance that dies holding leases
delays those cases until the leases lapse, and then another instance posts them (the same
``webhook-id`` again if the dead one had already posted).

The first failure ends the round: the subscription is held for the backoff (exponential
with jitter, at least a Retry-After), and its consecutive failures count against the
failure budget; once it is spent the subscription is paused, with the reason
in its status and the delivery log. A success resets the count.

Delivery is at least once: an event is marked delivered only after a 2xx answer, so a
crash in between sends it again with the same ``webhook-id`` (= the CloudEvent id), which
is the receiver's deduplication key.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import httpcore
import httpx
from lotse_contracts.cloudevents import CloudEvent, from_kafka
from lotse_runtime.refusal import Refusal
from sqlalchemy import delete, func, or_, select, update
from sqlmodel import col
from standardwebhooks.webhooks import Webhook

from lotse_delivery import domain, operations
from lotse_delivery.pinning import Resolver, pinned, pinned_client, system_resolver
from lotse_delivery.sealing import SecretBox, SecretUnreadable
from lotse_delivery.settings import DeliveryRuntime
from lotse_delivery.tables import DeliveryAttempt, DeliveryPending, DeliverySubscription

_log = logging.getLogger(__name__)
_STRUCTURED = [("content-type", b"application/cloudevents+json")]
USER_AGENT = "lotse-delivery/1"


def stored_event(row: DeliveryPending) -> CloudEvent:
    """The projected copy stored for one delivery, as a CloudEvent again."""
    return from_kafka(json.dumps(row.cloudevent).encode(), _STRUCTURED)


def signature(
    sub: DeliverySubscription, box: SecretBox, msg_id: str, at: datetime, body: bytes
) -> str:
    """``webhook-signature``: with the current secret, and during a rotation's grace period
    also with the previous one (space-separated, as Standard Webhooks allows)."""
    current = box.open(sub.secret, subscription_id=sub.id, column="secret")
    signatures = [Webhook(current).sign(msg_id, at, body)]
    until = sub.previous_secret_until
    if sub.previous_secret and until is not None and _aware(until) > at:
        previous = box.open(sub.previous_secret, subscription_id=sub.id, column="previous_secret")
        signatures.append(Webhook(previous).sign(msg_id, at, body))
    return " ".join(signatures)


def _aware(value: datetime) -> datetime:
    """SQLite hands datetimes back naive; they were stored as UTC."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


class DeliveryWorker:
    """One per service instance; ``tick`` is its periodic job."""

    def __init__(
        self,
        runtime: DeliveryRuntime,
        box: SecretBox,
        *,
        rand: Callable[[], float] = random.random,
        resolver: Resolver = system_resolver,
        network: httpcore.AsyncNetworkBackend | None = None,
    ):
        self.runtime = runtime
        self.box = box
        self.resolver = resolver
        self.network = network
        self.rand = rand
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._slots = asyncio.Semaphore(runtime.settings.deliver_concurrency)
        self._client: httpx.AsyncClient | None = None
        self.delivered = 0
        self.failed = 0
        #: Names this instance in its row leases.
        self.instance = uuid.uuid4().hex

    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = pinned_client(
                self.runtime.settings.deliver_timeout_s,
                network=self.network,
                headers={"user-agent": USER_AGENT},
            )
        return self._client

    async def close(self) -> None:
        for task in list(self._tasks.values()):
            task.cancel()
        for task in list(self._tasks.values()):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def tick(self, _runtime: Any = None) -> None:
        """Start a round for every active subscription with due events and no round running."""
        runtime = self.runtime
        now = runtime.clock()
        async with runtime.db.transaction() as session:
            due = (
                await session.scalars(
                    select(col(DeliverySubscription.id)).where(
                        col(DeliverySubscription.status) == "active",
                        or_(
                            col(DeliverySubscription.hold_until).is_(None),
                            col(DeliverySubscription.hold_until) <= now,
                        ),
                        col(DeliverySubscription.id).in_(
                            select(col(DeliveryPending.subscription_id)).where(
                                col(DeliveryPending.state) == "pending",
                                or_(
                                    col(DeliveryPending.lease_until).is_(None),
                                    col(DeliveryPending.lease_until) <= now,
                                    col(DeliveryPending.lease_owner) == self.instance,
                                ),
                            )
                        ),
                    )
                )
            ).all()
        for subscription_id in due:
            running = self._tasks.get(subscription_id)
            if running is not None and not running.done():
                continue
            task = asyncio.create_task(
                self._round(subscription_id), name=f"deliver-{subscription_id}"
            )
            self._tasks[subscription_id] = task
            task.add_done_callback(partial(self._forget, subscription_id))

    def _forget(self, subscription_id: str, task: asyncio.Task[None]) -> None:
        if self._tasks.get(subscription_id) is task:
            del self._tasks[subscription_id]
        if not task.cancelled() and task.exception() is not None:
            _log.error("delivery round failed", exc_info=task.exception())

    async def drain(self) -> None:
        """Wait for the rounds running now (tests)."""
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)

    def _claimable(self, subscription_id: str, now: datetime) -> Any:
        """The head (oldest pending event) of each case of one subscription, not leased by
        anyone: only a head is ever claimed, so one case's events go out one after another
        even when several instances deliver the same subscription."""
        heads = (
            select(func.min(DeliveryPending.id))
            .where(
                col(DeliveryPending.subscription_id) == subscription_id,
                col(DeliveryPending.state) == "pending",
            )
            .group_by(col(DeliveryPending.ordering_key))
        )
        return (
            select(DeliveryPending)
            .where(
                col(DeliveryPending.id).in_(heads),
                # Repeated outside the subquery: PostgreSQL re-checks these on the newest
                # version of a row another instance changed meanwhile.
                col(DeliveryPending.state) == "pending",
                or_(
                    col(DeliveryPending.lease_until).is_(None),
                    col(DeliveryPending.lease_until) <= now,
                    # An instance runs one round per subscription at a time: its own lease
                    # on this subscription's rows is left from a round that died (say, on a
                    # database error), not held by a round still running.
                    col(DeliveryPending.lease_owner) == self.instance,
                ),
            )
            .order_by(col(DeliveryPending.id))
            .limit(self.runtime.settings.deliver_batch)
            # PostgreSQL: rows another instance is claiming right now are skipped, not waited
            # for. SQLite (one process) ignores it; its writes are serialised anyway.
            .with_for_update(skip_locked=True)
        )

    async def _claim(
        self, subscription_id: str
    ) -> tuple[DeliverySubscription | None, list[DeliveryPending]]:
        """Lease the next events of one subscription to this instance (one transaction)."""
        settings = self.runtime.settings
        now = self.runtime.clock()
        async with self.runtime.db.transaction() as session:
            sub = await session.get(DeliverySubscription, subscription_id)
            if sub is None or sub.status != "active":
                return None, []
            if sub.hold_until is not None and _aware(sub.hold_until) > now:
                return None, []  # another instance's attempt failed: the backoff holds for all
            rows = list((await session.scalars(self._claimable(subscription_id, now))).all())
            until = now + timedelta(seconds=settings.lease_s)
            for row in rows:
                row.lease_until, row.lease_owner = until, self.instance
            session.add_all(rows)
        return sub, rows

    async def _release(self, rows: list[DeliveryPending]) -> None:
        """Give back leases of events this round did not attempt (it ended early)."""
        ids = [row.id for row in rows]
        if not ids:
            return
        async with self.runtime.db.transaction() as session:
            await session.execute(
                update(DeliveryPending)
                .where(
                    col(DeliveryPending.id).in_(ids),
                    col(DeliveryPending.lease_owner) == self.instance,
                )
                .values(lease_until=None, lease_owner=None)
            )

    async def _round(self, subscription_id: str) -> None:
        async with self._slots:
            while True:
                sub, rows = await self._claim(subscription_id)
                if sub is None or not rows:
                    return
                pending = list(rows)
                try:
                    while pending:
                        row = pending[0]
                        if not self._lease_lasts(row):
                            return  # the rest waits for the next round (or instance)
                        pending.pop(0)
                        if not await self._deliver(sub, row):
                            return
                finally:
                    await self._release(pending)

    def _lease_lasts(self, row: DeliveryPending) -> bool:
        """Whether an attempt started now ends before this instance's lease on the row does
        (otherwise another instance could post the same event meanwhile)."""
        if row.lease_until is None:
            return False
        end = self.runtime.clock() + timedelta(seconds=self.runtime.settings.deliver_timeout_s)
        return end < _aware(row.lease_until)

    async def _judge_sink(
        self, sub: DeliverySubscription
    ) -> tuple[tuple[str, str] | None, str | None]:
        """Resolve the sink once for this attempt and judge it again (its name may point
        elsewhere by now): (host, address) to connect to, or why not."""
        try:
            sink, addresses = await operations.check_sink(self.runtime, sub.sink, self.resolver)
        except Refusal as exc:
            return None, f"sink refused: {exc.reason}"
        return (sink.host, addresses[0]), None

    async def _deliver(self, sub: DeliverySubscription, row: DeliveryPending) -> bool:
        runtime = self.runtime
        event = stored_event(row)
        headers, body = domain.render_http(event, sub.mode)
        at = runtime.clock()
        headers["webhook-id"] = event.id
        headers["webhook-timestamp"] = str(int(at.timestamp()))
        status: int | None = None
        asked: float | None = None
        started = time.perf_counter()
        target, problem = await self._judge_sink(sub)
        if problem is None:
            try:
                headers["webhook-signature"] = signature(sub, self.box, event.id, at, body)
            except SecretUnreadable as exc:
                problem = f"secret unreadable: {exc}"
        error: str | None = problem
        if problem is None and target is not None:
            try:
                # One deadline for the whole attempt (connect, send, answer), so that it
                # surely ends within the row's lease; the connection goes to the address
                # just judged, never to a second DNS answer.
                async with asyncio.timeout(runtime.settings.deliver_timeout_s):
                    with pinned(*target):
                        async with self.client().stream(
                            "POST", sub.sink, content=body, headers=headers
                        ) as answer:
                            status = answer.status_code
                            asked = domain.retry_after(answer.headers.get("retry-after"), at)
            except (httpx.TimeoutException, TimeoutError):
                error = "timeout"
            except httpx.HTTPError as exc:
                error = f"{type(exc).__name__}"
        latency_ms = int((time.perf_counter() - started) * 1000)
        ok = problem is None and not domain.retryable(status)
        if not ok and error is None:
            error = f"answered {status}"
        await self._record(sub.id, row.id, ok, status, latency_ms, error, asked)
        if ok:
            self.delivered += 1
        else:
            self.failed += 1
        return ok

    # Longer than 60 lines on purpose: one attempt's bookkeeping (log, backoff, pause) in the
    # order it happens.
    async def _record(
        self,
        subscription_id: str,
        row_id: int | None,
        ok: bool,
        status: int | None,
        latency_ms: int,
        error: str | None,
        asked: float | None,
    ) -> None:
        runtime = self.runtime
        settings = runtime.settings
        now = runtime.clock()
        async with runtime.db.transaction() as session:
            sub = await session.get(DeliverySubscription, subscription_id, with_for_update=True)
            row = await session.get(DeliveryPending, row_id)
            if sub is None or row is None:
                return  # deleted meanwhile
            row.attempts += 1
            if row.lease_owner == self.instance:
                row.lease_until, row.lease_owner = None, None
            next_at: datetime | None = None
            outcome = "delivered"
            if ok:
                row.state, row.delivered_at = "delivered", now
                sub.consecutive_failures, sub.failing_since, sub.hold_until = 0, None, None
            else:
                sub.consecutive_failures += 1
                if sub.failing_since is None:
                    sub.failing_since = now
                delay = domain.backoff_s(
                    sub.consecutive_failures,
                    base_s=settings.retry_base_s,
                    max_s=settings.retry_max_s,
                    asked_s=asked,
                    rand=self.rand,
                )
                next_at = now + timedelta(seconds=delay)
                sub.hold_until = next_at
                outcome = "retry"
                reason = domain.budget_spent(
                    consecutive_failures=sub.consecutive_failures,
                    failing_since=_aware(sub.failing_since),
                    now=now,
                    max_attempts=settings.failure_budget_attempts,
                    max_s=settings.failure_budget_s,
                )
                if reason is not None:
                    sub.status, sub.paused_at, sub.paused_reason = "paused", now, reason
                    outcome, next_at = "paused", None
                    _log.warning(
                        "webhook subscription paused",
                        extra={"subscription": sub.id, "reason": reason},
                    )
            session.add(
                DeliveryAttempt(
                    subscription_id=sub.id,
                    event_id=row.event_id,
                    event_type=row.event_type,
                    attempt=row.attempts,
                    at=now,
                    outcome=outcome,
                    status_code=status,
                    latency_ms=latency_ms,
                    error=(error or None) and (error or "")[:300],
                    next_attempt_at=next_at,
                )
            )
            session.add_all([sub, row])


async def purge(runtime: DeliveryRuntime, box: SecretBox | None = None) -> None:
    """Forget delivered events and log entries older than ``delivered_keep_days``; seal
    secrets again that are in the clear or under a retired secrets key."""
    if box is not None:
        await reseal(runtime, box)
    cutoff = runtime.clock() - timedelta(days=runtime.settings.delivered_keep_days)
    async with runtime.db.transaction() as session:
        await session.execute(
            delete(DeliveryPending).where(
                col(DeliveryPending.state) == "delivered",
                col(DeliveryPending.delivered_at) < cutoff,
            )
        )
        await session.execute(delete(DeliveryAttempt).where(col(DeliveryAttempt.at) < cutoff))


async def reseal(runtime: DeliveryRuntime, box: SecretBox) -> int:
    """Seal every stored secret under the current secrets key (after a key change, or
    secrets stored before sealing existed); returns how many subscriptions changed."""
    changed = 0
    async with runtime.db.transaction() as session:
        subs = (await session.scalars(select(DeliverySubscription).with_for_update())).all()
        for sub in subs:
            for column in ("secret", "previous_secret"):
                stored = getattr(sub, column)
                if stored is None or not box.stale(stored):
                    continue
                try:
                    plain = box.open(stored, subscription_id=sub.id, column=column)
                except SecretUnreadable as exc:
                    _log.error("webhook secret unreadable", extra={"reason": str(exc)})
                    continue
                setattr(sub, column, box.seal(plain, subscription_id=sub.id, column=column))
                session.add(sub)
                changed += 1
    return changed
