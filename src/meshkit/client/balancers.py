"""Load balancers: which instance of the ones in rotation takes the next call.

Every balancer honours the instance metadata ``weight`` (a number string, default ``1``): an instance of weight 2
gets about twice the calls of one of weight 1 (for the load-aware balancers: twice the outstanding calls before it
looks as busy). A weight that is not a positive number counts as 1; the client logs it once.

A balancer may keep state (a round-robin position) and may cache what it computes from the sequence it is given
by that sequence's identity: the client passes the same tuple until the rotation changes, and tuples and
:class:`~meshkit.discovery.Instance` values are immutable, so such a cache is never stale. Balancers are used from
one event loop; they take no locks.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

from meshkit.discovery import Instance
from meshkit.errors import ConfigurationError

__all__ = [
    "BALANCERS",
    "Balancer",
    "LeastOutstanding",
    "PowerOfTwo",
    "Random",
    "RoundRobin",
    "balancer_named",
    "weight",
]


def weight(instance: Instance) -> float:
    """The instance's ``weight`` metadata as a positive number (1.0 when absent or not a positive number)."""
    raw = instance.metadata.get("weight")
    if raw is None:
        return 1.0
    try:
        value = float(raw)
    except ValueError:
        return 1.0
    return value if value > 0 and math.isfinite(value) else 1.0


@runtime_checkable
class Balancer(Protocol):
    """Chooses one of ``instances`` (never empty). ``outstanding`` maps instance ids to the calls this client has
    in flight to each (absent: none)."""

    def choose(self, instances: Sequence[Instance], outstanding: Mapping[str, int]) -> Instance: ...


class _Weights:
    """The weights of one sequence of instances, cached by the identity of the sequence."""

    __slots__ = ("equal", "seen", "total", "values")

    def __init__(self) -> None:
        self.seen: Sequence[Instance] | None = None
        self.values: list[float] = []
        self.total = 0.0
        self.equal = True

    def of(self, instances: Sequence[Instance]) -> _Weights:
        if instances is not self.seen:
            self.values = [weight(i) for i in instances]
            self.total = sum(self.values)
            self.equal = all(w == self.values[0] for w in self.values)
            self.seen = instances
        return self


class RoundRobin:
    """Each instance in turn. With weights, smooth weighted round-robin (the nginx scheme): an instance of weight
    3 among weights 1 gets 3 calls of every 5, spread out (``a b a c a``) rather than in a burst."""

    def __init__(self) -> None:
        self._next = 0
        self._weights = _Weights()
        self._current: dict[str, float] = {}

    def choose(self, instances: Sequence[Instance], outstanding: Mapping[str, int]) -> Instance:
        w = self._weights.of(instances)
        if w.equal:
            n = self._next % len(instances)
            self._next = n + 1
            return instances[n]
        current = self._current
        if len(current) > 2 * len(instances):  # instances left the rotation: forget their credit
            ids = {i.id for i in instances}
            self._current = current = {k: v for k, v in current.items() if k in ids}
        best = 0
        best_credit = -math.inf
        for n, (instance, w_n) in enumerate(zip(instances, w.values, strict=True)):
            credit = current.get(instance.id, 0.0) + w_n
            current[instance.id] = credit
            if credit > best_credit:
                best, best_credit = n, credit
        chosen = instances[best]
        current[chosen.id] -= w.total
        return chosen


class Random:
    """Uniformly at random, or in proportion to the weights. Pass a seeded ``rng`` for repeatable tests."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self.rng = rng or random.Random()
        self._weights = _Weights()

    def choose(self, instances: Sequence[Instance], outstanding: Mapping[str, int]) -> Instance:
        w = self._weights.of(instances)
        if w.equal:
            return instances[self.rng.randrange(len(instances))]
        return self.rng.choices(instances, w.values)[0]


def _load(instance: Instance, w: float, outstanding: Mapping[str, int]) -> float:
    """How busy an instance looks: its calls in flight, plus the one we would add, per unit of weight."""
    return (outstanding.get(instance.id, 0) + 1) / w


class LeastOutstanding:
    """The instance with the fewest calls in flight from this client (per unit of weight); ties are broken at
    random, so sequential calls (always 0 in flight) still spread over every instance."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self.rng = rng or random.Random()
        self._weights = _Weights()

    def choose(self, instances: Sequence[Instance], outstanding: Mapping[str, int]) -> Instance:
        w = self._weights.of(instances)
        best: list[int] = []
        lowest = math.inf
        for n, instance in enumerate(instances):
            load = _load(instance, w.values[n], outstanding)
            if load < lowest:
                lowest, best = load, [n]
            elif load == lowest:
                best.append(n)
        return instances[best[0] if len(best) == 1 else best[self.rng.randrange(len(best))]]


class PowerOfTwo:
    """Power of two choices: draw two different instances at random (in proportion to their weights) and take
    the less busy one. Nearly as good as least-outstanding at spreading load, without scanning every instance
    and without every client herding onto the same "least busy" one. The default balancer."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self.rng = rng or random.Random()
        self._weights = _Weights()

    def choose(self, instances: Sequence[Instance], outstanding: Mapping[str, int]) -> Instance:
        n = len(instances)
        if n == 1:
            return instances[0]
        w = self._weights.of(instances)
        rng = self.rng
        if w.equal:
            a = rng.randrange(n)
            b = rng.randrange(n - 1)
            if b >= a:  # a second draw among the other n - 1
                b += 1
            wa = wb = 1.0
        else:
            a, b = self._two_weighted(w.values, w.total)
            wa, wb = w.values[a], w.values[b]
        first, second = instances[a], instances[b]
        if _load(second, wb, outstanding) < _load(first, wa, outstanding):
            return second
        return first

    def _two_weighted(self, values: list[float], total: float) -> tuple[int, int]:
        """Two different indexes, each drawn in proportion to its weight (the second among the rest)."""
        a = _draw(values, total, self.rng.random(), skip=-1)
        b = _draw(values, total - values[a], self.rng.random(), skip=a)
        return a, b


def _draw(values: list[float], total: float, u: float, skip: int) -> int:
    """The index where ``u * total`` falls in the running sum of ``values`` (leaving out index ``skip``)."""
    target = u * total
    running = 0.0
    last = -1
    for n, value in enumerate(values):
        if n == skip:
            continue
        running += value
        last = n
        if target < running:
            return n
    return last  # rounding at the top end


#: The names :class:`~meshkit.client.ClientOptions` accepts for ``balancer``.
BALANCERS = ("p2c", "round_robin", "random", "least_outstanding")


def balancer_named(name: str, rng: random.Random | None = None) -> Balancer:
    """A new balancer for one of :data:`BALANCERS` (``"power_of_two"`` is accepted for ``"p2c"``)."""
    if name in ("p2c", "power_of_two"):
        return PowerOfTwo(rng)
    if name == "round_robin":
        return RoundRobin()
    if name == "random":
        return Random(rng)
    if name == "least_outstanding":
        return LeastOutstanding(rng)
    raise ConfigurationError(f"unknown balancer {name!r}", hint=f"use one of {', '.join(BALANCERS)}, or a Balancer")
