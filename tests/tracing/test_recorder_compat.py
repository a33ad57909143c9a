"""The span recorder's classes do not subclass OpenTelemetry's (mypyc compiles them to native classes): what a user
of the OpenTelemetry SDK relies on still holds, as Python source and compiled (scripts/test-native.sh)."""

from __future__ import annotations

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from meshkit.tracing._recorder import BatchProcessor, TracerProvider


def test_meshkit_batch_processor_works_in_an_sdk_tracer_provider() -> None:
    # the SDK's Span.end calls _on_ending on every processor (SpanProcessor's hook)
    exporter = InMemorySpanExporter()
    processor = BatchProcessor(exporter, schedule_delay_millis=50)
    sdk = SdkTracerProvider()
    sdk.add_span_processor(processor)  # type: ignore[arg-type]  # (mypy sees it too: not a SpanProcessor)
    try:
        with sdk.get_tracer("review").start_as_current_span("sdk span"):
            pass
        assert processor.force_flush(30_000)
        assert [s.name for s in exporter.get_finished_spans()] == ["sdk span"]
    finally:
        sdk.shutdown()


def test_an_invalid_attribute_key_is_dropped_not_raised() -> None:
    # OpenTelemetry's API must not raise on bad input; the SDK drops a non-str key with a warning (compiled, a str
    # annotation raised TypeError; as source, the key was kept and failed the OTLP encoding of its whole batch)
    span = TracerProvider(Resource.create({})).get_tracer("review").start_span("s")
    span.set_attribute(1, "value")
    span.set_attribute("kept", "value")
    span.end()
    assert dict(span.attributes) == {"kept": "value"}


def test_an_ended_span_is_read_only() -> None:
    span = TracerProvider(Resource.create({})).get_tracer("review").start_span("s")
    span.set_attribute("before", 1)
    span.end()
    span.set_attribute("after", 2)
    span.add_event("late")
    span.record_exception(ValueError("late"))
    span.set_status(StatusCode.ERROR, "late")
    assert dict(span.attributes) == {"before": 1}
    assert span.events == ()
    assert span.status.status_code is StatusCode.UNSET


def test_a_span_has_no_end_time_until_it_ends_and_keeps_its_first() -> None:
    # (the end time is kept unboxed, 0 until the span ends: what readers see is the SDK's None, then the time)
    span = TracerProvider(Resource.create({})).get_tracer("review").start_span("s", start_time=1_000)
    assert [span.end_time] == [None]  # (a list: mypy would take the end time for None from here on)
    assert span.is_recording()
    span.end(5_000)
    span.end(9_000)
    assert (span.start_time, span.end_time) == (1_000, 5_000)
    assert not span.is_recording()
