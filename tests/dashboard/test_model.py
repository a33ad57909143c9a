"""What the dashboard computes: span trees, the critical path, the service map, OpenAPI endpoints."""

from __future__ import annotations

from meshkit.dashboard import TraceTree, critical_path, endpoints_from_openapi, topology
from meshkit.tracing.collector import Dependency

from .conftest import sid, span


def test_rows_are_depth_first_with_children_by_start_and_subtree_sizes() -> None:
    spans = [
        span(1, 1, None, "gw", "root", 0, 100),
        span(1, 3, 1, "b", "second", 50, 90),
        span(1, 2, 1, "a", "first", 10, 40),
        span(1, 4, 2, "a", "inner", 20, 30),
    ]
    tree = TraceTree(spans)
    assert [s.name for s in tree.rows] == ["root", "first", "inner", "second"]
    assert [tree.depth[s.span_id] for s in tree.rows] == [0, 1, 2, 1]
    assert [tree.descendants[s.span_id] for s in tree.rows] == [3, 1, 0, 0]


def test_orphans_are_roots_and_cycles_still_show_every_span_once() -> None:
    orphan = span(1, 9, 77, "x", "orphan", 5, 6)  # its parent never arrived
    tree = TraceTree([span(1, 1, None, "gw", "root", 0, 10), orphan])
    assert [s.name for s in tree.roots] == ["root", "orphan"]
    cycle = [span(1, 1, 2, "a", "a", 0, 10), span(1, 2, 1, "b", "b", 1, 5)]
    tree = TraceTree(cycle)
    assert sorted(s.name for s in tree.rows) == ["a", "b"]
    assert tree.depth == {sid(1): 0, sid(2): 1}
    assert tree.critical_path() == [sid(1), sid(2)]


def test_a_deep_chain_does_not_hit_the_recursion_limit() -> None:
    chain = [span(1, 1, None, "s", "0", 0, 10_000)]
    chain += [span(1, n, n - 1, "s", str(n), n, 10_000 - n) for n in range(2, 3001)]
    tree = TraceTree(chain)
    assert tree.depth[sid(3000)] == 2999
    assert tree.descendants[sid(1)] == 2999
    assert len(tree.critical_path()) == 3000


def test_the_critical_path_follows_the_child_that_ends_last() -> None:
    spans = [
        span(1, 1, None, "gw", "root", 0, 100),
        span(1, 2, 1, "a", "long but early", 1, 60),
        span(1, 3, 1, "b", "short but last", 70, 95),
        span(1, 4, 3, "c", "ends first", 71, 75),
        span(1, 5, 3, "c", "ends last", 72, 94),
        span(1, 6, 2, "a", "under the early one", 2, 59),
    ]
    assert critical_path(spans) == [sid(1), sid(3), sid(5)]
    # ties on the end: the child that starts later decides
    tie = [span(1, 1, None, "s", "r", 0, 10), span(1, 2, 1, "s", "x", 1, 8), span(1, 3, 1, "s", "y", 4, 8)]
    assert critical_path(tie) == [sid(1), sid(3)]
    assert critical_path([]) == []


