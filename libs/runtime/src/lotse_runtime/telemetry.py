"""OpenTelemetry setup for Lotse services: traces, metrics and W3C trace context over Kafka.

Every service builds one `Telemetry` from its app factory via `setup_telemetry`. The providers
belong to that instance and are not installed globally unless asked for, so tests can build
several side by side and read what each recorded from in-memory exporters.

Trace context crosses Kafka as W3C `traceparent`/`tracestate` headers (`inject_headers`,
`extract_context`). Those two use the W3C TraceContext propagator explicitly rather than the
global one, so the wire format does not depend on `OTEL_PROPAGATORS` or on what another
library installed.

Metric and span attributes carry ids, event types, topics and outcomes only — never personal
data (names, addresses, screening answers), because telemetry leaves the data-protection
boundary towards the ops team.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping, Sequence

from opentelemetry import metrics, trace
from opentelemetry.context import Context
from opentelemetry.metrics import CallbackOptions, Counter, Histogram, Meter, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    ConsoleMetricExporter,
    InMemoryMetricReader,
    MetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from pydantic import BaseModel, Field

__all__ = [
    "CONFLICTING_DUPLICATES_COUNTER",
    "CONSUMER_LAG_GAUGE",
    "DEAD_LETTERED_COUNTER",
    "HANDLER_LATENCY_HISTOGRAM",
    "OUTBOX_BACKLOG_GAUGE",
    "PUBLISHED_COUNTER",
    "Telemetry",
    "TelemetryConfig",
    "extract_context",
    "inject_headers",
    "setup_telemetry",
]

INSTRUMENTATION_SCOPE = "lotse_runtime"

HANDLER_LATENCY_HISTOGRAM = "lotse.handler.duration"
PUBLISHED_COUNTER = "lotse.events.published"
DEAD_LETTERED_COUNTER = "lotse.events.dead_lettered"
CONFLICTING_DUPLICATES_COUNTER = "lotse.events.conflicting_duplicates"
OUTBOX_BACKLOG_GAUGE = "lotse.outbox.backlog"
CONSUMER_LAG_GAUGE = "lotse.consumer.lag"

# The SDK's default buckets are tuned for milliseconds; handler latency is recorded in seconds,
# so almost every sample would land in the first bucket without explicit boundaries.
_LATENCY_BUCKETS_S: tuple[float, ...] = (
    0.001,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)

ConsumerLagCallback = Callable[[], dict[tuple[str, int], int]]
"""Returns the current lag per (topic, partition)."""


class TelemetryConfig(BaseModel):
    """How one service exports telemetry. Several exporters may be active at once."""

    service_name: str = Field(min_length=1)
    otlp_endpoint: str | None = Field(
        default=None,
        description="OTLP/HTTP base URL of the collector, e.g. http://collector:4318.",
    )
    console_export: bool = False
    in_memory: bool = Field(default=False, description="Keep spans and metrics in memory (tests).")
    metric_export_interval_s: float = Field(default=30.0, gt=0)

    @property
    def exports(self) -> bool:
        """Whether anything would ever read what is recorded."""
        return bool(self.otlp_endpoint) or self.console_export or self.in_memory


class Telemetry:
    """The tracer, meter and Lotse instruments of one service, with the providers behind them."""

    def __init__(
        self,
        config: TelemetryConfig,
        tracer_provider: trace.TracerProvider,
        meter_provider: metrics.MeterProvider,
        *,
        span_exporter: InMemorySpanExporter | None = None,
        metric_reader: InMemoryMetricReader | None = None,
    ) -> None:
        self.config = config
        self.exporting = config.exports
        """False when nothing exports: the providers are the API's no-ops (see setup_telemetry)."""
        self.tracer_provider = tracer_provider
        self.meter_provider = meter_provider
        self.span_exporter = span_exporter
        """The in-memory span exporter when `config.in_memory`, else None."""
        self.metric_reader = metric_reader
        """The in-memory metric reader when `config.in_memory`, else None."""
        self.tracer: Tracer = tracer_provider.get_tracer(INSTRUMENTATION_SCOPE)
        self.meter: Meter = meter_provider.get_meter(INSTRUMENTATION_SCOPE)

        self.handler_latency: Histogram = self.meter.create_histogram(
            HANDLER_LATENCY_HISTOGRAM,
            unit="s",
            description="Time an event handler took; attributes consumer, event_type, outcome.",
            explicit_bucket_boundaries_advisory=_LATENCY_BUCKETS_S,
        )
        self.events_published: Counter = self.meter.create_counter(
            PUBLISHED_COUNTER,
            unit="{event}",
            description="Events published to Kafka; attribute topic.",
        )
        self.events_dead_lettered: Counter = self.meter.create_counter(
            DEAD_LETTERED_COUNTER,
            unit="{event}",
            description="Events sent to a dead-letter topic; attribute reason_kind.",
        )
        self.conflicting_duplicates: Counter = self.meter.create_counter(
            CONFLICTING_DUPLICATES_COUNTER,
            unit="{event}",
            description="Events whose source and id were applied before with other content "
            "(dead-lettered, not applied); attribute consumer.",
        )

        # Observable gauges can only be created once per name on a meter; the callbacks behind
        # them are swapped instead so a restarted relay or consumer can re-register.
        self._lock = threading.Lock()
        self._backlog_callback: Callable[[], int] | None = None
        self._backlog_gauge_created = False
        self._lag_callbacks: dict[str | None, ConsumerLagCallback] = {}
        self._lag_gauge_created = False
        self._shut_down = False

    # -- instruments -----------------------------------------------------------------------------

    def record_handler_latency(
        self, seconds: float, *, consumer: str, event_type: str, outcome: str
    ) -> None:
        """Record one handler run; outcome is e.g. "ok", "duplicate", "retry", "dead_lettered"."""
        self.handler_latency.record(
            seconds, {"consumer": consumer, "event_type": event_type, "outcome": outcome}
        )

    def count_published(self, topic: str, count: int = 1) -> None:
        self.events_published.add(count, {"topic": topic})

    def count_dead_lettered(self, reason_kind: str, count: int = 1) -> None:
        self.events_dead_lettered.add(count, {"reason_kind": reason_kind})

    def count_conflicting_duplicate(self, consumer: str, count: int = 1) -> None:
        self.conflicting_duplicates.add(count, {"consumer": consumer})

    def observe_outbox_backlog(self, callback: Callable[[], int]) -> None:
        """Report `callback()` as gauge `lotse.outbox.backlog`; a new call replaces the old one.

        The callback runs on the metric reader's thread at every collection, so it must be cheap
        and must not touch the event loop: return a number the relay keeps up to date.
        """
        with self._lock:
            self._backlog_callback = callback
            if self._backlog_gauge_created:
                return
            self._backlog_gauge_created = True
        self.meter.create_observable_gauge(
            OUTBOX_BACKLOG_GAUGE,
            callbacks=[self._observe_backlog],
            unit="{event}",
            description="Outbox rows not yet published.",
        )

    def observe_consumer_lag(
        self, callback: ConsumerLagCallback, *, consumer: str | None = None
    ) -> None:
        """Report `callback()` as gauge `lotse.consumer.lag` with topic/partition attributes.

        A service with several consumer groups registers one callback per `consumer`, which is
        then added as an attribute; registering the same `consumer` again replaces its callback.
        The same threading caveat as for `observe_outbox_backlog` applies.
        """
        with self._lock:
            self._lag_callbacks[consumer] = callback
            if self._lag_gauge_created:
                return
            self._lag_gauge_created = True
        self.meter.create_observable_gauge(
            CONSUMER_LAG_GAUGE,
            callbacks=[self._observe_lag],
            unit="{message}",
            description="Messages behind the end of the partition, per topic and partition.",
        )

    def _observe_backlog(self, _options: CallbackOptions) -> Iterable[Observation]:
        callback = self._backlog_callback
        if callback is None:
            return []
        return [Observation(callback())]

    def _observe_lag(self, _options: CallbackOptions) -> Iterable[Observation]:
        with self._lock:
            callbacks = list(self._lag_callbacks.items())
        observations: list[Observation] = []
        for consumer, callback in callbacks:
            for (topic, partition), lag in callback().items():
                attributes: dict[str, str | int] = {"topic": topic, "partition": partition}
                if consumer is not None:
                    attributes["consumer"] = consumer
                observations.append(Observation(lag, attributes))
        return observations

    # -- lifecycle -------------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Flush pending spans and metrics and stop the exporters. Safe to call twice."""
        if self._shut_down:
            return
        self._shut_down = True
        if isinstance(self.tracer_provider, TracerProvider):
            self.tracer_provider.force_flush()
            self.tracer_provider.shutdown()
        if isinstance(self.meter_provider, MeterProvider):
            self.meter_provider.force_flush()
            self.meter_provider.shutdown()


