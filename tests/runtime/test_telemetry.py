"""Telemetry: trace context across Kafka headers, Lotse instruments, isolation of instances."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from lotse_runtime.telemetry import (
    CONSUMER_LAG_GAUGE,
    DEAD_LETTERED_COUNTER,
    HANDLER_LATENCY_HISTOGRAM,
    OUTBOX_BACKLOG_GAUGE,
    PUBLISHED_COUNTER,
    Telemetry,
    TelemetryConfig,
    extract_context,
    inject_headers,
    setup_telemetry,
)
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.trace import SpanKind


@pytest.fixture
def telemetry() -> Iterator[Telemetry]:
    built = setup_telemetry(TelemetryConfig(service_name="lotse-test", in_memory=True))
    yield built
    built.shutdown()


def _spans(telemetry: Telemetry) -> tuple[ReadableSpan, ...]:
    assert telemetry.span_exporter is not None
    return telemetry.span_exporter.get_finished_spans()


def _points(reader: InMemoryMetricReader | None, name: str) -> list[Any]:
    assert reader is not None
    data = reader.get_metrics_data()
    if data is None:
        return []
    return [
        point
        for resource_metrics in data.resource_metrics
        for scope_metrics in resource_metrics.scope_metrics
        for metric in scope_metrics.metrics
        if metric.name == name
        for point in metric.data.data_points
    ]


def test_trace_context_survives_kafka_headers(telemetry: Telemetry) -> None:
    with telemetry.tracer.start_as_current_span("publish", kind=SpanKind.PRODUCER) as producer:
        headers = inject_headers()
    producer_context = producer.get_span_context()

    # Consumer side: a fresh context with nothing current, only the headers.
    assert trace.get_current_span().get_span_context().is_valid is False
    parent = extract_context(headers)
    with telemetry.tracer.start_as_current_span(
        "consume", context=parent, kind=SpanKind.CONSUMER
    ) as consumer:
        pass

    assert dict(headers)["traceparent"].startswith(b"00-")
    assert consumer.get_span_context().trace_id == producer_context.trace_id
    finished = {span.name: span for span in _spans(telemetry)}
    assert set(finished) == {"publish", "consume"}
    consumed = finished["consume"]
    assert consumed.parent is not None
    assert consumed.parent.span_id == producer_context.span_id
    assert consumed.parent.is_remote


def test_inject_uses_explicit_context(telemetry: Telemetry) -> None:
    with telemetry.tracer.start_as_current_span("outer") as outer:
        explicit = trace.set_span_in_context(outer)
    headers = dict(inject_headers(explicit))
    expected = f"{outer.get_span_context().span_id:016x}".encode()
    assert headers["traceparent"].split(b"-")[2] == expected


def test_tracestate_is_carried(telemetry: Telemetry) -> None:
    traceparent = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    context = extract_context([("traceparent", traceparent), ("tracestate", b"lotse=1")])
    headers = dict(inject_headers(context))
    assert headers == {"traceparent": traceparent, "tracestate": b"lotse=1"}


def test_no_span_no_headers() -> None:
    assert inject_headers() == []
    assert inject_headers(Context()) == []


def test_extract_tolerates_missing_and_malformed_headers(telemetry: Telemetry) -> None:
    for headers in (
        [],
        [("traceparent", None)],
        [("traceparent", b"\xff\xfe")],
        [("traceparent", b"garbage")],
        [("ce_type", b"de.lotse.intake.case_registered.v1")],
    ):
        context = extract_context(headers)
        assert trace.get_current_span(context).get_span_context().is_valid is False
        # A span started from it is a new root, not a child of whatever happens to be current.
        with (
            telemetry.tracer.start_as_current_span("ambient"),
            telemetry.tracer.start_as_current_span("consume", context=context),
        ):
            pass
        consumed = [s for s in _spans(telemetry) if s.name == "consume"][-1]
        assert consumed.parent is None


def test_extract_accepts_decoded_mapping_case_insensitively() -> None:
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    context = extract_context({"TraceParent": traceparent})
    span_context = trace.get_current_span(context).get_span_context()
    assert span_context.trace_id == 0x0AF7651916CD43DD8448EB211C80319C
    assert span_context.span_id == 0xB7AD6B7169203331


def test_handler_latency_and_counters(telemetry: Telemetry) -> None:
    attrs = {"consumer": "visits", "event_type": "de.lotse.intake.case_registered.v1"}
    telemetry.record_handler_latency(0.02, outcome="ok", **attrs)
    telemetry.record_handler_latency(0.5, outcome="ok", **attrs)
    telemetry.handler_latency.record(1.5, {**attrs, "outcome": "dead_lettered"})
    telemetry.count_published("lotse.visits")
    telemetry.events_published.add(2, {"topic": "lotse.visits"})
    telemetry.count_dead_lettered("validation")

    latency = {
        point.attributes["outcome"]: point
        for point in _points(telemetry.metric_reader, HANDLER_LATENCY_HISTOGRAM)
    }
    assert set(latency) == {"ok", "dead_lettered"}
    assert dict(latency["ok"].attributes) == {**attrs, "outcome": "ok"}
    assert latency["ok"].count == 2
    assert latency["ok"].sum == pytest.approx(0.52)
    # Boundaries are in seconds, so sub-second samples spread over several buckets.
    assert 1.0 in latency["ok"].explicit_bounds
    assert sum(1 for count in latency["ok"].bucket_counts if count) == 2

    (published,) = _points(telemetry.metric_reader, PUBLISHED_COUNTER)
    assert dict(published.attributes) == {"topic": "lotse.visits"}
    assert published.value == 3
    (dead,) = _points(telemetry.metric_reader, DEAD_LETTERED_COUNTER)
    assert dict(dead.attributes) == {"reason_kind": "validation"}
    assert dead.value == 1


def test_gauges_from_callbacks(telemetry: Telemetry) -> None:
    backlog = {"value": 7}
    telemetry.observe_outbox_backlog(lambda: backlog["value"])
    telemetry.observe_consumer_lag(lambda: {("lotse.intake", 0): 3, ("lotse.intake", 1): 0})

    (point,) = _points(telemetry.metric_reader, OUTBOX_BACKLOG_GAUGE)
    assert point.value == 7
    lag = {
        (p.attributes["topic"], p.attributes["partition"]): p.value
        for p in _points(telemetry.metric_reader, CONSUMER_LAG_GAUGE)
    }
    assert lag == {("lotse.intake", 0): 3, ("lotse.intake", 1): 0}

    backlog["value"] = 2
    (point,) = _points(telemetry.metric_reader, OUTBOX_BACKLOG_GAUGE)
    assert point.value == 2


def test_gauge_registration_replaces_and_keys_by_consumer(telemetry: Telemetry) -> None:
    telemetry.observe_outbox_backlog(lambda: 1)
    telemetry.observe_outbox_backlog(lambda: 5)
    telemetry.observe_consumer_lag(lambda: {("lotse.visits", 0): 9}, consumer="reporting")
    telemetry.observe_consumer_lag(lambda: {("lotse.visits", 0): 4}, consumer="reporting")
    telemetry.observe_consumer_lag(lambda: {("lotse.intake", 2): 1}, consumer="visits")

    (point,) = _points(telemetry.metric_reader, OUTBOX_BACKLOG_GAUGE)
    assert point.value == 5
    lag = sorted(
        (
            (dict(p.attributes), p.value)
            for p in _points(telemetry.metric_reader, CONSUMER_LAG_GAUGE)
        ),
        key=lambda item: str(item[0]["consumer"]),
    )
    assert lag == [
        ({"consumer": "reporting", "topic": "lotse.visits", "partition": 0}, 4),
        ({"consumer": "visits", "topic": "lotse.intake", "partition": 2}, 1),
    ]


def test_two_instances_do_not_interfere() -> None:
    first = setup_telemetry(TelemetryConfig(service_name="intake", in_memory=True))
    second = setup_telemetry(TelemetryConfig(service_name="visits", in_memory=True))
    try:
        with first.tracer.start_as_current_span("only-in-first"):
            pass
        first.count_published("lotse.intake")
        first.observe_outbox_backlog(lambda: 11)
        second.observe_outbox_backlog(lambda: 22)

        assert [s.name for s in _spans(first)] == ["only-in-first"]
        assert _spans(second) == ()
        span = _spans(first)[0]
        assert span.resource.attributes["service.name"] == "intake"

        assert len(_points(first.metric_reader, PUBLISHED_COUNTER)) == 1
        assert _points(second.metric_reader, PUBLISHED_COUNTER) == []
        assert [p.value for p in _points(first.metric_reader, OUTBOX_BACKLOG_GAUGE)] == [11]
        assert [p.value for p in _points(second.metric_reader, OUTBOX_BACKLOG_GAUGE)] == [22]
    finally:
        first.shutdown()
        second.shutdown()


def test_global_providers_untouched_by_default() -> None:
    before = trace.get_tracer_provider()
    built = setup_telemetry(TelemetryConfig(service_name="x", in_memory=True))
    try:
        assert trace.get_tracer_provider() is before
        assert built.tracer_provider is not before
    finally:
        built.shutdown()


def test_exporters_only_when_asked() -> None:
    plain = setup_telemetry(TelemetryConfig(service_name="x"))
    otlp = setup_telemetry(TelemetryConfig(service_name="x", otlp_endpoint="http://127.0.0.1:9/"))
    try:
        assert plain.span_exporter is None
        assert plain.metric_reader is None
        assert otlp.span_exporter is None
    finally:
        plain.shutdown()
        # Nothing listens on port 9; shutdown must still return (exporter errors are logged).
        otlp.shutdown()
    plain.shutdown()  # idempotent


def test_nothing_exported_means_no_sdk_but_the_trace_passes_through() -> None:
    quiet = setup_telemetry(TelemetryConfig(service_name="x"))
    assert not quiet.exporting
    assert not isinstance(quiet.tracer_provider, TracerProvider)
    assert not isinstance(quiet.meter_provider, MeterProvider)
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    incoming = [("traceparent", f"00-{trace_id}-00f067aa0ba902b7-01".encode())]
    with quiet.tracer.start_as_current_span("consume", context=extract_context(incoming)):
        quiet.count_published("lotse.intake")  # a no-op, and no error
        outgoing = dict(inject_headers())
    assert trace_id in outgoing["traceparent"].decode()
    quiet.shutdown()