def test_topology_reads_edge_kinds_from_the_sampled_spans() -> None:
    dependencies = [
        Dependency("gateway", "orders", 10, 1),
        Dependency("orders", "email", 4, 0),
        Dependency("orders", "payments", 8, 2),
        Dependency("orders", "stock", 3, 0),
    ]
    sample = [
        span(1, 1, None, "gateway", "GET /orders", 0, 100, kind="server"),
        span(1, 2, 1, "orders", "GET /orders", 1, 90, kind="server"),
        span(1, 3, 2, "orders", "order.created publish", 5, 6, kind="producer"),
        span(1, 4, 3, "email", "order.created process", 7, 20, kind="consumer"),
        # orders -> payments both ways: one call and one message
        span(1, 5, 2, "orders", "POST payments", 10, 30, kind="client"),
        span(1, 6, 5, "payments", "POST /charges", 11, 29, kind="server"),
        span(1, 7, 2, "orders", "payment.requested publish", 31, 32, kind="producer"),
        span(1, 8, 7, "payments", "payment.requested process", 33, 40, kind="consumer"),
    ]
    result = topology(dependencies, [sample], services=["lonely"])
    edges = {(e["source"], e["target"], e["kind"]): e for e in result["edges"]}
    assert edges["gateway", "orders", "sync"] == {
        "source": "gateway",
        "target": "orders",
        "kind": "sync",
        "calls": 10,
        "errors": 1,
        "sampled": True,
        "calls_per_s": None,  # no window: counts only
        "error_rate": 10.0,
    }
    assert edges["orders", "email", "async"]["calls"] == 4
    assert ("orders", "email", "sync") not in edges
    both = [edges["orders", "payments", "sync"], edges["orders", "payments", "async"]]
    assert [e["calls"] for e in both] == [4, 4] and sum(e["errors"] for e in both) == 2
    assert all(e["estimated"] for e in both)
    unsampled = edges["orders", "stock", "sync"]
    assert unsampled["sampled"] is False
    nodes = {n["name"]: n for n in result["nodes"]}
    assert sorted(nodes) == ["email", "gateway", "lonely", "orders", "payments", "stock"]
    assert nodes["orders"] == {
        "name": "orders",
        "calls_in": 10,
        "errors_in": 1,
        "calls_out": 15,
        "calls_in_per_s": None,
        "calls_out_per_s": None,
        "error_rate_in": 10.0,
    }
    assert nodes["lonely"]["calls_in"] == 0 and nodes["lonely"]["error_rate_in"] is None
    assert result["window_s"] is None


def test_topology_rates_are_the_window_counts_per_second_and_error_rates_are_percentages() -> None:
    dependencies = [Dependency("gateway", "orders", 30, 3), Dependency("orders", "payments", 6, 0)]
    result = topology(dependencies, [], window_s=60.0)
    edges = {(e["source"], e["target"]): e for e in result["edges"]}
    assert edges["gateway", "orders"]["calls_per_s"] == 0.5
    assert edges["gateway", "orders"]["error_rate"] == 10.0
    assert (edges["orders", "payments"]["calls_per_s"], edges["orders", "payments"]["error_rate"]) == (0.1, 0.0)
    nodes = {n["name"]: n for n in result["nodes"]}
    assert (nodes["orders"]["calls_in_per_s"], nodes["orders"]["calls_out_per_s"]) == (0.5, 0.1)
    assert nodes["orders"]["error_rate_in"] == 10.0
    assert (nodes["gateway"]["calls_in_per_s"], nodes["gateway"]["error_rate_in"]) == (0.0, None)
    assert result["window_s"] == 60.0


def test_endpoints_are_read_from_an_openapi_document() -> None:
    document = {
        "openapi": "3.1.0",
        "paths": {
            "/orders/{id}": {
                "delete": {"summary": "Cancel", "deprecated": True},
                "get": {"operationId": "get_order", "tags": ["orders"]},
                "parameters": [{"name": "id"}],  # not an operation
            },
            "/orders": {"post": {"summary": "Place an order"}, "get": {"summary": "List orders"}},
            "/broken": "not an object",
        },
    }
    assert endpoints_from_openapi(document) == [
        {"method": "GET", "path": "/orders", "summary": "List orders", "tags": [], "deprecated": False},
        {"method": "POST", "path": "/orders", "summary": "Place an order", "tags": [], "deprecated": False},
        {"method": "GET", "path": "/orders/{id}", "summary": "get_order", "tags": ["orders"], "deprecated": False},
        {"method": "DELETE", "path": "/orders/{id}", "summary": "Cancel", "tags": [], "deprecated": True},
    ]
    assert endpoints_from_openapi({"openapi": "3.1.0"}) == []
