"""The log buffer: bounded, filtered, tailed with a cursor, fed by logging and by child process lines."""

from __future__ import annotations

import logging
import threading

import pytest

from meshkit.dashboard import LogBuffer
from meshkit.testing import FakeClock


def test_the_buffer_keeps_the_newest_entries_up_to_its_capacity() -> None:
    logs = LogBuffer(capacity=3)
    for n in range(5):
        logs.append("orders", "info", f"line {n}")
    page = logs.query()
    assert [e.message for e in page.entries] == ["line 2", "line 3", "line 4"]
    assert [e.seq for e in page.entries] == [3, 4, 5]
    assert len(logs) == 3 and logs.cursor == 5 and page.cursor == 5
    with pytest.raises(ValueError, match="capacity"):
        LogBuffer(capacity=0)


def test_since_returns_only_newer_entries_and_the_cursor_moves_on() -> None:
    logs = LogBuffer()
    logs.append("a", "info", "one")
    first = logs.query()
    assert first.cursor == 1
    assert logs.query(since=first.cursor).entries == []
    logs.append("a", "info", "two")
    logs.append("b", "info", "three")
    second = logs.query(since=first.cursor)
    assert [e.message for e in second.entries] == ["two", "three"]
    # the cursor is the buffer's latest number even when the filter matches nothing new
    assert logs.query(since=second.cursor, service="nobody").cursor == 3


def test_filters_by_service_minimum_level_trace_and_text() -> None:
    logs = LogBuffer()
    logs.append("orders", "debug", "cache miss", logger="orders.cache")
    logs.append("orders", "warning", "slow query", trace_id="AB" * 16)
    logs.append("email", "error", "SMTP refused", logger="email.smtp")
    logs.append("email", "info", "sent")

    def messages(**filters: object) -> list[str]:
        return [e.message for e in logs.query(**filters).entries]  # type: ignore[arg-type]

    assert messages(service="email") == ["SMTP refused", "sent"]
    assert messages(level="warning") == ["slow query", "SMTP refused"]
    assert messages(level="WARN") == ["slow query", "SMTP refused"]
    assert messages(level=40) == ["SMTP refused"]
    assert messages(trace_id="ab" * 16) == ["slow query"]
    assert messages(text="smtp") == ["SMTP refused"]  # the message, ignoring case
    assert messages(text="orders.cache") == ["cache miss"]  # or the logger's name
    assert messages(service="orders", level="info") == ["slow query"]
    assert messages(service="") == messages()  # an empty filter is no filter
    with pytest.raises(ValueError, match="unknown log level"):
        logs.query(level="loud")
    with pytest.raises(ValueError, match="limit"):
        logs.query(limit=0)


def test_limit_keeps_the_newest_matches_and_says_older_ones_were_left_out() -> None:
    logs = LogBuffer()
    for n in range(10):
        logs.append("a", "info", str(n))
    page = logs.query(limit=3)
    assert [e.message for e in page.entries] == ["7", "8", "9"] and page.truncated
    assert not logs.query(limit=10).truncated


def test_the_handler_stores_records_with_service_trace_and_extras() -> None:
    clock = FakeClock()
    logs = LogBuffer(clock=clock)
    logger = logging.getLogger("tests.dashboard.handler")
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    handler = logs.handler()
    logger.addHandler(handler)
    try:
        logger.info("order %s placed", 42, extra={"service": "orders", "trace_id": "c" * 32, "span_id": "d" * 16})
        logger.warning("no service extra", extra={"topic": "order.created", "attempt": 3})
        try:
            raise ValueError("bad input")
        except ValueError:
            logger.exception("handler failed")
    finally:
        logger.removeHandler(handler)
    placed, plain, failed = logs.query().entries
    assert (placed.service, placed.level, placed.message) == ("orders", "INFO", "order 42 placed")
    assert (placed.trace_id, placed.span_id, placed.logger) == ("c" * 32, "d" * 16, "tests.dashboard.handler")
    assert plain.service == "tests.dashboard.handler"  # the logger's name without a service extra
    assert plain.fields == {"topic": "order.created", "attempt": "3"}
    assert plain.trace_id == ""
    assert failed.level == "ERROR"
    assert failed.message.startswith("handler failed\nTraceback")
    assert "ValueError: bad input" in failed.message
    assert placed.to_json()["trace_id"] == "c" * 32


def test_child_process_lines_are_parsed_for_level_logger_and_trace() -> None:
    logs = LogBuffer()
    logs.append_line("orders", "INFO meshkit.runtime: service started\n")
    logs.append_line("orders", "ERROR orders.api: request failed trace_id=" + "e" * 32)
    logs.append_line("orders", "Traceback (most recent call last):")  # continues the error above
    logs.append_line("orders", '  File "app.py", line 3')
    assert logs.append_line("orders", "   ") is None
    logs.append_line("email", "WARNING: disk almost full")
    logs.append_line("email", "plain output without a level")
    logs.append_line("email", '{"level": "error", "message": "json line", "trace_id": "' + "f" * 32 + '"}')
    logs.append_line("email", "{not json")
    entries = logs.query().entries
    assert [(e.service, e.level, e.logger, e.message) for e in entries] == [
        ("orders", "INFO", "meshkit.runtime", "service started"),
        ("orders", "ERROR", "orders.api", "request failed trace_id=" + "e" * 32),
        ("orders", "ERROR", "", "Traceback (most recent call last):"),
        ("orders", "ERROR", "", '  File "app.py", line 3'),
        ("email", "WARNING", "", "disk almost full"),
        ("email", "WARNING", "", "plain output without a level"),
        ("email", "ERROR", "", "json line"),
        ("email", "ERROR", "", "{not json"),
    ]
    assert entries[1].trace_id == "e" * 32
    assert entries[6].trace_id == "f" * 32


def test_appends_from_many_threads_keep_unique_increasing_numbers() -> None:
    logs = LogBuffer(capacity=1000)

    def work(n: int) -> None:
        for i in range(300):
            logs.append(f"s{n}", "info", str(i))

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seqs = [e.seq for e in logs.query(limit=5000).entries]
    assert len(seqs) == 1000
    assert seqs == sorted(set(seqs)) and seqs[-1] == 1200
    assert logs.services() == ["s0", "s1", "s2", "s3"]
