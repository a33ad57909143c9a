"""The balancers' choice logic, with seeded random sources: distributions, weights, load awareness."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Mapping, Sequence

import pytest

from meshkit.client import Balancer, LeastOutstanding, PowerOfTwo, Random, RoundRobin, weight
from meshkit.client.balancers import balancer_named
from meshkit.discovery import Instance
from meshkit.errors import ConfigurationError


def instances(*weights: str | None) -> tuple[Instance, ...]:
    return tuple(
        Instance("svc", f"i{n}", "127.0.0.1", 8000 + n, metadata={} if w is None else {"weight": w})
        for n, w in enumerate(weights)
    )


def tally(
    balancer: Balancer, pool: Sequence[Instance], picks: int, outstanding: Mapping[str, int] = {}
) -> Counter[str]:
    return Counter(balancer.choose(pool, outstanding).id for _ in range(picks))


def test_weight_reads_the_metadata_and_falls_back_to_one() -> None:
    assert [weight(i) for i in instances(None, "2", "0.5", "nope", "-1", "0", "inf")] == [1, 2, 0.5, 1, 1, 1, 1]


def test_round_robin_takes_each_in_turn() -> None:
    pool = instances(None, None, None)
    rr = RoundRobin()
    assert [rr.choose(pool, {}).id for _ in range(7)] == ["i0", "i1", "i2", "i0", "i1", "i2", "i0"]


def test_weighted_round_robin_is_smooth_and_exact() -> None:
    pool = instances("3", "1", "1")
    rr = RoundRobin()
    picks = [rr.choose(pool, {}).id for _ in range(10)]
    # smooth: the heavy instance's turns are spread out, never three in a row
    assert picks[:5] == ["i0", "i1", "i0", "i2", "i0"]
    assert Counter(picks) == {"i0": 6, "i1": 2, "i2": 2}


def test_round_robin_follows_a_changed_rotation() -> None:
    rr = RoundRobin()
    pool = instances("2", "1")
    [rr.choose(pool, {}) for _ in range(3)]
    smaller = pool[1:]
    assert {rr.choose(smaller, {}).id for _ in range(5)} == {"i1"}


def test_random_is_uniform_without_weights() -> None:
    counts = tally(Random(random.Random(1)), instances(None, None, None, None), 40_000)
    assert set(counts) == {"i0", "i1", "i2", "i3"}
    for n in counts.values():
        assert 9_400 < n < 10_600


def test_random_honours_weights() -> None:
    counts = tally(Random(random.Random(2)), instances("1", "3"), 40_000)
    assert 9_400 < counts["i0"] < 10_600
    assert 29_400 < counts["i1"] < 30_600


def test_random_with_a_seed_repeats() -> None:
    pool = instances(None, "2", None)
    assert tally(Random(random.Random(7)), pool, 50) == tally(Random(random.Random(7)), pool, 50)


def test_least_outstanding_takes_the_idlest() -> None:
    pool = instances(None, None, None)
    lo = LeastOutstanding(random.Random(3))
    assert lo.choose(pool, {"i0": 4, "i1": 1, "i2": 2}).id == "i1"
    # per unit of weight: 4 in flight on weight 4 is as busy as 1 on weight 1, less than 2 on weight 1
    weighted = instances("4", None, None)
    assert lo.choose(weighted, {"i0": 4, "i1": 2, "i2": 2}).id == "i0"


def test_least_outstanding_breaks_ties_at_random() -> None:
    counts = tally(LeastOutstanding(random.Random(4)), instances(None, None, None), 30_000, {"i2": 1})
    assert set(counts) == {"i0", "i1"}  # i2 is busier: never chosen
    assert 14_000 < counts["i0"] < 16_000


def test_power_of_two_never_picks_the_busiest_of_two() -> None:
    pool = instances(None, None)
    p2c = PowerOfTwo(random.Random(5))
    assert {p2c.choose(pool, {"i0": 3}).id for _ in range(200)} == {"i1"}


def test_power_of_two_spreads_idle_load_evenly() -> None:
    counts = tally(PowerOfTwo(random.Random(6)), instances(None, None, None, None, None), 50_000)
    for n in counts.values():
        assert 9_300 < n < 10_700


def test_power_of_two_avoids_the_most_loaded_instance() -> None:
    # i0 is by far the busiest: it loses every comparison, so it is chosen only if drawn twice (never: the two
    # draws are different instances)
    pool = instances(None, None, None, None)
    counts = tally(PowerOfTwo(random.Random(8)), pool, 10_000, {"i0": 50, "i1": 1, "i2": 1, "i3": 1})
    assert "i0" not in counts
    assert len(counts) == 3


def test_power_of_two_honours_weights() -> None:
    # idle instances: the load scores tie on equal weights, so weights decide through the draw and the score
    counts = tally(PowerOfTwo(random.Random(9)), instances("1", "1", "6"), 40_000)
    assert counts["i2"] > 2.5 * counts["i0"]
    assert counts["i2"] > 2.5 * counts["i1"]
    assert abs(counts["i0"] - counts["i1"]) < 1_500


def test_power_of_two_with_one_instance() -> None:
    pool = instances(None)
    assert PowerOfTwo(random.Random(0)).choose(pool, {"i0": 9}) is pool[0]


@pytest.mark.parametrize(
    ("name", "kind"),
    [("p2c", PowerOfTwo), ("power_of_two", PowerOfTwo), ("round_robin", RoundRobin), ("random", Random),
     ("least_outstanding", LeastOutstanding)],
)  # fmt: skip
def test_balancers_by_name(name: str, kind: type) -> None:
    assert isinstance(balancer_named(name), kind)


def test_an_unknown_balancer_name_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="unknown balancer 'fastest'"):
        balancer_named("fastest")
