"""The consumer wrapper every service uses to apply events.

For each record, in partition order:

1. read the CloudEvent (binary or structured mode, size limit) — or dead-letter it;
2. skip types this consumer does not handle, dead-letter types nobody knows (or an unknown
   major version of a known event);
3. validate the data against its model (upcasting retired majors) — or dead-letter it;
4. in one database transaction: claim the event in the inbox, run the handler (which may add
   follow-up events to the outbox), commit; a duplicate commits nothing;
5. transient errors retry with exponential backoff (while the database does not answer at
   all, the partition is held and no attempt is counted); when attempts run out, or the handler
   rejects the event as invalid for the domain, the record goes to ``lotse.dlq.<service>``
   with the reason in headers, and the partition moves on;
6. the offset is committed only after the effect (or the dead letter) is safe.

If even the dead-letter topic cannot be written, the offset is not committed: the wrapper
holds the partition and tries again rather than lose the record.

No single record can stop a partition for good:

* a dead letter that cannot carry the original value within the record size limit
  (``KafkaConfig.max_record_bytes``) carries a reference instead: no value, and the original
  topic, partition, offset, size and SHA-256 in headers (``lotse_dlq_value: reference``);
  original headers too large to fit are left out as well (``lotse_dlq_headers: omitted``);
* a record the client refuses to hand out because it exceeds the fetch size is dead-lettered
  by reference and skipped;
* an event with the source and id of an applied one but other content (a *conflicting
  duplicate*) is dead-lettered, never applied, and counted; a redelivery with the same
  content is skipped silently;
* a partition that does not advance while records are pending is reported by
  :meth:`EventConsumer.stalled`, which ``/readyz`` turns into "not ready".
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.errors import (
    CommitFailedError,
    IllegalStateError,
    MessageSizeTooLargeError,
    RecordTooLargeError,
)
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from lotse_contracts.cloudevents import CloudEvent, InvalidCloudEvent, from_kafka
from lotse_contracts.events.base import (
    CATALOGUE,
    EventCatalogue,
    EventDataInvalid,
    EventModel,
    UnknownEventType,
    UnknownEventVersion,
)
from lotse_contracts.subscriptions import RoutingError
from opentelemetry.trace import SpanKind, Status, StatusCode
from sqlalchemy.ext.asyncio import AsyncSession

from lotse_runtime import inbox
from lotse_runtime.db import Database, transient_error
from lotse_runtime.kafka import KafkaConfig
from lotse_runtime.outbox import Outbox
from lotse_runtime.refusal import Refusal
from lotse_runtime.stopping import cancel_within, within
from lotse_runtime.telemetry import Telemetry, extract_context

_log = logging.getLogger(__name__)

DLQ_REASON = "lotse_dlq_reason"
DLQ_STAGE = "lotse_dlq_stage"
DLQ_ERROR = "lotse_dlq_error"
DLQ_TOPIC = "lotse_dlq_topic"
DLQ_PARTITION = "lotse_dlq_partition"
DLQ_OFFSET = "lotse_dlq_offset"
DLQ_CONSUMER = "lotse_dlq_consumer"
DLQ_ATTEMPTS = "lotse_dlq_attempts"
DLQ_TIME = "lotse_dlq_time"
DLQ_SIZE = "lotse_dlq_size"
DLQ_SHA256 = "lotse_dlq_sha256"
DLQ_VALUE = "lotse_dlq_value"
DLQ_HEADERS_KEPT = "lotse_dlq_headers"
VALUE_ORIGINAL = "original"
VALUE_REFERENCE = "reference"
_DLQ_HEADERS = {
    DLQ_REASON,
    DLQ_STAGE,
    DLQ_ERROR,
    DLQ_TOPIC,
    DLQ_PARTITION,
    DLQ_OFFSET,
    DLQ_CONSUMER,
    DLQ_ATTEMPTS,
    DLQ_TIME,
    DLQ_SIZE,
    DLQ_SHA256,
    DLQ_VALUE,
    DLQ_HEADERS_KEPT,
}
MAX_REASON_CHARS = 1000
DLQ_MARGIN_BYTES = 512
"""Kept free below the record limit for what the size estimate does not count (batch header)."""
IDLE_LOOP_MS = 1000
"""How long one wait for records lasts before the loop goes round (nothing fetched)."""
QUIET_AFTER_S = 5.0
"""Without records for this long, a consumer fetches with the longer idle wait
(``KafkaConfig.fetch_max_wait_idle_ms``) until records come again."""
DATABASE_RETRY_S = 1.0
"""Pause between tries while the service's database does not answer."""
BATCH_SIZE = 500
"""Most records one fetch hands over, and so most events one transaction applies. Under a
backlog the commit is a large share of an event's cost: every inbox entry (and most effect
rows) lands on another index page, which the commit writes out whole; 500 instead of 200
events a commit cut the wrapper's CPU per event by a tenth on SQLite. ``max_transaction_s``
still bounds how long one holds the database."""


