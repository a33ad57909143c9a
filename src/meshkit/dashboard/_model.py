"""What the dashboard computes from its sources: span trees, the critical path, the service map, OpenAPI endpoints.

Pure functions over plain values (no I/O), so they are tested directly and the JSON API only shapes their results.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from meshkit.tracing.collector import Dependency, SpanRecord

__all__ = ["ServiceInfo", "TraceTree", "critical_path", "endpoints_from_openapi", "topology"]

_HTTP_METHODS: Final = ("get", "put", "post", "delete", "patch", "options", "head", "trace")


@dataclass(frozen=True, slots=True)
class ServiceInfo:
    """What the runner knows about one service, for the dashboard's catalog.

    - ``subscriptions``: ``(topic, group)`` pairs the service consumes (the messaging page lists these topics).
    - ``openapi_url``: where its instances serve their OpenAPI document: a path on each instance
      (``/openapi.json``, FastAPI's default) or an absolute URL; ``None`` when the service has none.
    - ``restarts``: how many times the runner restarted its processes; ``started_at``: Unix seconds (0: unknown).
    """

    name: str
    subscriptions: Sequence[tuple[str, str]] = ()
    openapi_url: str | None = "/openapi.json"
    restarts: int = 0
    started_at: float = 0.0


class TraceTree:
    """The spans of one trace arranged as a tree: depth-first rows (children by start time), the critical path.

    Roots are the spans without a parent, or whose parent is not in the trace (it was not sampled or has not
    arrived). Spans caught in a parent cycle (malformed input) are still shown once each. Built iteratively, so a
    chain of thousands of nested spans is fine.
    """

    __slots__ = ("by_id", "children", "depth", "descendants", "rows")

    def __init__(self, spans: Iterable[SpanRecord]) -> None:
        spans = list(spans)
        self.by_id: dict[str, SpanRecord] = {}
        for s in spans:
            self.by_id.setdefault(s.span_id, s)
        self.children: dict[str, list[SpanRecord]] = {}
        roots: list[SpanRecord] = []
        for s in self.by_id.values():
            parent = s.parent_span_id
            if parent is not None and parent != s.span_id and parent in self.by_id:
                self.children.setdefault(parent, []).append(s)
            else:
                roots.append(s)
        for kids in self.children.values():
            kids.sort(key=_start_order)
        roots.sort(key=_start_order)
        #: Depth-first order: every span once, each followed by its subtree.
        self.rows: list[SpanRecord] = []
        self.depth: dict[str, int] = {}
        #: How many spans each span's subtree holds below it (its rows follow it directly).
        self.descendants: dict[str, int] = {}
        self._walk(roots)
        if len(self.rows) < len(self.by_id):  # cycles: start each from its earliest span not shown yet
            self._walk(sorted((s for s in self.by_id.values() if s.span_id not in self.depth), key=_start_order))
        self._count_descendants()

    def _walk(self, roots: Sequence[SpanRecord]) -> None:
        for root in roots:
            if root.span_id in self.depth:
                continue
            stack: list[tuple[SpanRecord, int]] = [(root, 0)]
            while stack:
                span, depth = stack.pop()
                if span.span_id in self.depth:
                    continue
                self.depth[span.span_id] = depth
                self.rows.append(span)
                stack.extend((c, depth + 1) for c in reversed(self.children.get(span.span_id, ())))

    def _count_descendants(self) -> None:
        # Subtree sizes from the row order: a span's subtree is the rows after it that are deeper than it.
        open_rows: list[tuple[str, int, int]] = []  # (span id, depth, row index)
        for index, span in enumerate(self.rows):
            depth = self.depth[span.span_id]
            while open_rows and open_rows[-1][1] >= depth:
                sid, _, at = open_rows.pop()
                self.descendants[sid] = index - at - 1
            open_rows.append((span.span_id, depth, index))
        end = len(self.rows)
        for sid, _, at in open_rows:
            self.descendants[sid] = end - at - 1

    @property
    def roots(self) -> list[SpanRecord]:
        return [s for s in self.rows if self.depth[s.span_id] == 0]

    def critical_path(self) -> list[str]:
        """The span ids of the chain that determines when the trace ends: from the root that ends last, repeatedly
        the child that ends last (ties: the one that starts later)."""
        roots = self.roots
        if not roots:
            return []
        node = max(roots, key=_end_order)
        path = [node.span_id]
        seen = {node.span_id}
        while kids := self.children.get(node.span_id):
            node = max(kids, key=_end_order)
            if node.span_id in seen:  # a cycle
                break
            seen.add(node.span_id)
            path.append(node.span_id)
        return path


def critical_path(spans: Iterable[SpanRecord]) -> list[str]:
    """The critical path of a trace's spans (see :meth:`TraceTree.critical_path`)."""
    return TraceTree(spans).critical_path()


def _start_order(span: SpanRecord) -> tuple[int, int, str]:
    return (span.start_ns, -span.end_ns, span.span_id)


def _end_order(span: SpanRecord) -> tuple[int, int]:
    return (span.end_ns, span.start_ns)


# -- the service map -----------------------------------------------------------------------------------------------


def topology(
    dependencies: Iterable[Dependency],
    samples: Iterable[Sequence[SpanRecord]] = (),
    services: Iterable[str] = (),
    window_s: float | None = None,
) -> dict[str, Any]:
    """The service map: ``{"nodes": [...], "edges": [...], "window_s": window_s}``.

    ``dependencies`` (from :meth:`TraceStore.dependencies`) give each edge's exact ``calls`` and ``errors``.
    Whether an edge is a synchronous call or an asynchronous message is read from ``samples`` (recent traces): an
    edge is ``async`` when its child spans are consumer spans. An edge seen both ways in the samples becomes two
    edges whose counts are the dependency's counts split in the sampled proportion (``"estimated": true``); an edge
    the samples do not show is ``sync`` with ``"sampled": false``. ``services`` adds nodes without any edge.

    Rates: when the dependencies were counted over the last ``window_s`` seconds, each edge has ``calls_per_s``
    (its calls divided by the window) and each node ``calls_in_per_s`` / ``calls_out_per_s`` (``None`` without a
    window); ``error_rate`` (an edge's) and ``error_rate_in`` (a node's) are the percentage of calls that failed
    (``None`` without calls).
    """
    tallies: dict[tuple[str, str], dict[str, int]] = {}
    for spans in samples:
        by_id = {s.span_id: s for s in spans}
        for child in spans:
            parent = by_id.get(child.parent_span_id) if child.parent_span_id else None
            if parent is None or parent.service == child.service:
                continue
            kind = "async" if child.kind == "consumer" else "sync"
            tallies.setdefault((parent.service, child.service), {"sync": 0, "async": 0})[kind] += 1
    edges: list[dict[str, Any]] = []
    for dep in dependencies:
        sampled = tallies.get((dep.caller, dep.callee))
        base = {"source": dep.caller, "target": dep.callee}
        if sampled is None:
            edges.append(base | {"kind": "sync", "calls": dep.calls, "errors": dep.errors, "sampled": False})
            continue
        kinds = [k for k in ("sync", "async") if sampled[k]]
        if len(kinds) == 1:
            edges.append(base | {"kind": kinds[0], "calls": dep.calls, "errors": dep.errors, "sampled": True})
            continue
        share = sampled["sync"] / (sampled["sync"] + sampled["async"])
        sync_calls = round(dep.calls * share)
        sync_errors = round(dep.errors * share)
        for kind, calls, errors in (
            ("sync", sync_calls, sync_errors),
            ("async", dep.calls - sync_calls, min(dep.errors - sync_errors, dep.calls - sync_calls)),
        ):
            edges.append(base | {"kind": kind, "calls": calls, "errors": errors, "sampled": True, "estimated": True})
    names = set(services)
    for e in edges:
        names.add(e["source"])
        names.add(e["target"])
        e["calls_per_s"] = _per_second(e["calls"], window_s)
        e["error_rate"] = _percent(e["errors"], e["calls"])
    nodes = []
    for name in sorted(names):
        incoming = [e for e in edges if e["target"] == name]
        outgoing = [e for e in edges if e["source"] == name]
        calls_in = sum(e["calls"] for e in incoming)
        errors_in = sum(e["errors"] for e in incoming)
        calls_out = sum(e["calls"] for e in outgoing)
        nodes.append(
            {
                "name": name,
                "calls_in": calls_in,
                "errors_in": errors_in,
                "calls_out": calls_out,
                "calls_in_per_s": _per_second(calls_in, window_s),
                "calls_out_per_s": _per_second(calls_out, window_s),
                "error_rate_in": _percent(errors_in, calls_in),
            }
        )
    return {"nodes": nodes, "edges": edges, "window_s": window_s}


def _per_second(count: int, window_s: float | None) -> float | None:
    return count / window_s if window_s else None


def _percent(part: int, whole: int) -> float | None:
    return part * 100.0 / whole if whole else None


# -- OpenAPI -------------------------------------------------------------------------------------------------------


def endpoints_from_openapi(document: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The operations of an OpenAPI 3 document: ``{"method", "path", "summary", "tags", "deprecated"}`` each,
    sorted by path then method (in the order GET, PUT, POST, DELETE, PATCH, ...). Malformed parts are skipped."""
    paths = document.get("paths")
    if not isinstance(paths, Mapping):
        return []
    out: list[dict[str, Any]] = []
    for path, item in paths.items():
        if not isinstance(path, str) or not isinstance(item, Mapping):
            continue
        for method in _HTTP_METHODS:
            operation = item.get(method)
            if not isinstance(operation, Mapping):
                continue
            summary = operation.get("summary") or operation.get("operationId") or ""
            tags = operation.get("tags")
            out.append(
                {
                    "method": method.upper(),
                    "path": path,
                    "summary": summary if isinstance(summary, str) else str(summary),
                    "tags": [str(t) for t in tags] if isinstance(tags, list) else [],
                    "deprecated": operation.get("deprecated") is True,
                }
            )
    order = {m.upper(): i for i, m in enumerate(_HTTP_METHODS)}
    out.sort(key=lambda e: (e["path"], order[e["method"]]))
    return out
