"""The gateway's metrics keep each (route, upstream, status) series to record into: the exposition is exactly the
one recording every request through the counter and the histogram gives."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from meshkit._core.metrics import MetricSet
from meshkit.gateway.observe import Metrics

requests = st.lists(
    st.tuples(
        st.sampled_from(["orders", "users", ""]),
        st.sampled_from(["orders-svc", "static:127.0.0.1:9", ""]),
        st.sampled_from([200, 201, 404, 502, 503, 0]),
        st.sampled_from([0.0, 0.0004, 0.0005, 0.0006, 0.001, 0.02, 0.5, 30.0, 31.0, 1e-9]),
    ),
    max_size=60,
)


def _reference(done: list[tuple[str, str, int, float]], errors: list[tuple[str, str, str]]) -> bytes:
    """Every request recorded the plain way, in a metric set built like the gateway's."""
    metrics = MetricSet("gateway")
    counter = metrics.counter("meshkit_gateway_requests", "Requests answered", ("route", "upstream", "status"))
    histogram = metrics.histogram(
        "meshkit_gateway_request_duration_seconds",
        "Seconds from the request head to the last byte of the answer",
        ("route",),
    )
    failures = metrics.counter(
        "meshkit_gateway_upstream_errors",
        "Upstream attempts that failed without an answer",
        ("route", "upstream", "kind"),
    )
    metrics.gauge("meshkit_gateway_breaker_state", "0 closed, 1 half-open, 2 open", ("route",), list)
    for route, upstream, status, elapsed in done:
        counter.inc((route, upstream, str(status)))
        histogram.observe((route,), elapsed)
    for error in errors:
        failures.inc(error)
    return metrics.render()


@settings(max_examples=150, deadline=None)
@given(done=requests, read_at=st.integers(0, 60))
def test_recording_through_kept_series_renders_what_plain_recording_does(
    done: list[tuple[str, str, int, float]], read_at: int
) -> None:
    metrics = Metrics()
    errors = [("orders", "orders-svc", "reset")]
    metrics.upstream_error(*errors[0])
    for n, (route, upstream, status, elapsed) in enumerate(done):
        if n == read_at:  # a scrape in the middle sees what was recorded so far
            assert metrics.render() == _reference(done[:n], errors)
        metrics.request_done(route, upstream, status, elapsed)
    assert metrics.render() == _reference(done, errors)


def test_a_series_counts_every_request_after_the_first() -> None:
    metrics = Metrics()
    for _ in range(3):
        metrics.request_done("orders", "orders-svc", 200, 0.002)
    text = metrics.render().decode()
    assert 'meshkit_gateway_requests_total{route="orders",status="200",upstream="orders-svc"} 3.0' in text
    assert 'meshkit_gateway_request_duration_seconds_bucket{le="0.0025",route="orders"} 3.0' in text
    assert 'meshkit_gateway_request_duration_seconds_count{route="orders"} 3.0' in text
