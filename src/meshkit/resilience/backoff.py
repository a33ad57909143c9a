"""Backoff schedules: how long to wait before retry number *n*.

A backoff is an immutable value. ``delay(n, previous, rng)`` is pure: it takes the retry number (1 = the wait
before the second attempt), the previous delay (for decorrelated jitter) and a random source, so tests pass a
seeded ``random.Random`` and check exact bounds.

Jitter (see "Exponential Backoff And Jitter", AWS Architecture Blog) spreads retries of many clients so they do
not hit a recovering service at the same instant (the seed's "thundering herd"). With ``b`` the un-jittered delay:

============  ==============================================
``none``      ``b``
``full``      uniform in ``[0, b]``
``equal``     uniform in ``[b/2, b]``
``decorrelated``  uniform in ``[initial, min(cap, 3 * previous)]``
============  ==============================================
"""

from __future__ import annotations

import abc
import math
import random
from dataclasses import dataclass, field
from typing import Literal

__all__ = ["Backoff", "Constant", "Exponential", "Jitter", "Linear"]

Jitter = Literal["none", "full", "equal", "decorrelated"]
_JITTERS = ("none", "full", "equal", "decorrelated")


@dataclass(frozen=True, slots=True)
class Backoff(abc.ABC):
    """Base of the schedules. Subclasses define :meth:`base`."""

    jitter: Jitter = field(default="none", kw_only=True)
    cap: float = field(default=math.inf, kw_only=True)

    def __post_init__(self) -> None:
        if self.jitter not in _JITTERS:
            raise ValueError(f"jitter must be one of {', '.join(_JITTERS)}; got {self.jitter!r}")
        if not self.cap >= 0:
            raise ValueError(f"cap must be >= 0; got {self.cap}")

    @abc.abstractmethod
    def base(self, retry: int) -> float:
        """The un-jittered delay before retry number ``retry`` (1-based), before the cap."""

    def delay(self, retry: int, previous: float = 0.0, rng: random.Random | None = None) -> float:
        """The delay before retry number ``retry`` (1-based), jittered and capped."""
        r = rng if rng is not None else random
        b = min(self.base(retry), self.cap)
        j = self.jitter
        if j == "none":
            return b
        if j == "full":
            return r.uniform(0.0, b)
        if j == "equal":
            return b / 2 + r.uniform(0.0, b / 2)
        first = min(self.base(1), self.cap)
        upper = min(self.cap, max(first, 3 * max(previous, first)))
        return r.uniform(first, upper)


@dataclass(frozen=True, slots=True)
class Constant(Backoff):
    """The same delay every time: ``Constant(0.5)``."""

    seconds: float = 0.0

    def __post_init__(self) -> None:
        Backoff.__post_init__(self)
        if not self.seconds >= 0:
            raise ValueError(f"seconds must be >= 0; got {self.seconds}")

    def base(self, retry: int) -> float:
        return self.seconds


@dataclass(frozen=True, slots=True)
class Linear(Backoff):
    """``initial + step * (n - 1)``, capped: ``Linear(0.1, 0.1, cap=2.0)``."""

    initial: float = 0.1
    step: float = 0.1

    def __post_init__(self) -> None:
        Backoff.__post_init__(self)
        if not (self.initial >= 0 and self.step >= 0):
            raise ValueError("initial and step must be >= 0")

    def base(self, retry: int) -> float:
        return self.initial + self.step * (retry - 1)


@dataclass(frozen=True, slots=True)
class Exponential(Backoff):
    """``initial * factor ** (n - 1)``, capped: ``Exponential(0.1, jitter="full")`` waits up to 0.1, 0.2, 0.4, ..."""

    initial: float = 0.1
    factor: float = 2.0
    jitter: Jitter = field(default="full", kw_only=True)
    cap: float = field(default=30.0, kw_only=True)

    def __post_init__(self) -> None:
        Backoff.__post_init__(self)
        if not self.initial >= 0:
            raise ValueError(f"initial must be >= 0; got {self.initial}")
        if not self.factor >= 1:
            raise ValueError(f"factor must be >= 1; got {self.factor}")

    def base(self, retry: int) -> float:
        # Guard the power against overflow: past the cap the exact value does not matter.
        exponent = retry - 1
        if self.factor > 1 and exponent * math.log(self.factor) > 700:
            return math.inf
        return self.initial * self.factor**exponent
