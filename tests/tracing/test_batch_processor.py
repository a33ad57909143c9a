"""The recorder's batch processor: spans leave in batches, on flush and on shutdown, never twice; a full queue
drops and says so; a failing exporter does not stop the thread; a forked child starts afresh. And the recorder's
direct use of OpenTelemetry's context variable behaves as ``context.attach`` / ``detach`` do."""

from __future__ import annotations

import contextvars
import logging
import os
import sys
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from opentelemetry import context, trace
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import TraceIdRatioBased

from meshkit.tracing import _recorder
from meshkit.tracing._recorder import BatchProcessor, TracerProvider
from meshkit.tracing.propagation import span_headers
from meshkit.tracing.spans import provider

DEADLINE = 30.0


class Collecting(SpanExporter):
    """Keeps what it is given; ``fail`` batches raise first. Records whether instrumentation was suppressed."""

    def __init__(self, fail: int = 0) -> None:
        self.batches: list[list[Any]] = []
        self.fail = fail
        self.suppressed: list[bool] = []
        self.shut = False
        self.lock = threading.Lock()

    def export(self, spans: Sequence[Any]) -> SpanExportResult:
        self.suppressed.append(bool(context.get_value(context._SUPPRESS_INSTRUMENTATION_KEY)))
        if self.fail:
            self.fail -= 1
            raise RuntimeError("collector down")
        with self.lock:
            self.batches.append(list(spans))
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self.shut = True

    @property
    def names(self) -> list[str]:
        with self.lock:
            return [s.name for batch in self.batches for s in batch]


def _wait_for(condition: Any) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        time.sleep(0.01)


@pytest.fixture
def tracer_of() -> Iterator[Any]:
    made: list[TracerProvider] = []

    def make(processor: BatchProcessor, ratio: float | None = None) -> Any:
        p = provider("svc", exporter=Collecting(), batch=False)  # the resource; processors replaced below
        p.processors[:] = []
        p.starters[:] = []
        if ratio is not None:
            p.bound = TraceIdRatioBased.get_bound_for_rate(ratio)
        p.add_span_processor(processor)
        made.append(p)
        return p.get_tracer("test")

    yield make
    for p in made:
        p.shutdown()


def test_a_full_batch_leaves_without_waiting_for_the_delay(tracer_of: Any) -> None:
    exporter = Collecting()
    tracer = tracer_of(BatchProcessor(exporter, max_export_batch_size=4, schedule_delay_millis=600_000))
    for n in range(4):
        tracer.start_span(f"s{n}").end()
    _wait_for(lambda: len(exporter.names) == 4)
    assert exporter.names == ["s0", "s1", "s2", "s3"]
    assert exporter.suppressed == [True]  # the exporter's own calls make no spans


def test_force_flush_exports_what_is_queued_and_only_sampled_spans(tracer_of: Any) -> None:
    exporter = Collecting()
    processor = BatchProcessor(exporter, max_export_batch_size=100, schedule_delay_millis=600_000)
    tracer = tracer_of(processor, ratio=0.0)  # new traces are not sampled
    tracer.start_span("dropped").end()
    sampled = trace.NonRecordingSpan(
        trace.SpanContext(1, 2, is_remote=True, trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED))
    )
    with tracer.start_as_current_span("kept", context=trace.set_span_in_context(sampled)):
        pass
    assert processor.force_flush(timeout_millis=int(DEADLINE * 1000))
    assert exporter.names == ["kept"]


def test_shutdown_exports_the_rest_then_drops(tracer_of: Any) -> None:
    exporter = Collecting()
    processor = BatchProcessor(exporter, max_export_batch_size=2, schedule_delay_millis=600_000)
    tracer = tracer_of(processor)
    tracer.start_span("a").end()
    processor.shutdown()
    assert exporter.names == ["a"]
    assert exporter.shut
    tracer.start_span("late").end()
    assert processor.force_flush(1000)  # nothing queued: a stopped processor answers at once
    assert exporter.names == ["a"]
    processor.shutdown()  # twice is harmless


