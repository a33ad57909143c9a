"""Prometheus metrics that cost next to nothing to record: the one way meshkit's servers keep them.

Recording is a dictionary update (counters) or a bisect and two additions (histograms): no lock, no label
look-up object, fit for a path that runs tens of thousands of times a second on one event loop. At scrape time a
custom collector hands prometheus_client the values as metric families, and prometheus_client renders the
exposition format (``render()``). Gauges are read from a callable at scrape time. Each :class:`MetricSet` has its
own prometheus_client registry: two servers in one process do not mix their figures.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from meshkit._core.optional import require

__all__ = ["DEFAULT_BUCKETS", "Counter", "Histogram", "MetricSet"]

#: seconds: from half a millisecond (a proxied call on loopback) to half a minute
DEFAULT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

Labels = tuple[str, ...]


class Counter:
    __slots__ = ("help", "labels", "name", "values")

    def __init__(self, name: str, help: str, labels: Sequence[str]) -> None:
        self.name, self.help, self.labels = name, help, tuple(labels)
        self.values: dict[Labels, list[float]] = {}  # a one-item list per series: its total

    def inc(self, labels: Labels, amount: float = 1.0) -> None:
        self.series(labels)[0] += amount

    def series(self, labels: Labels) -> list[float]:
        """The total kept for ``labels`` (``[total]``), made on first use. A path that counts the same series over
        and over keeps it and adds to ``series[0]``, skipping the look-up (as with :meth:`Histogram.series`)."""
        total = self.values.get(labels)
        if total is None:
            total = self.values[labels] = [0.0]
        return total


class Histogram:
    __slots__ = ("buckets", "help", "labels", "name", "values")

    def __init__(self, name: str, help: str, labels: Sequence[str], buckets: Sequence[float]) -> None:
        self.name, self.help, self.labels = name, help, tuple(labels)
        self.buckets = tuple(buckets)
        self.values: dict[Labels, list[float]] = {}  # per bucket (the last: +Inf), then the sum

    def observe(self, labels: Labels, value: float) -> None:
        self.add(self.series(labels), value)

    def series(self, labels: Labels) -> list[float]:
        """The counts kept for ``labels`` (per bucket, the last +Inf, then the sum), made on first use. A path that
        records the same series over and over keeps it and calls :meth:`add`, skipping the look-up."""
        counts = self.values.get(labels)
        if counts is None:
            counts = self.values[labels] = [0.0] * (len(self.buckets) + 2)
        return counts

    def add(self, counts: list[float], value: float) -> None:
        """Record ``value`` in ``counts``, a series of this histogram (:meth:`series`)."""
        counts[bisect.bisect_left(self.buckets, value)] += 1
        counts[-1] += value


class _Gauge:
    __slots__ = ("help", "labels", "name", "read")

    def __init__(
        self,
        name: str,
        help: str,
        labels: Sequence[str],
        read: Callable[[], Iterable[tuple[Labels, float]]],
    ) -> None:
        self.name, self.help, self.labels, self.read = name, help, tuple(labels), read


class MetricSet:
    """Counters, histograms and gauges, rendered together (see the module docstring)."""

    def __init__(self, extra: str = "service") -> None:
        prom = require("prometheus_client", extra)
        self._core = require("prometheus_client.core", extra)
        self._generate = prom.generate_latest
        self.registry = prom.CollectorRegistry(auto_describe=False)
        self.registry.register(self)
        self._metrics: list[Counter | Histogram | _Gauge] = []

    def counter(self, name: str, help: str, labels: Sequence[str]) -> Counter:
        """``name`` without the ``_total`` suffix (prometheus_client adds it)."""
        metric = Counter(name, help, labels)
        self._metrics.append(metric)
        return metric

    def histogram(
        self,
        name: str,
        help: str,
        labels: Sequence[str],
        buckets: Sequence[float] = DEFAULT_BUCKETS,
    ) -> Histogram:
        metric = Histogram(name, help, labels, buckets)
        self._metrics.append(metric)
        return metric

    def gauge(
        self,
        name: str,
        help: str,
        labels: Sequence[str],
        read: Callable[[], Iterable[tuple[Labels, float]]],
    ) -> None:
        """A gauge whose values ``read()`` gives at scrape time, as ``(label values, value)`` pairs."""
        self._metrics.append(_Gauge(name, help, labels, read))

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        core = self._core
        for metric in self._metrics:
            if isinstance(metric, Counter):
                family = core.CounterMetricFamily(metric.name, metric.help, labels=metric.labels)
                for labels, (total,) in sorted(metric.values.items()):
                    family.add_metric(labels, total)
            elif isinstance(metric, Histogram):
                family = core.HistogramMetricFamily(metric.name, metric.help, labels=metric.labels)
                bounds = (*metric.buckets, math.inf)
                for labels, counts in sorted(metric.values.items()):
                    cumulative, buckets = 0.0, []
                    for bound, observed in zip(bounds, counts, strict=False):
                        cumulative += observed
                        buckets.append(("+Inf" if bound == math.inf else repr(bound), cumulative))
                    family.add_metric(labels, buckets, counts[-1])
            else:
                family = core.GaugeMetricFamily(metric.name, metric.help, labels=metric.labels)
                for labels, value in metric.read():
                    family.add_metric(labels, value)
            yield family

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        data: bytes = self._generate(self.registry)
        return data
