"""The service factory: one function turns settings into a running FastAPI app with its
database, outbox relay, consumers, telemetry, health routes and caller resolution.

A service's own ``app.py`` calls :func:`create_service_app` with its tables, routers and a
``wire`` function that registers consumers; everything else is the same for every service.
Nothing is built at import time, so tests construct apps with the settings they need.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any, Generic, TypeVar

from aiokafka.admin import AIOKafkaAdminClient
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from lotse_contracts.city import Municipality, load_city
from lotse_contracts.events.base import CATALOGUE
from lotse_contracts.subscriptions import SubscriptionRegistry, load_registry
from lotse_contracts.topics import dead_letter
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.instrumentation.sqlalchemy.engine import EngineTracer
from opentelemetry.metrics import CallbackOptions, Observation
from pydantic import BaseModel, Field
from sqlalchemy import Table
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlmodel import SQLModel

from lotse_runtime import audit
from lotse_runtime.audit_api import audit_router
from lotse_runtime.auth import (
    DEV_ISSUER,
    DevelopmentIssuer,
    IssuerUnavailable,
    JwksSource,
    JwtCallerResolver,
)
from lotse_runtime.consumer import EventConsumer, Handler, Prepare, RefusalHook
from lotse_runtime.contract_docs import serve_contract_documents
from lotse_runtime.db import Database, transient_error
from lotse_runtime.docs import serve_docs_offline
from lotse_runtime.health import HEALTH_TAG, ReadinessCheck, health_router
from lotse_runtime.identity import (
    AccessDenied,
    Caller,
    CallerResolver,
    NotAuthenticated,
    install_identity,
)
from lotse_runtime.inputs import InputGuard
from lotse_runtime.kafka import KafkaConfig, TopicSpec, platform_topics, verify_topics
from lotse_runtime.lease import LeaseKeeper
from lotse_runtime.logging import configure_logging
from lotse_runtime.migrations import create_schema
from lotse_runtime.openapi import document_errors
from lotse_runtime.outbox import Outbox, OutboxRelay
from lotse_runtime.policy import (
    REFUSED_BY_POLICY,
    AccessPolicy,
    RouteNotPermitted,
    check_policy,
    install_policy,
    policy_gate,
    public,
)
from lotse_runtime.refusal import install_refusals
from lotse_runtime.settings import ServiceSettings
from lotse_runtime.stopping import cancel_within, within
from lotse_runtime.telemetry import Telemetry, TelemetryConfig, setup_telemetry

_log = logging.getLogger(__name__)


Clock = Callable[[], datetime]


def _utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass
class PeriodicJob:
    """A background task of a service, run at a fixed interval.

    A run-once job (``once=True``) runs only on the replica holding its lease (lease.py);
    on the others each tick is a standby tick. A per-replica job runs on every replica."""

    name: str
    interval_s: float
    run: Callable[[ServiceRuntime[Any]], Awaitable[None]]
    once: bool = False
    runs: int = 0
    """Ticks this replica took the job on (the run, or the lease check, may have failed)."""
    standby: int = 0
    """Ticks skipped because another replica holds the lease."""
    failures: int = 0
    last_error: str | None = None
    last_run_at: datetime | None = None
    holding: bool = False
    """Whether this replica held the lease at its last tick (always True for per-replica)."""
    _task: asyncio.Task[None] | None = None

    async def run_once(self, runtime: ServiceRuntime[Any]) -> None:
        if self.once:
            try:
                self.holding = await runtime.leases.hold(self.name)
            except Exception as exc:
                # No database, no lease: this tick is lost here, as it is for the job itself.
                self.holding = False
                self._failed(exc)
                runtime.telemetry_jobs.count(self.name, "failed")
                self.runs += 1
                return
            if not self.holding:
                self.standby += 1
                runtime.telemetry_jobs.count(self.name, "standby")
                return
        else:
            self.holding = True
        try:
            await self.run(runtime)
            self.last_error = None
            runtime.telemetry_jobs.count(self.name, "ok")
        except Exception as exc:
            self._failed(exc)
            runtime.telemetry_jobs.count(self.name, "failed")
        finally:
            self.runs += 1
            self.last_run_at = _utc_now()

    def _failed(self, exc: Exception) -> None:
        self.failures += 1
        self.last_error = f"{type(exc).__name__}: {exc}"
        _log.exception("periodic job failed", extra={"job": self.name})

    def start(self, runtime: ServiceRuntime[Any]) -> None:
        async def loop() -> None:
            while True:
                await self.run_once(runtime)
                await asyncio.sleep(self.interval_s)

        self._task = asyncio.create_task(loop(), name=f"job-{self.name}")

    async def stop(self) -> None:
        await cancel_within(self._task, f"job {self.name}")
        self._task = None


class JobTelemetry:
    """Metrics of the periodic jobs: ``lotse.job.ticks`` (counter; attributes ``job`` and
    ``outcome``: ok, failed, standby) and ``lotse.job.lease.held`` (1 on the replica holding
    a run-once job's lease, 0 on the others).

    One per :class:`Telemetry` (:meth:`of`): a meter keeps only the first callback of an
    observable gauge, so runtimes sharing one (tests) share this too."""

    def __init__(self, telemetry: Telemetry) -> None:
        meter = telemetry.meter
        self._ticks = meter.create_counter(
            "lotse.job.ticks",
            unit="{tick}",
            description="Ticks of periodic jobs by outcome (ok, failed, standby).",
        )
        self._sources: list[Callable[[], Sequence[PeriodicJob]]] = []
        meter.create_observable_gauge(
            "lotse.job.lease.held",
            callbacks=[self._observe_held],
            unit="{lease}",
            description="1 where this replica holds a run-once job's lease, else 0.",
        )

    @classmethod
    def of(cls, telemetry: Telemetry, jobs: Callable[[], Sequence[PeriodicJob]]) -> JobTelemetry:
        found = _JOB_TELEMETRY.get(telemetry)
        if found is None:
            found = _JOB_TELEMETRY[telemetry] = cls(telemetry)
        found._sources.append(jobs)
        return found

    def count(self, job: str, outcome: str) -> None:
        self._ticks.add(1, {"job": job, "outcome": outcome})

    def _observe_held(self, _options: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(1 if job.holding else 0, {"job": job.name})
            for source in list(self._sources)
            for job in source()
            if job.once
        ]


_JOB_TELEMETRY: weakref.WeakKeyDictionary[Telemetry, JobTelemetry] = weakref.WeakKeyDictionary()


S = TypeVar("S", bound=ServiceSettings)


@dataclass
class ServiceRuntime(Generic[S]):
    """Everything a service's routes and consumers work with, built from its settings;
    typed by the service's own settings class, so no service casts them."""

    settings: S
    city: Municipality
    registry: SubscriptionRegistry
    db: Database
    kafka: KafkaConfig
    telemetry: Telemetry
    outbox: Outbox
    relay: OutboxRelay
    leases: LeaseKeeper
    """The leases of this replica's run-once jobs (lease.py)."""
    telemetry_jobs: JobTelemetry
    consumers: list[EventConsumer] = field(default_factory=list)
    jobs: list[PeriodicJob] = field(default_factory=list)
    kafka_started: asyncio.Event = field(default_factory=asyncio.Event)
    topic_problems: list[str] | None = None
    """What the last topic check found wrong (empty: all as planned; None: not checked yet)."""
    clock: Clock = field(default=lambda: _utc_now())
    """Current time, aware UTC. Tests pass a controllable clock to create_service_app."""
    with_broker: bool = True
    """False runs the service without Kafka (``lotse_runtime.testing``): no topics, no
    consumer loop, no relay; events are fed to the consumers' handlers in process."""
    _broker_admin: AIOKafkaAdminClient | None = field(default=None, init=False, repr=False)
    _broker_check_lock: asyncio.Lock = field(default_factory=asyncio.Lock, init=False, repr=False)

    @property
    def service(self) -> str:
        return self.settings.service_name

    def add_consumer(
        self,
        name: str,
        topics: Iterable[str],
        handlers: Mapping[str, Handler],
        *,
        on_refused: RefusalHook | None = None,
        prepare: Prepare | None = None,
    ) -> EventConsumer:
        """Register a consumer group ``lotse-<service>-<name>`` over (unprefixed) topics;
        ``on_refused`` is called for each record it dead-letters (see ``Refused``),
        ``prepare`` at the start of each batch transaction (see ``Prepare``)."""
        settings = self.settings
        consumer = EventConsumer(
            name=name,
            service=self.service,
            topics=[settings.topic(t) for t in topics],
            handlers=handlers,
            db=self.db,
            outbox=self.outbox,
            kafka=self.kafka,
            group_id=settings.consumer_group(name),
            dead_letter_topic=settings.topic(dead_letter(self.service)),
            catalogue=CATALOGUE,
            telemetry=self.telemetry,
            max_event_bytes=settings.max_event_bytes,
            max_attempts=settings.consumer_max_attempts,
            backoff_s=settings.consumer_backoff_s,
            on_refused=on_refused,
            prepare=prepare,
        )
        self.consumers.append(consumer)
        return consumer

    def add_job(
        self,
        name: str,
        interval_s: float,
        run: Callable[[ServiceRuntime[Any]], Awaitable[None]],
        *,
        once: bool = False,
    ) -> PeriodicJob:
        """Run ``run(runtime)`` every ``interval_s`` seconds while the app runs (e.g. overdue
        checks). A failing run is logged and counted; the next one runs on schedule.

        ``once=True``: of all replicas of the service on one database, only the holder of the
        job's lease runs it (lease.py); the others stand by and take over at their next tick
        after the holder is gone. Leave it False only for work that belongs to each replica
        (its own caches, its own connections)."""
        if any(job.name == name for job in self.jobs):
            raise ValueError(f"job {name!r} is registered twice (its lease is by name)")
        job = PeriodicJob(name=name, interval_s=interval_s, run=run, once=once)
        self.jobs.append(job)
        return job

    async def job_states(self) -> list[JobState]:
        """Each job's state on this replica, and for run-once jobs who holds the lease."""
        holders = {
            h.name: h for h in await self.leases.holders([j.name for j in self.jobs if j.once])
        }
        states = []
        for job in self.jobs:
            holder = holders.get(job.name)
            states.append(
                JobState(
                    name=job.name,
                    interval_s=job.interval_s,
                    once=job.once,
                    held_here=job.holding if holder is None else holder.held_here,
                    holder=self.leases.replica if holder is None else holder.holder,
                    runs=job.runs,
                    standby=job.standby,
                    failures=job.failures,
                    last_run_at=job.last_run_at,
                    last_error=job.last_error.split(":", 1)[0] if job.last_error else None,
                )
            )
        return states

    def planned_topics(self) -> list[TopicSpec]:
        """Every platform topic with the partition count and size limit this service expects."""
        settings = self.settings
        return platform_topics(
            self.registry,
            prefix=settings.topic_prefix,
            partitions=settings.topic_partitions,
            replication=settings.topic_replication,
            max_record_bytes=settings.kafka_max_record_bytes,
        )

    async def verify_topics(self) -> list[str]:
        """Check the platform's topics (existence, partition count), re-create missing ones
        where ``create_topics`` allows, and keep the problems for readiness."""
        report = await verify_topics(
            self.kafka, self.planned_topics(), create=self.settings.create_topics
        )
        self.topic_problems = report.problems
        return report.problems

    async def check_database(self) -> None:
        await self.db.ping()

    async def check_broker(self) -> None:
        if not self.kafka_started.is_set():
            raise RuntimeError("not connected to Kafka yet")
        # One admin client for every probe, dropped when a probe fails (the next one starts
        # afresh): a client per probe (connect, metadata, close) every 5 s cost an idle
        # service more CPU than all else it did between two probes.
        async with self._broker_check_lock:
            admin = self._broker_admin
            try:
                if admin is None:
                    admin = self.kafka.admin()
                    await admin.start()
                    self._broker_admin = admin
                await admin.list_topics()
            except BaseException:
                self._broker_admin = None
                if admin is not None:
                    with contextlib.suppress(Exception):
                        await admin.close()
                raise

    async def close_broker_check(self) -> None:
        """Close the readiness probe's admin client (at shutdown)."""
        admin, self._broker_admin = self._broker_admin, None
        if admin is not None:
            with contextlib.suppress(Exception):
                await admin.close()

    async def check_consumers(self) -> None:
        stopped = [c.name for c in self.consumers if not c.running]
        if stopped:
            raise RuntimeError(f"consumer(s) stopped: {', '.join(stopped)}")
        stalled = [
            f"{c.name}: {where}"
            for c in self.consumers
            for where in c.stalled(self.settings.consumer_stall_s)
        ]
        if stalled:
            raise RuntimeError(f"consumer(s) not advancing: {'; '.join(stalled)}")

    async def check_topics(self) -> None:
        problems = self.topic_problems
        if problems is None:
            raise RuntimeError("topics not checked yet")
        if problems:
            # Wrong partition counts first: they name topic, expected and found counts.
            ordered = sorted(problems, key=lambda line: "missing" in line)
            raise RuntimeError("; ".join(ordered))

    async def check_relay(self) -> None:
        if self.relay.last_error is not None:
            raise RuntimeError(f"outbox relay failing: {self.relay.last_error}")


def build_runtime(
    settings: S, *, telemetry: Telemetry | None = None, clock: Clock | None = None
) -> ServiceRuntime[S]:
    """Construct (but do not start) the parts of one service."""
    city = load_city(settings.city)
    registry = load_registry(city, settings.subscriptions_file)
    db = Database(
        settings.resolved_database_url(),
        pool_size=settings.database_pool_size,
        max_overflow=settings.database_max_overflow,
        ping_after_idle_s=settings.database_ping_after_idle_s,
    )
    kafka = KafkaConfig(
        bootstrap=settings.kafka_bootstrap,
        client_id=f"lotse-{settings.service_name}",
        session_timeout_ms=settings.consumer_session_timeout_ms,
        heartbeat_interval_ms=settings.consumer_heartbeat_interval_ms,
        max_record_bytes=settings.kafka_max_record_bytes,
        fetch_max_wait_ms=settings.consumer_fetch_max_wait_ms,
        fetch_max_wait_idle_ms=settings.consumer_fetch_max_wait_idle_ms,
        extra=settings.kafka_client_options(),
    )
    if telemetry is None:
        telemetry = setup_telemetry(
            TelemetryConfig(
                service_name=f"lotse-{settings.service_name}",
                otlp_endpoint=settings.otlp_endpoint,
            )
        )
    relay = OutboxRelay(
        db,
        kafka,
        service=settings.service_name,
        telemetry=telemetry,
        batch_size=settings.relay_batch_size,
        poll_interval_s=settings.relay_poll_interval_s,
    )
    outbox = Outbox(
        source=f"/lotse/{settings.service_name}",
        topic_prefix=settings.topic_prefix,
        registry=registry,
        on_commit=relay.wake,
        schema_base=settings.contracts_base(),
        leading=relay.leading,
    )
    jobs: list[PeriodicJob] = []
    return ServiceRuntime(
        settings=settings,
        city=city,
        registry=registry,
        db=db,
        kafka=kafka,
        telemetry=telemetry,
        outbox=outbox,
        relay=relay,
        leases=LeaseKeeper(db, service=settings.service_name),
        telemetry_jobs=JobTelemetry.of(telemetry, lambda: jobs),
        jobs=jobs,
        clock=clock or _utc_now,
    )


async def _connect_kafka(runtime: ServiceRuntime[Any]) -> None:
    """Verify (and where allowed create) topics and start consumers, retrying while the
    broker is away; then check the topics again every ``topic_check_interval_s``."""
    await _start_kafka(runtime)
    while True:
        await asyncio.sleep(runtime.settings.topic_check_interval_s)
        try:
            await runtime.verify_topics()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # The broker check reports an unreachable broker; the last findings stay.
            _log.warning("topic check failed", extra={"error": f"{type(exc).__name__}: {exc}"})


async def _start_kafka(runtime: ServiceRuntime[Any]) -> None:
    delay = 0.5
    while True:
        try:
            # A wrong partition count is not repaired here (it cannot be, safely): readiness
            # names it until an operator does. Consumers start all the same.
            await runtime.verify_topics()
            for consumer in runtime.consumers:
                if not consumer.running:
                    await consumer.start()
            runtime.kafka_started.set()
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            _log.warning(
                "Kafka not reachable yet, retrying",
                extra={"error": f"{type(exc).__name__}: {exc}", "retry_in_s": delay},
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 15.0)


def _validation_error_handler(_request: Request, exc: Exception) -> JSONResponse:
    """422 naming each bad field and the reason, in one stable shape for every service."""
    assert isinstance(exc, RequestValidationError)
    errors = [
        {
            "field": ".".join(str(p) for p in error["loc"] if p not in ("body",)) or "body",
            "reason": error["msg"],
        }
        for error in exc.errors()
    ]
    return JSONResponse({"detail": "invalid request", "errors": errors}, status_code=422)


#: Seconds a client is asked to wait before retrying a request the busy database refused.
BUSY_RETRY_AFTER_S = 1


async def _busy_database_handler(_request: Request, exc: Exception) -> Response:
    """503 with Retry-After when the database is busy or unreachable: the request's
    transaction was rolled back, so the same request (same Idempotency-Key) may simply be
    sent again. Any other database error stays a 500."""
    if not transient_error(exc):
        raise exc
    _log.warning("database busy or unavailable: %s", type(exc).__name__)
    return JSONResponse(
        {"detail": "database busy or unavailable, nothing was changed; retry"},
        status_code=503,
        headers={"Retry-After": str(BUSY_RETRY_AFTER_S)},
    )


async def _issuer_unavailable_handler(_request: Request, exc: Exception) -> Response:
    _log.warning("token issuer's keys unavailable: %s", exc)
    return JSONResponse(
        {"detail": "the token issuer's keys cannot be fetched; retry"},
        status_code=503,
        headers={"Retry-After": str(BUSY_RETRY_AFTER_S)},
    )


# Longer than 60 lines on purpose: the order of lifespan, handlers, routers, policy and middleware
# matters and reads top to bottom here.
def create_service_app(
    settings: S,
    *,
    title: str,
    description: str,
    version: str = "0.1.0",
    tables: Sequence[type[SQLModel] | Table] = (),
    routers: Sequence[APIRouter] = (),
    policy: AccessPolicy | None = None,
    wire: Callable[[ServiceRuntime[S]], object] | None = None,
    caller_resolver: CallerResolver | None = None,
    telemetry: Telemetry | None = None,
    openapi_tags: list[dict[str, Any]] | None = None,
    clock: Clock | None = None,
) -> FastAPI:
    """Build a service's FastAPI app; the lifespan starts and stops its runtime.

    `policy` names, for every route of `routers`, who may call it and how calls are audited
    (see policy.py); a route without a rule makes this raise ``PolicyError``."""
    runtime = build_runtime(settings, telemetry=telemetry, clock=clock)
    if wire is not None:
        wire(runtime)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        configure_logging(settings.service_name, settings.log_level)
        check_policy(app)  # routes added after the build need their rule too
        await create_schema(runtime.db, tables, service=settings.service_name)
        connect: asyncio.Task[None] | None = None
        if runtime.with_broker:
            await runtime.relay.start()
            connect = asyncio.create_task(_connect_kafka(runtime), name="kafka-connect")
        for job in runtime.jobs:
            job.start(runtime)
        try:
            yield
        finally:
            # Each step is bounded (lotse_runtime.stopping): one client that never answers
            # must not keep the pod from ending, nor the steps after it from running.
            for job in runtime.jobs:
                await job.stop()
            # The other replicas take the jobs at their next tick.
            await within(runtime.leases.close(), "leases")
            if connect is not None:
                await cancel_within(connect, "kafka connect")
                for consumer in runtime.consumers:
                    await consumer.stop()
                await within(runtime.relay.publish_pending(), "outbox: last pass", timeout_s=2.0)
                await runtime.relay.stop()
            await within(runtime.close_broker_check(), "broker check")
            await within(runtime.db.dispose(), "database pool")
            if telemetry is None:
                runtime.telemetry.shutdown()

    app = FastAPI(
        title=title,
        description=description,
        version=version,
        lifespan=lifespan,
        openapi_tags=openapi_tags,
        # The access policy's role gate, ahead of every route's own parameters.
        dependencies=[Depends(policy_gate)],
    )
    app.state.runtime = runtime
    serve_docs_offline(app)
    serve_contract_documents(app, settings.contracts_base())
    _instrument(app, runtime)
    app.add_exception_handler(RequestValidationError, _validation_error_handler)
    for kind in (DBAPIError, PoolTimeoutError):
        app.add_exception_handler(kind, _busy_database_handler)
    app.add_exception_handler(IssuerUnavailable, _issuer_unavailable_handler)
    install_refusals(app)
    install_identity(app, caller_resolver or resolver_from_settings(settings))
    _audit_refusals(app, runtime)
    app.include_router(audit_router())
    checks: dict[str, ReadinessCheck] = {
        "database": runtime.check_database,
        "broker": runtime.check_broker,
        "consumers": runtime.check_consumers,
        "outbox": runtime.check_relay,
        "topics": runtime.check_topics,
    }
    app.include_router(health_router(checks, timeout_s=settings.readiness_timeout_s))
    app.include_router(_jobs_router())
    for router in routers:
        app.include_router(router)
    install_policy(app, runtime, (policy or AccessPolicy({})) | JOBS_POLICY)
    # Outermost: the body's size and the request's clock are settled before anything else.
    app.add_middleware(InputGuard, runtime=runtime)
    document_errors(app)
    return app


class JobState(BaseModel):
    """One periodic job as this replica sees it (no personal data: names, counts, times)."""

    name: str
    interval_s: float
    once: bool = Field(description="Runs on one replica only, the holder of its lease.")
    holder: str | None = Field(
        description="Replica holding the lease (run-once jobs; None: nobody right now), "
        "else this replica."
    )
    held_here: bool
    runs: int = Field(description="Ticks this replica took the job on.")
    standby: int = Field(description="Ticks skipped here because another replica held it.")
    failures: int
    last_run_at: datetime | None
    last_error: str | None = Field(description="Error class of the last failed tick, if any.")


class JobsView(BaseModel):
    replica: str
    jobs: list[JobState]


#: ``GET /jobs`` shows what ``/readyz`` shows, names and counts only: open like the probes.
JOBS_POLICY = AccessPolicy({"GET /jobs": public()})


def _jobs_router() -> APIRouter:
    router = APIRouter(tags=[HEALTH_TAG])

    @router.get(
        "/jobs",
        response_model=JobsView,
        summary="Periodic jobs on this replica, and which replica holds each run-once lease",
    )
    async def jobs(request: Request) -> JSONResponse:
        runtime = runtime_of(request)
        view = JobsView(replica=runtime.leases.replica, jobs=await runtime.job_states())
        return JSONResponse(view.model_dump(mode="json"), headers={"Cache-Control": "no-store"})

    return router


def _instrument(app: FastAPI, runtime: ServiceRuntime[Any]) -> None:
    """HTTP server spans (continuing an incoming ``traceparent``) and database spans, so a
    trace runs from the request through the database and the outbox to every consumer."""
    telemetry = runtime.telemetry
    if not telemetry.exporting:
        # Nobody would see these spans: no middleware and no per-statement hooks.
        return
    FastAPIInstrumentor.instrument_app(
        app,
        excluded_urls="healthz,readyz",
        tracer_provider=telemetry.tracer_provider,
        meter_provider=telemetry.meter_provider,
    )
    # Per engine rather than SQLAlchemyInstrumentor().instrument(): that one is a process-wide
    # singleton bound to the first caller's providers, wrong for several apps in one process.
    EngineTracer(  # type: ignore[no-untyped-call]
        telemetry.tracer,
        runtime.db.engine.sync_engine,
        telemetry.meter.create_up_down_counter(
            "db.client.connections.usage", unit="connections", description="Connections by state."
        ),
    )


def _audit_refusals(app: FastAPI, runtime: ServiceRuntime[Any]) -> None:
    """Record every 401 and 403 in the audit log, then answer as the identity hook does."""
    answers: dict[type[Exception], Any] = {
        kind: app.exception_handlers[kind] for kind in (NotAuthenticated, AccessDenied)
    }

    async def audited(request: Request, exc: Exception) -> Response:
        caller = getattr(request.state, "caller", None)
        route = request.scope.get("route")
        try:
            async with runtime.db.transaction() as session:
                audit.record(
                    session,
                    service=runtime.service,
                    caller=caller if isinstance(caller, Caller) else None,
                    action=(
                        audit.AuditAction.unauthenticated
                        if isinstance(exc, NotAuthenticated)
                        else audit.AuditAction.denied
                    ),
                    case_id=request.path_params.get("case_id"),
                    purpose=REFUSED_BY_POLICY if isinstance(exc, RouteNotPermitted) else "refused",
                    path=getattr(route, "path", request.url.path),
                )
        except Exception:
            _log.exception("could not audit a refused request")
        answer = answers[NotAuthenticated if isinstance(exc, NotAuthenticated) else AccessDenied]
        result = answer(request, exc)
        if isinstance(result, Response):
            return result
        response: Response = await result
        return response

    for kind in answers:
        app.add_exception_handler(kind, audited)


def resolver_from_settings(settings: ServiceSettings) -> CallerResolver:
    """Bearer-token verification against the configured issuer, or the local development
    issuer when none is configured (the embedded default). There is no unauthenticated mode."""
    if settings.auth_jwks is None:
        issuer = DevelopmentIssuer(settings.dev_issuer_key_file(), audience=settings.auth_audience)
        return issuer.resolver()
    return JwtCallerResolver(
        keys=JwksSource(settings.auth_jwks),
        issuer=settings.auth_issuer or DEV_ISSUER,
        audience=settings.auth_audience,
    )


def runtime_of(request: Request) -> ServiceRuntime[Any]:
    """The runtime of the app serving this request."""
    runtime: ServiceRuntime[Any] = request.app.state.runtime
    return runtime


async def current_runtime(request: Request) -> ServiceRuntime[Any]:
    """FastAPI dependency: :func:`runtime_of`.

    A coroutine though it awaits nothing, as every Lotse dependency is: FastAPI runs a plain
    ``def`` dependency in its thread pool, a thread hand-off per dependency and request
    (``tests/runtime/test_dependencies.py``)."""
    return runtime_of(request)


#: A route's runtime, typed by any service (routes that need their own settings type
#: declare ``Annotated[ServiceRuntime[MySettings], Depends(current_runtime)]``).
RuntimeDep = Annotated[ServiceRuntime[Any], Depends(current_runtime)]