def test_a_full_queue_drops_new_spans_and_warns(tracer_of: Any, caplog: pytest.LogCaptureFixture) -> None:
    exporter = Collecting()
    processor = BatchProcessor(exporter, max_queue_size=3, max_export_batch_size=3, schedule_delay_millis=600_000)
    tracer = tracer_of(processor)
    caplog.set_level(logging.WARNING, logger="meshkit.tracing._recorder")
    gate = threading.Lock()
    with gate:
        # hold the export thread: its wake-up finds the batch, and the first export waits on the gate
        original = exporter.export

        def held(spans: Sequence[Any]) -> SpanExportResult:
            with gate:
                return original(spans)

        exporter.export = held  # type: ignore[method-assign]
        for n in range(3):
            tracer.start_span(f"s{n}").end()
        _wait_for(lambda: len(exporter.suppressed) == 0 and not processor._queue)  # taken by the thread
        for n in range(3, 8):
            tracer.start_span(f"s{n}").end()  # 3 queued, 2 dropped
    assert processor.force_flush(int(DEADLINE * 1000))
    assert exporter.names == ["s0", "s1", "s2", "s3", "s4", "s5"]
    assert any("2 spans dropped" in r.getMessage() for r in caplog.records)


def test_an_exporter_failure_is_logged_and_later_batches_still_leave(
    tracer_of: Any, caplog: pytest.LogCaptureFixture
) -> None:
    exporter = Collecting(fail=1)
    processor = BatchProcessor(exporter, max_export_batch_size=10, schedule_delay_millis=600_000)
    tracer = tracer_of(processor)
    with caplog.at_level(logging.ERROR, logger="meshkit.tracing._recorder"):
        tracer.start_span("lost").end()
        assert processor.force_flush(int(DEADLINE * 1000))
        tracer.start_span("sent").end()
        assert processor.force_flush(int(DEADLINE * 1000))
    assert exporter.names == ["sent"]
    assert any("exporting 1 spans failed" in r.getMessage() for r in caplog.records)


