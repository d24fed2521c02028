"""The delivery worker: posts pending events to their subscribers' sinks.

Every ``deliver_interval_s`` it looks for active subscriptions with due events and gives
each its own task (at most ``deliver_concurrency`` at once), so a slow or broken receiver
only ever holds its own subscription. A task takes, in the order they were stored, the
oldest pending event of each case (so one case's events arrive in order) and posts them
one by one. The first failure ends the round: the subscription is held for the backoff
(exponential with jitter, at least a Retry-After), and its consecutive failures count
against the failure budget; once it is spent the subscription is paused, with the reason
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
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import httpx
from lotse_contracts.cloudevents import CloudEvent, from_kafka
from sqlalchemy import delete, func, or_, select
from sqlmodel import col
from standardwebhooks.webhooks import Webhook

from lotse_delivery import domain, operations
from lotse_delivery.settings import DeliveryRuntime
from lotse_delivery.tables import DeliveryAttempt, DeliveryPending, DeliverySubscription

_log = logging.getLogger(__name__)
_STRUCTURED = [("content-type", b"application/cloudevents+json")]
USER_AGENT = "lotse-delivery/1"


def stored_event(row: DeliveryPending) -> CloudEvent:
    """The projected copy stored for one delivery, as a CloudEvent again."""
    return from_kafka(json.dumps(row.cloudevent).encode(), _STRUCTURED)


def signature(sub: DeliverySubscription, msg_id: str, at: datetime, body: bytes) -> str:
    """``webhook-signature``: with the current secret, and during a rotation's grace period
    also with the previous one (space-separated, as Standard Webhooks allows)."""
    signatures = [Webhook(sub.secret).sign(msg_id, at, body)]
    until = sub.previous_secret_until
    if sub.previous_secret and until is not None and _aware(until) > at:
        signatures.append(Webhook(sub.previous_secret).sign(msg_id, at, body))
    return " ".join(signatures)


def _aware(value: datetime) -> datetime:
    """SQLite hands datetimes back naive; they were stored as UTC."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


class DeliveryWorker:
    """One per service instance; ``tick`` is its periodic job."""

    def __init__(self, runtime: DeliveryRuntime, *, rand: Callable[[], float] = random.random):
        self.runtime = runtime
        self.rand = rand
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._slots = asyncio.Semaphore(runtime.settings.deliver_concurrency)
        self._client: httpx.AsyncClient | None = None
        self.delivered = 0
        self.failed = 0

    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            timeout = self.runtime.settings.deliver_timeout_s
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(timeout),
                follow_redirects=False,  # a redirect could point anywhere (SSRF): a failure
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
                                col(DeliveryPending.state) == "pending"
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

    async def _heads(
        self, subscription_id: str
    ) -> tuple[DeliverySubscription | None, list[DeliveryPending]]:
        settings = self.runtime.settings
        async with self.runtime.db.transaction() as session:
            sub = await session.get(DeliverySubscription, subscription_id)
            if sub is None or sub.status != "active":
                return None, []
            firsts = (
                select(func.min(DeliveryPending.id))
                .where(
                    col(DeliveryPending.subscription_id) == subscription_id,
                    col(DeliveryPending.state) == "pending",
                )
                .group_by(col(DeliveryPending.ordering_key))
            )
            rows = (
                await session.scalars(
                    select(DeliveryPending)
                    .where(col(DeliveryPending.id).in_(firsts))
                    .order_by(col(DeliveryPending.id))
                    .limit(settings.deliver_batch)
                )
            ).all()
            return sub, list(rows)

    async def _round(self, subscription_id: str) -> None:
        async with self._slots:
            while True:
                sub, rows = await self._heads(subscription_id)
                if sub is None or not rows:
                    return
                problem = await self._sink_problem(sub)
                for row in rows:
                    ok = await self._deliver(sub, row, problem)
                    if not ok:
                        return

    async def _sink_problem(self, sub: DeliverySubscription) -> str | None:
        """Judge the sink again before posting (its name may resolve elsewhere by now)."""
        try:
            await operations.check_sink(self.runtime, sub.sink)
        except Exception as exc:  # Refusal: a sink that is no longer acceptable
            return f"sink refused: {getattr(exc, 'reason', type(exc).__name__)}"
        return None

    async def _deliver(
        self, sub: DeliverySubscription, row: DeliveryPending, problem: str | None
    ) -> bool:
        runtime = self.runtime
        event = stored_event(row)
        headers, body = domain.render_http(event, sub.mode)
        at = runtime.clock()
        headers["webhook-id"] = event.id
        headers["webhook-timestamp"] = str(int(at.timestamp()))
        headers["webhook-signature"] = signature(sub, event.id, at, body)
        status: int | None = None
        asked: float | None = None
        error: str | None = problem
        started = time.perf_counter()
        if problem is None:
            try:
                async with self.client().stream(
                    "POST", sub.sink, content=body, headers=headers
                ) as answer:
                    status = answer.status_code
                    asked = domain.retry_after(answer.headers.get("retry-after"), at)
            except httpx.TimeoutException:
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


async def purge(runtime: DeliveryRuntime) -> None:
    """Forget delivered events and log entries older than ``delivered_keep_days``."""
    cutoff = runtime.clock() - timedelta(days=runtime.settings.delivered_keep_days)
    async with runtime.db.transaction() as session:
        await session.execute(
            delete(DeliveryPending).where(
                col(DeliveryPending.state) == "delivered",
                col(DeliveryPending.delivered_at) < cutoff,
            )
        )
        await session.execute(delete(DeliveryAttempt).where(col(DeliveryAttempt.at) < cutoff))
