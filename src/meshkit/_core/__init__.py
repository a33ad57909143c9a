"""The bottom layer: clock, settings, ids, optional imports. Imports nothing from meshkit but ``errors``."""

from meshkit._core.clock import Clock, FakeClock, MonotonicClock

__all__ = ["Clock", "FakeClock", "MonotonicClock"]