def test_spans_arriving_faster_than_the_exporter_sends_do_not_hold_up_flushes_or_the_drop_warning(
    tracer_of: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="meshkit.tracing._recorder")
    exporter = Collecting()
    processor = BatchProcessor(exporter, max_queue_size=4, max_export_batch_size=2, schedule_delay_millis=600_000)
    tracer = tracer_of(processor)
    feeding = threading.Event()
    feeding.set()
    original = exporter.export

    def overloaded(spans: Sequence[Any]) -> SpanExportResult:
        while feeding.is_set() and len(processor._queue) < 4:  # more spans end than leave: the queue stays full
            tracer.start_span("more").end()
        tracer.start_span("dropped").end()  # one more each time, past the full queue
        return original(spans)

    exporter.export = overloaded  # type: ignore[method-assign]
    try:
        tracer.start_span("first").end()
        assert processor.force_flush(int(DEADLINE * 1000)), "a flush waits only for what was queued before it"
        _wait_for(lambda: any("spans dropped" in r.getMessage() for r in caplog.records))
    finally:
        feeding.clear()
    assert processor.force_flush(int(DEADLINE * 1000))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_a_forked_child_starts_with_an_empty_queue_and_its_own_thread(tracer_of: Any) -> None:
    exporter = Collecting()
    processor = BatchProcessor(exporter, max_export_batch_size=100, schedule_delay_millis=600_000)
    tracer = tracer_of(processor)
    tracer.start_span("parent's").end()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads running (3.12+ warns)
        pid = os.fork()
    if pid == 0:  # the child: only its own span leaves, through a thread of its own
        ok = False
        try:
            tracer.start_span("child's").end()
            ok = processor.force_flush(int(DEADLINE * 1000)) and exporter.names == ["child's"]
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert processor.force_flush(int(DEADLINE * 1000))
    assert exporter.names == ["parent's"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_queue_size": 0}, "must be positive"),
        ({"schedule_delay_millis": 0}, "must be positive"),
        ({"max_queue_size": 10, "max_export_batch_size": 11}, "must not exceed"),
    ],
)
def test_bad_settings_are_refused(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BatchProcessor(Collecting(), **options)


def test_a_span_is_the_current_span_of_the_api_inside_its_block(tracer_of: Any) -> None:
    tracer = tracer_of(BatchProcessor(Collecting()))
    before = context.get_current()
    with tracer.start_as_current_span("outer") as outer:
        assert trace.get_current_span() is outer
        with tracer.start_as_current_span("inner") as inner:
            assert inner.parent == outer.get_span_context()
            assert trace.get_current_span() is inner
        assert trace.get_current_span() is outer
    assert context.get_current() == before


def test_leaving_a_span_in_another_context_is_logged_not_raised(
    tracer_of: Any, caplog: pytest.LogCaptureFixture
) -> None:
    exporter = Collecting()
    processor = BatchProcessor(exporter)
    tracer = tracer_of(processor)
    block = tracer.start_as_current_span("moved")
    block.__enter__()
    try:
        with caplog.at_level(logging.ERROR, logger="meshkit.tracing._recorder"):
            contextvars.copy_context().run(block.__exit__, None, None, None)
    finally:
        context.attach(context.Context())  # leave this test's context without the span
    assert any("failed to detach" in r.getMessage() for r in caplog.records)
    assert processor.force_flush(int(DEADLINE * 1000))
    assert exporter.names == ["moved"]  # ended all the same


def test_another_runtime_context_goes_through_the_api(tracer_of: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_recorder, "_CONTEXT", None)
    tracer = tracer_of(BatchProcessor(Collecting()))
    with tracer.start_as_current_span("outer") as outer:
        assert trace.get_current_span() is outer
        with tracer.start_as_current_span("inner") as inner:
            assert inner.parent == outer.get_span_context()
            assert inner.call_headers() is None, "the short path needs the default runtime context"
            assert span_headers(inner)["traceparent"].split("-")[2] == f"{inner.get_span_context().span_id:016x}"
            assert trace.get_current_span() is inner
    assert trace.get_current_span() is trace.INVALID_SPAN
    traceparent = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    with tracer.start_request_span([(b"traceparent", traceparent)], "GET", {}) as served:
        assert served.parent is not None and served.parent.span_id == 0xB7AD6B7169203331
        assert trace.get_current_span() is served
    assert trace.get_current_span() is trace.INVALID_SPAN


class Dropping(SpanExporter):
    """Keeps nothing it is given."""

    def __init__(self) -> None:
        self.exported = 0

    def export(self, spans: Sequence[Any]) -> SpanExportResult:
        self.exported += len(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None


def test_exported_spans_are_released_by_the_spans_that_end_after_them(tracer_of: Any) -> None:
    """The export thread does not free what it exported: spans ending later release it, two each, on their own
    thread; shutdown releases the rest."""
    exporter = Dropping()
    processor = BatchProcessor(exporter, schedule_delay_millis=60_000)
    tracer = tracer_of(processor)
    spans = [tracer.start_span(f"s{n}") for n in range(3)]
    for span in spans:
        span.end()
    held = [sys.getrefcount(span) for span in spans]  # this test's references and the processor's queue
    assert processor.force_flush(int(DEADLINE * 1000))
    assert exporter.exported == 3
    assert [sys.getrefcount(span) for span in spans] == held, "exported, still held until later spans end"
    tracer.start_span("later").end()
    assert [sys.getrefcount(span) for span in spans] == [held[0] - 1, held[1] - 1, held[2]], "two released"
    processor.shutdown()
    assert [sys.getrefcount(span) for span in spans] == [n - 1 for n in held], "shutdown releases the rest"
    assert exporter.exported == 4


def test_a_processor_holds_at_most_one_batch_of_exported_spans_and_none_once_quiet(tracer_of: Any) -> None:
    exporter = Dropping()
    processor = BatchProcessor(exporter, max_export_batch_size=4, schedule_delay_millis=50)
    tracer = tracer_of(processor)
    spans = [tracer.start_span(f"s{n}") for n in range(20)]

    def counts() -> list[int]:
        return [sys.getrefcount(span) for span in spans]

    def held() -> list[int]:
        """How many more references than this test's each span has."""
        return [now - alone for now, alone in zip(counts(), baseline, strict=True)]

    baseline = counts()
    for ending in range(20):
        spans[ending].end()
    assert processor.force_flush(int(DEADLINE * 1000))
    assert exporter.exported == 20
    assert 0 < sum(held()) <= 4, f"only the last batch waits for later spans to free it: {held()}"
    _wait_for(lambda: not any(held()))  # no span ends any more: the thread's next round frees them