def setup_telemetry(config: TelemetryConfig, *, install_global: bool = False) -> Telemetry:
    """Build the providers and exporters `config` asks for.

    `install_global=True` also makes them the process-wide providers, which third-party
    instrumentation (FastAPI, aiokafka) reads; the OTel API allows that only once per process,
    so only the production entry point should pass it.

    When nothing exports, the providers are the API's no-ops: spans and instruments cost a
    call each and record nothing, and a consumer's span still carries the incoming trace
    context on to the events it publishes (a no-op span passes its parent through).
    """
    if not config.exports:
        return Telemetry(config, trace.NoOpTracerProvider(), metrics.NoOpMeterProvider())
    resource = Resource.create({SERVICE_NAME: config.service_name})

    tracer_provider = TracerProvider(resource=resource)
    span_exporter: InMemorySpanExporter | None = None
    if config.in_memory:
        span_exporter = InMemorySpanExporter()
        tracer_provider.add_span_processor(SimpleSpanProcessor(span_exporter))
    if config.otlp_endpoint:
        # Imported lazily: the OTLP exporter pulls in protobuf and requests, which tests and
        # console-only runs do not need.
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        tracer_provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=_otlp_url(config.otlp_endpoint, "traces")))
        )
    if config.console_export:
        tracer_provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))

    interval_ms = config.metric_export_interval_s * 1000
    readers: list[MetricReader] = []
    metric_reader: InMemoryMetricReader | None = None
    if config.in_memory:
        metric_reader = InMemoryMetricReader()
        readers.append(metric_reader)
    if config.otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

        readers.append(
            PeriodicExportingMetricReader(
                OTLPMetricExporter(endpoint=_otlp_url(config.otlp_endpoint, "metrics")),
                export_interval_millis=interval_ms,
            )
        )
    if config.console_export:
        readers.append(
            PeriodicExportingMetricReader(
                ConsoleMetricExporter(), export_interval_millis=interval_ms
            )
        )
    meter_provider = MeterProvider(resource=resource, metric_readers=readers)

    if install_global:
        trace.set_tracer_provider(tracer_provider)
        metrics.set_meter_provider(meter_provider)

    return Telemetry(
        config,
        tracer_provider,
        meter_provider,
        span_exporter=span_exporter,
        metric_reader=metric_reader,
    )