class EventRejected(Exception):
    """A handler's verdict that this event is invalid for the domain (e.g. an answer about a
    referral that was not addressed to its sender). It is dead-lettered at once, without
    retries, and the transaction's effects are rolled back.

    ``code`` and ``public_reason`` are what the sender may be told (see
    :class:`Refused`): a machine-readable code and a reason without anything the sender
    must not learn; the full ``reason`` goes to the dead-letter topic only."""

    def __init__(
        self, reason: str, *, code: str | None = None, public_reason: str | None = None
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code
        self.public_reason = public_reason


E = TypeVar("E", bound=EventModel, covariant=True)


FollowUp = Callable[[], Awaitable[object]]
"""Work a handler leaves for after its transaction has committed (see
:meth:`Delivery.after_commit`)."""

FOLLOW_UP_CONCURRENCY = 16
"""Most follow-ups of one transaction that run at the same time."""


@dataclass(frozen=True)
class Delivery(Generic[E]):
    """What a handler gets: the event, its validated data (the concrete event model the
    handler was registered for, see ``lotse_runtime.handlers``), and a transaction to act in."""

    event: CloudEvent
    data: E
    session: AsyncSession
    outbox: Outbox
    topic: str
    partition: int
    offset: int
    follow_ups: list[FollowUp] = field(default_factory=list)

    def after_commit(self, work: FollowUp) -> None:
        """Run ``work`` once this delivery's transaction has committed, before the consumer
        goes on to the next records (and so before their offsets are committed).

        For work that waits on another service: inside the transaction such a wait holds
        the event's locks (on SQLite the service's only write lock) and, since a fetch's
        events are applied one after the other, stalls every event behind it. The
        follow-ups of one transaction run concurrently, each in transactions of its own.
        They are not covered by the inbox: a follow-up that fails (or a crash before it
        ran) is logged and not retried, so the handler must commit a state from which the
        service's own jobs finish the work."""
        self.follow_ups.append(work)


Handler = Callable[[Delivery[Any]], Awaitable[None]]
#: Called at the start of each batch transaction with the session and the events about to be
#: applied in it (duplicates left out), before any handler: a service may read what they all
#: need in one query. The batch may end before its last event (the time budget); a record
#: the batch cannot take is applied alone, in a transaction of its own, without this call.
Prepare = Callable[[AsyncSession, list[Any]], Awaitable[None]]
_Prepared = tuple[ConsumerRecord[Any, Any], CloudEvent, EventModel | None]


@dataclass
class _Verdict:
    stage: str
    reason: str
    error: str = ""
    attempts: int = 0
    code: str | None = None
    public_reason: str | None = None


@dataclass(frozen=True)
class Refused:
    """A record this consumer refused and dead-lettered, as a refusal hook sees it (e.g. to
    tell the sender on a feed of its own). ``stage`` is the dead letter's stage
    (envelope, type, schema, duplicate, rejected, routing, handler); ``code`` and
    ``public_reason`` are the handler's (``EventRejected``), if it gave them."""

    topic: str
    partition: int
    offset: int
    event: CloudEvent | None
    stage: str
    reason: str
    code: str | None = None
    public_reason: str | None = None


RefusalHook = Callable[[Refused], Awaitable[None]]


class EventConsumer:
    """One consumer group of a service: topics, handlers per event type, dead letters."""

    def __init__(
        self,
        *,
        name: str,
        service: str,
        topics: list[str],
        handlers: Mapping[str, Handler],
        db: Database,
        outbox: Outbox,
        kafka: KafkaConfig,
        group_id: str,
        dead_letter_topic: str,
        catalogue: EventCatalogue = CATALOGUE,
        telemetry: Telemetry | None = None,
        max_event_bytes: int = 256 * 1024,
        max_attempts: int = 4,
        backoff_s: float = 0.2,
        batch_size: int = BATCH_SIZE,
        max_transaction_s: float = 0.5,
        on_refused: RefusalHook | None = None,
        prepare: Prepare | None = None,
    ) -> None:
        self.name = name
        self.on_refused = on_refused
        self.prepare = prepare
        self.service = service
        self.topics = topics
        self.handlers = dict(handlers)
        self.db = db
        self.outbox = outbox
        self.kafka = kafka
        self.group_id = group_id
        self.dead_letter_topic = dead_letter_topic
        self.catalogue = catalogue
        self.telemetry = telemetry
        self.max_event_bytes = max_event_bytes
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.batch_size = batch_size
        self.max_transaction_s = max_transaction_s
        self.processed = 0
        self.dead_lettered = 0
        self.duplicates = 0
        self.conflicts = 0
        self.skipped = 0
        # Waits for a busy or unreachable database (no attempt counted, nothing dead-lettered).
        self.held = 0
        self.follow_ups_failed = 0
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._task: asyncio.Task[None] | None = None
        self._assigned = asyncio.Event()
        self._positions: dict[TopicPartition, int] = {}
        # Offset after the last record fetched per partition, and when the partition last
        # advanced or was seen with nothing pending (monotonic clock): see stalled().
        self._fetched: dict[TopicPartition, int] = {}
        self._moved_at: dict[TopicPartition, float] = {}
        self._stopping = False
        self.failed: BaseException | None = None
        self.quiet_after_s = QUIET_AFTER_S
        self._last_records = time.monotonic()
        self._quiet = False

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        self._producer = self.kafka.producer()
        self._consumer = self.kafka.consumer(*self.topics, group_id=self.group_id)
        try:
            await self._producer.start()
            await self._consumer.start()
        except BaseException:
            await self.stop()  # half-started clients still hold connections
            raise
        if self.telemetry is not None:
            self.telemetry.observe_consumer_lag(self.lag, consumer=self.name)
        # What the process holds by now (modules, models, the service's app and clients) lives
        # as long as it does. Frozen, the collector stops walking it on each full collection:
        # under a backlog one came every few thousand events and cost the wrapper ~5 us per
        # event. stop() unfreezes, so that what has died since is freed (a consumer of the
        # same process still running then collects as before: slower, never wrong).
        gc.freeze()
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name=f"consumer-{self.service}-{self.name}")

    async def stop(self, grace_s: float = 10.0) -> None:
        """Finish the batch in hand (its effects and offsets commit), then stop; cancel only
        if that takes longer than ``grace_s`` (the inbox makes the redelivery harmless)."""
        self._stopping = True
        if self._task is not None:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError, Exception):
                await asyncio.wait_for(asyncio.shield(self._task), grace_s)
            # The loop may already have ended on an error (a rebalance during shutdown
            # raises IllegalStateError in aiokafka); it was reported as `failed` then, and
            # stopping must still close the clients.
            await cancel_within(self._task, f"consumer {self.name}")
            self._task = None
        for client in (self._consumer, self._producer):
            if client is not None:
                await within(client.stop(), f"consumer {self.name}: {type(client).__name__}.stop")
        self._consumer = self._producer = None
        gc.unfreeze()

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def wait_assigned(self, timeout_s: float = 30.0) -> None:
        """Wait until the group has given this consumer its partitions (tests, start-up)."""
        await asyncio.wait_for(self._assigned.wait(), timeout_s)

    def lag(self) -> dict[tuple[str, int], int]:
        """Records behind the high watermark per partition, from the last fetch.

        The embedded broker reports end offsets wrongly, so this is only as good as the
        broker's high watermark; on Apache Kafka it is exact.
        """
        consumer = self._consumer
        if consumer is None:
            return {}
        result: dict[tuple[str, int], int] = {}
        for tp in consumer.assignment():
            high = consumer.highwater(tp)
            position = self._positions.get(tp)
            if high is None or position is None:
                continue
            result[(tp.topic, tp.partition)] = max(0, high - position)
        return result

    def stalled(self, threshold_s: float) -> list[str]:
        """Partitions with pending records that have not advanced for ``threshold_s`` seconds.

        Pending means: records this consumer has fetched but not yet applied or
        dead-lettered (exact on any broker, as it counts what the client holds), or a high
        watermark from the last fetch beyond the applied position. The embedded broker's
        high watermarks can be too low, so there the second part may miss records it has not
        handed out yet; it never reports a stall that is not there.
        """
        consumer = self._consumer
        if consumer is None:
            return []
        now = time.monotonic()
        found = []
        for tp in sorted(consumer.assignment()):
            position = self._positions.get(tp)
            if position is None:
                continue
            pending = max(self._fetched.get(tp, 0), consumer.highwater(tp) or 0) > position
            since = now - self._moved_at.get(tp, now)
            if pending and since > threshold_s:
                found.append(
                    f"{tp.topic}[{tp.partition}] stuck at offset {position} for {since:.0f} s"
                )
        return found

    def _note_idle(self, consumer: AIOKafkaConsumer) -> None:
        now = time.monotonic()
        for tp in consumer.assignment():
            position = self._positions.get(tp)
            if position is None or self._fetched.get(tp, 0) <= position:
                high = consumer.highwater(tp)
                if position is None or high is None or high <= position:
                    self._moved_at[tp] = now

    @property
    def quiet(self) -> bool:
        """Whether the consumer fetches with the idle wait (nothing came for a while)."""
        return self._quiet

    def _pace_fetches(self, consumer: AIOKafkaConsumer, fetched: bool) -> None:
        """Fetch with the short wait while records come, with the idle wait once nothing has
        come for ``quiet_after_s``: an idle service then sends a few fetches a second instead
        of ten per consumer group."""
        now = time.monotonic()
        if fetched:
            self._last_records = now
        quiet = not fetched and now - self._last_records > self.quiet_after_s
        if quiet == self._quiet:
            return
        wait = self.kafka.fetch_max_wait_ms
        if quiet:
            wait = max(wait, self.kafka.fetch_max_wait_idle_ms)
        # aiokafka reads the wait from its fetcher for each request it builds; it offers no
        # public setter (the consumer's option only sets this at start).
        fetcher = getattr(consumer, "_fetcher", None)
        if fetcher is None or not hasattr(fetcher, "_fetch_max_wait_ms"):
            return
        fetcher._fetch_max_wait_ms = wait
        self._quiet = quiet

    def _advanced(self, tp: TopicPartition, position: int) -> None:
        self._positions[tp] = position
        self._moved_at[tp] = time.monotonic()

    # -- the loop --------------------------------------------------------------------------------

    async def _run(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        try:
            while not self._stopping:
                try:
                    # Returns as soon as records are fetched; the timeout only paces the
                    # idle loop (stall bookkeeping, the stop flag).
                    batches = await consumer.getmany(
                        timeout_ms=IDLE_LOOP_MS, max_records=self.batch_size
                    )
                except RecordTooLargeError as exc:
                    await self._skip_too_large(consumer, exc)
                    continue
                if consumer.assignment():
                    self._assigned.set()
                self._note_idle(consumer)
                self._pace_fetches(consumer, bool(batches))
                for tp, records in batches.items():
                    if records:
                        self._fetched[tp] = records[-1].offset + 1
                        if records[0].offset < self._positions.get(tp, records[0].offset + 1):
                            self._positions[tp] = records[0].offset  # first, or redelivered
                done = {}
                applied = await self._apply_fetch(batches)
                for tp, records in batches.items():
                    await self._process_partition(tp, records[applied.get(tp, 0) :])
                    done[tp] = self._positions[tp]
                if done:
                    # Effects are committed (or dead-lettered) already; one offset commit for
                    # the whole fetch saves round trips, and a redelivery after a crash is
                    # caught by the inbox.
                    await self._commit(consumer, done)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.failed = exc
            _log.exception("consumer stopped", extra={"consumer": self.name})
            raise

    async def _apply_fetch(
        self, batches: Mapping[TopicPartition, list[ConsumerRecord[Any, Any]]]
    ) -> dict[TopicPartition, int]:
        """Fast path over a whole fetch: the valid leading records of every partition in as few
        transactions as possible (a fetch holds a few dozen records per partition; one
        transaction per partition would pay its fixed cost each time). Returns how many leading
        records of each partition were applied; the rest take the partition's own path."""
        if len(batches) < 2:
            return {}
        order: list[tuple[TopicPartition, int]] = []
        prepared: list[_Prepared] = []
        for tp, records in batches.items():
            leading = self._prepare(records)
            prepared.extend(leading)
            order.append((tp, len(leading)))
        done = await self._apply_prepared(prepared)
        applied: dict[TopicPartition, int] = {}
        for tp, count in order:
            taken = min(count, done)
            done -= taken
            if taken:
                applied[tp] = taken
                self._advanced(tp, batches[tp][taken - 1].offset + 1)
        return applied

    async def _process_partition(
        self, tp: TopicPartition, records: list[ConsumerRecord[Any, Any]]
    ) -> None:
        if not records:
            return
        applied = await self._apply_batch(records)
        if applied:
            self._advanced(tp, records[applied - 1].offset + 1)
        records = records[applied:]
        for record in records:
            while True:
                try:
                    await self.process(record)
                    break
                except DeadLetterUnavailable as exc:
                    # Keep the record: go back to it and try again after a pause.
                    _log.error("dead-letter topic unavailable", extra={"error": str(exc)})
                    await asyncio.sleep(1.0)
            self._advanced(tp, record.offset + 1)

    async def _skip_too_large(self, consumer: AIOKafkaConsumer, exc: RecordTooLargeError) -> None:
        """The client skipped a record larger than the fetch size (a broker that cuts the
        batch off): dead-letter a reference to it and commit past it."""
        tp, offset = next(
            ((a, b) for a, b in zip(exc.args, exc.args[1:], strict=False)
             if isinstance(a, TopicPartition) and isinstance(b, int)),
            (None, None),
        )  # fmt: skip
        if tp is None or offset is None:
            raise exc
        record: ConsumerRecord[Any, Any] = ConsumerRecord(
            topic=tp.topic, partition=tp.partition, offset=offset, timestamp=0,
            timestamp_type=0, key=None, value=None, checksum=None,
            serialized_key_size=-1, serialized_value_size=-1, headers=(),
        )  # fmt: skip
        verdict = _Verdict(
            "envelope",
            f"record larger than the fetch size ({self.kafka.max_record_bytes} bytes)",
        )
        while True:
            try:
                await self._dead_letter(record, verdict, value_known=False)
                break
            except DeadLetterUnavailable as failure:
                _log.error("dead-letter topic unavailable", extra={"error": str(failure)})
                await asyncio.sleep(1.0)
        self._advanced(tp, offset + 1)
        await self._commit(consumer, {tp: offset + 1})

    async def _commit(self, consumer: AIOKafkaConsumer, offsets: dict[TopicPartition, int]) -> None:
        """Commit the offsets of the partitions this instance still owns. A rebalance while a
        fetch was applied may have moved some (another replica joined or left): their effects
        are committed already, their new owner reads them again from the last committed offset
        and its inbox drops what was applied here. Committing them would fail the whole commit
        (and used to stop the consumer for good)."""
        owned = consumer.assignment()
        kept = {tp: offset for tp, offset in offsets.items() if tp in owned}
        if len(kept) < len(offsets):
            _log.info(
                "offsets of moved partitions not committed: the group rebalanced",
                extra={
                    "consumer": self.name,
                    "moved": sorted(str(tp) for tp in offsets.keys() - kept.keys()),
                },
            )
        if not kept:
            return
        try:
            await consumer.commit(kept)
        except (CommitFailedError, IllegalStateError) as exc:
            # The group rebalanced between the check and the commit: this generation may
            # commit nothing. The next owner of each partition starts from the last committed
            # offset; the inbox makes the repeat harmless.
            _log.warning(
                "offsets not committed: the group rebalanced",
                extra={"consumer": self.name, "error": str(exc)},
            )

    def _delivery(
        self,
        record: ConsumerRecord[Any, Any],
        event: CloudEvent,
        data: EventModel,
        session: AsyncSession,
        follow_ups: list[FollowUp],
    ) -> Delivery[EventModel]:
        return Delivery(
            event=event,
            data=data,
            session=session,
            outbox=self.outbox,
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            follow_ups=follow_ups,
        )

    async def _follow_up(self, works: list[FollowUp]) -> None:
        """Run the follow-ups of a committed transaction, concurrently (at most
        FOLLOW_UP_CONCURRENCY at a time); one that fails is logged and counted."""
        if not works:
            return
        gate = asyncio.Semaphore(FOLLOW_UP_CONCURRENCY)

        async def run(work: FollowUp) -> None:
            async with gate:
                try:
                    await work()
                except asyncio.CancelledError:
                    raise
                except Exception:
                    self.follow_ups_failed += 1
                    _log.exception("follow-up failed", extra={"consumer": self.name})

        await asyncio.gather(*(run(work) for work in works))

    def _span(self, record: ConsumerRecord[Any, Any]) -> contextlib.AbstractContextManager[Any]:
        """A consumer span continuing the producer's trace (``traceparent`` header)."""
        if self.telemetry is None:
            return contextlib.nullcontext()
        return self.telemetry.tracer.start_as_current_span(
            f"{record.topic} process",
            context=extract_context(list(record.headers or ())),
            kind=SpanKind.CONSUMER,
            attributes={
                "messaging.system": "kafka",
                "messaging.destination.name": record.topic,
                "messaging.kafka.destination.partition": record.partition,
                "messaging.kafka.message.offset": record.offset,
                "messaging.consumer.group.name": self.group_id,
            },
        )

    async def _apply_batch(self, records: list[ConsumerRecord[Any, Any]]) -> int:
        """Fast path: apply a partition's batch in as few transactions as possible (one commit
        instead of one per event), and return how many leading records were applied. Only when
        every record is a valid event; a failure rolls the current transaction back, and the
        caller applies the records from there one by one, with retries and dead letters.
        Handlers therefore must act only through the session and outbox.

        A transaction is closed after ``max_transaction_s`` and the rest goes into the next:
        on SQLite each transaction holds the write lock, and a long batch (handlers that ask
        another service, say) would stall the service's requests and other consumers."""
        if len(records) < 2:
            return 0
        prepared = self._prepare(records)
        if len(prepared) < len(records):
            return 0
        return await self._apply_prepared(prepared)

    def _prepare(self, records: list[ConsumerRecord[Any, Any]]) -> list[_Prepared]:
        """The leading records that are valid events (read, typed, validated), up to the first
        that is not: that one takes the one-by-one path with its dead letter."""
        prepared: list[_Prepared] = []
        for record in records:
            try:
                event = from_kafka(
                    record.value, record.headers or (), max_bytes=self.max_event_bytes
                )
                if event.type in self.handlers:
                    prepared.append((record, event, self.catalogue.parse(event)))
                else:
                    self.catalogue.model_for(event.type)
                    prepared.append((record, event, None))
            except (InvalidCloudEvent, EventDataInvalid, UnknownEventType, UnknownEventVersion):
                break
        return prepared

    async def _apply_prepared(self, prepared: list[_Prepared]) -> int:
        done = 0
        while done < len(prepared):
            applied = await self._apply_chunk(prepared[done:])
            if applied == 0:
                break
            done += applied
        return done

    # Longer than 60 lines on purpose: one transaction's loop: the inbox set, the time budget and
    # the counters it threads through would scatter across helpers.
    async def _apply_chunk(self, prepared: list[_Prepared]) -> int:
        """One transaction of :meth:`_apply_batch`: how many leading records it applied."""
        started = time.perf_counter()
        processed = duplicates = skipped = taken = 0
        entries: list[inbox.Row] = []
        follow_ups: list[FollowUp] = []
        try:
            consumer_name = f"{self.service}.{self.name}"
            async with self.db.transaction() as session:
                seen = await inbox.already_processed(
                    session,
                    consumer=consumer_name,
                    events=[event for _r, event, data in prepared if data is not None],
                )
                if self.prepare is not None:
                    await self.prepare(
                        session,
                        [
                            data
                            for _r, event, data in prepared
                            if data is not None and (event.source, event.id) not in seen
                        ],
                    )
                for record, event, data in prepared:
                    if taken and time.perf_counter() - started > self.max_transaction_s:
                        break
                    if data is not None and (event.source, event.id) in seen:
                        if inbox.judge(seen[(event.source, event.id)], event) is not (
                            inbox.Claim.duplicate
                        ):
                            # A conflicting duplicate: left to the one-by-one path, which
                            # dead-letters it with its reason.
                            break
                        taken += 1
                        duplicates += 1
                        continue
                    taken += 1
                    if data is None:
                        skipped += 1
                        continue
                    entry = inbox.row(
                        consumer_name, event, record.topic, record.partition, record.offset
                    )
                    seen[(event.source, event.id)] = entry[7]
                    entries.append(entry)
                    with self._span(record):
                        await self.handlers[event.type](
                            self._delivery(record, event, data, session, follow_ups)
                        )
                    processed += 1
                # One statement for the batch's inbox entries; the handlers' own rows are
                # flushed with it at commit, or earlier by the session's autoflush when a later
                # handler's ORM query needs to see them.
                await inbox.record_rows(session, entries)
        except asyncio.CancelledError:
            raise
        except Exception:
            return 0
        await self._follow_up(follow_ups)
        if taken == 0:
            return 0
        self.processed += processed
        self.duplicates += duplicates
        self.skipped += skipped
        if self.telemetry is not None:
            each = (time.perf_counter() - started) / taken
            for _record, event, data in prepared[:taken]:
                outcome = "ok" if data is not None else "skipped"
                self.telemetry.record_handler_latency(
                    each, consumer=self.name, event_type=event.type, outcome=outcome
                )
        return taken

    async def process(self, record: ConsumerRecord[Any, Any]) -> str:
        """Apply one record; returns the outcome (ok, duplicate, skipped, dead_lettered)."""
        started = time.perf_counter()
        headers = list(record.headers or ())
        event_type = "unknown"
        outcome = "ok"
        with self._span(record) as span:
            verdict: _Verdict | None = None
            event: CloudEvent | None = None
            try:
                event = from_kafka(record.value, headers, max_bytes=self.max_event_bytes)
            except InvalidCloudEvent as exc:
                verdict = _Verdict("envelope", exc.reason)
            else:
                event_type = event.type
                if span is not None:
                    span.set_attribute("cloudevents.event_type", event.type)
                    span.set_attribute("cloudevents.event_id", event.id)
                verdict, outcome = await self._apply(event, record)
            if verdict is not None:
                outcome = "dead_lettered"
                await self._dead_letter(record, verdict)
                await self._tell_refused(record, event, verdict)
                if span is not None:
                    span.set_status(Status(StatusCode.ERROR, verdict.reason[:200]))
        if self.telemetry is not None:
            self.telemetry.record_handler_latency(
                time.perf_counter() - started,
                consumer=self.name,
                event_type=event_type,
                outcome=outcome,
            )
        return outcome

    # Longer than 60 lines on purpose: the retry loop is one state machine (attempts, holds,
    # verdicts); split, its exits would no longer read together.
    async def _apply(
        self, event: CloudEvent, record: ConsumerRecord[Any, Any]
    ) -> tuple[_Verdict | None, str]:
        handler = self.handlers.get(event.type)
        if handler is None:
            try:
                self.catalogue.model_for(event.type)
            except (UnknownEventType, UnknownEventVersion) as exc:
                return _Verdict("type", str(exc)), "dead_lettered"
            # A known event this consumer has no business with: not an error.
            self.skipped += 1
            return None, "skipped"
        try:
            data = self.catalogue.parse(event)
        except EventDataInvalid as exc:
            return _Verdict("schema", f"data does not match {event.type}: {exc.reason}"), ""
        except (UnknownEventType, UnknownEventVersion) as exc:
            return _Verdict("type", str(exc)), ""

        attempt = 0
        held = 0
        while True:
            attempt += 1
            follow_ups: list[FollowUp] = []
            try:
                async with self.db.transaction() as session:
                    claim = await inbox.claim(
                        session,
                        consumer=f"{self.service}.{self.name}",
                        event=event,
                        topic=record.topic,
                        partition=record.partition,
                        offset=record.offset,
                    )
                    if claim is inbox.Claim.duplicate:
                        self.duplicates += 1
                        return None, "duplicate"
                    if claim is inbox.Claim.conflict:
                        self.conflicts += 1
                        if self.telemetry is not None:
                            self.telemetry.count_conflicting_duplicate(self.name)
                        return (
                            _Verdict(
                                "duplicate",
                                inbox.CONFLICTING_DUPLICATE,
                                error="ConflictingDuplicate",
                                attempts=attempt,
                            ),
                            "",
                        )
                    await handler(self._delivery(record, event, data, session, follow_ups))
                self.processed += 1
                await self._follow_up(follow_ups)
                return None, "ok"
            except EventRejected as exc:
                return (
                    _Verdict(
                        "rejected",
                        exc.reason,
                        attempts=attempt,
                        code=exc.code,
                        public_reason=exc.public_reason,
                    ),
                    "",
                )
            except Refusal as exc:
                # The same refusal an HTTP caller would get: the event is at fault, not the
                # moment, so it is dead-lettered at once with the field and the reason.
                reason = f"{exc.field}: {exc.reason}"
                return _Verdict("rejected", reason, attempts=attempt), ""
            except RoutingError as exc:
                return _Verdict("routing", exc.reason, attempts=attempt), ""
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
                if transient_error(exc) or not await self._database_answers():
                    # The database is busy or away, not the event at fault: hold the partition
                    # until the work goes through (as when the dead-letter topic cannot be
                    # written) instead of dead-lettering valid events during contention or an
                    # outage. Such waits count no attempt.
                    held += 1
                    self.held += 1
                    _log.warning(
                        "database busy or unavailable, holding the partition",
                        extra={"consumer": self.name, "error": error, "held": held},
                    )
                    attempt = 0
                    await asyncio.sleep(min(DATABASE_RETRY_S, self.backoff_s * 2 ** min(held, 8)))
                    continue
                if attempt >= self.max_attempts:
                    return (
                        _Verdict(
                            "handler",
                            f"handler failed {attempt} times, last: {error}",
                            error=type(exc).__name__,
                            attempts=attempt,
                        ),
                        "",
                    )
                _log.warning(
                    "handler failed, retrying",
                    extra={"consumer": self.name, "attempt": attempt, "error": error},
                )
                await asyncio.sleep(self.backoff_s * 2 ** (attempt - 1))

    async def _tell_refused(
        self, record: ConsumerRecord[Any, Any], event: CloudEvent | None, verdict: _Verdict
    ) -> None:
        """Run the refusal hook after the dead letter is safe. A hook that fails is logged
        and counted, never retried: the dead letter is ops' copy, the notice a courtesy."""
        if self.on_refused is None:
            return
        try:
            await self.on_refused(
                Refused(
                    topic=record.topic,
                    partition=record.partition,
                    offset=record.offset,
                    event=event,
                    stage=verdict.stage,
                    reason=verdict.reason[:MAX_REASON_CHARS],
                    code=verdict.code,
                    public_reason=verdict.public_reason,
                )
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            _log.error(
                "refusal notice failed",
                extra={"consumer": self.name, "error": f"{type(exc).__name__}: {exc}"},
            )

    async def _database_answers(self) -> bool:
        try:
            async with asyncio.timeout(DATABASE_RETRY_S):
                await self.db.ping()
        except Exception:
            return False
        return True

    async def _dead_letter(
        self, record: ConsumerRecord[Any, Any], verdict: _Verdict, *, value_known: bool = True
    ) -> None:
        """Write the record to the dead-letter topic with the verdict in headers.

        The whole value goes along when it fits the record size limit; otherwise (or when
        the broker still refuses the size) a reference does: no value, the original topic,
        partition, offset, size and SHA-256 in headers, and the original headers only if
        they fit."""
        producer = self._producer
        if producer is None:
            raise DeadLetterUnavailable("consumer is not started")
        reason = verdict.reason[:MAX_REASON_CHARS]
        value: bytes | None = record.value
        verdict_headers = self._verdict_headers(record, verdict, reason)
        if value_known:
            verdict_headers.append((DLQ_SIZE, str(len(value or b"")).encode()))
            verdict_headers.append((DLQ_SHA256, hashlib.sha256(value or b"").hexdigest().encode()))
        original = [(k, v) for k, v in (record.headers or ()) if k not in _DLQ_HEADERS]
        limit = self.kafka.max_record_bytes - DLQ_MARGIN_BYTES
        key: bytes | None = record.key

        def size(key: bytes | None, value: bytes | None, headers: list[Any]) -> int:
            return int(DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, headers))

        forms: list[tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]] = []
        whole = [*original, *verdict_headers, (DLQ_VALUE, VALUE_ORIGINAL.encode())]
        if value_known and size(key, value, whole) <= limit:
            forms.append((key, value, whole))
        with_headers = [*original, *verdict_headers, (DLQ_VALUE, VALUE_REFERENCE.encode())]
        if size(key, None, with_headers) <= limit:
            forms.append((key, None, with_headers))
        # The last resort carries only the verdict and the reference.
        bare = [
            *verdict_headers,
            (DLQ_VALUE, VALUE_REFERENCE.encode()),
            (DLQ_HEADERS_KEPT, b"omitted"),
        ]
        forms.append((key if key is not None and len(key) <= 1024 else None, None, bare))
        for index, (form_key, form_value, headers) in enumerate(forms):
            try:
                await producer.send_and_wait(
                    self.dead_letter_topic, value=form_value, key=form_key, headers=headers
                )
                break
            except MessageSizeTooLargeError as exc:
                # The broker's limit is lower than ours (or the estimate was off): smaller.
                if index == len(forms) - 1:
                    raise DeadLetterUnavailable(f"{type(exc).__name__}: {exc}") from exc
                _log.warning(
                    "dead letter too large, sending a smaller form",
                    extra={"consumer": self.name, "error": str(exc)},
                )
            except Exception as exc:
                raise DeadLetterUnavailable(f"{type(exc).__name__}: {exc}") from exc
        self._count_dead_letter(record, verdict, reason)

    def _verdict_headers(
        self, record: ConsumerRecord[Any, Any], verdict: _Verdict, reason: str
    ) -> list[tuple[str, bytes]]:
        return [
            (DLQ_REASON, reason.encode()),
            (DLQ_STAGE, verdict.stage.encode()),
            (DLQ_ERROR, verdict.error.encode()),
            (DLQ_TOPIC, record.topic.encode()),
            (DLQ_PARTITION, str(record.partition).encode()),
            (DLQ_OFFSET, str(record.offset).encode()),
            (DLQ_CONSUMER, self.group_id.encode()),
            (DLQ_ATTEMPTS, str(verdict.attempts).encode()),
            (DLQ_TIME, datetime.now(UTC).isoformat().encode()),
        ]

    def _count_dead_letter(
        self, record: ConsumerRecord[Any, Any], verdict: _Verdict, reason: str
    ) -> None:
        self.dead_lettered += 1
        if self.telemetry is not None:
            self.telemetry.count_dead_lettered(verdict.stage)
        _log.warning(
            "event dead-lettered",
            extra={
                "consumer": self.name,
                "stage": verdict.stage,
                "reason": reason,
                "topic": record.topic,
                "partition": record.partition,
                "offset": record.offset,
            },
        )


class DeadLetterUnavailable(RuntimeError):
    """The dead-letter topic could not be written; the record must not be committed."""