def _otlp_url(base: str, signal: str) -> str:
    # The exporters use an explicit endpoint verbatim, so the per-signal path has to be added
    # here (the env-var fallback would add it, the constructor argument does not).
    return f"{base.rstrip('/')}/v1/{signal}"


# -- W3C trace context over Kafka headers ---------------------------------------------------------


def inject_headers(context: Context | None = None) -> list[tuple[str, bytes]]:
    """Kafka headers carrying the span of `context` (default: the current one).

    Returns an empty list when there is no valid span, so callers can always extend with it.
    """
    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier, context=context)
    return [(key, value.encode("ascii")) for key, value in carrier.items()]


def extract_context(
    headers: Sequence[tuple[str, bytes | None]] | Mapping[str, str | bytes | None],
) -> Context:
    """The context carried by Kafka headers, to start a consumer span as its child.

    Accepts raw aiokafka headers (a sequence of pairs) or an already-decoded mapping such as
    FastStream's. The result is built on an empty context, not the current one, so a message
    without `traceparent` starts a new trace instead of joining whatever happens to be current.
    """
    pairs = headers.items() if isinstance(headers, Mapping) else headers
    carrier: dict[str, str] = {}
    for key, raw in pairs:
        name = key.lower()
        if name in carrier or raw is None:
            continue
        if isinstance(raw, bytes):
            try:
                value = raw.decode("ascii")
            except UnicodeDecodeError:
                continue  # a malformed header must not break consumption; the trace just breaks
        else:
            value = raw
        carrier[name] = value
    return TraceContextTextMapPropagator().extract(carrier, context=Context())
