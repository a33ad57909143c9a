"""What the tests that start their own servers (etcd, a Kafka-protocol broker, a second NATS or RabbitMQ) share: a
free loopback port, and a command line whose process the kernel kills when the test process dies."""

from __future__ import annotations

import os
import random
import socket
import sys
from collections.abc import Sequence

__all__ = ["free_port", "orphan_proof"]

_random = random.SystemRandom()  # not the tests' seeded generator: two test processes must not agree

#: Runs ``argv[2:]`` in place of itself once the kernel will SIGKILL it when its parent (``argv[1]``) dies.
_LAUNCHER = """\
import contextlib, ctypes, os, signal, sys
with contextlib.suppress(OSError, AttributeError):
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
if os.getppid() != int(sys.argv[1]):
    sys.exit("the parent died before the launcher started")
os.execvpe(sys.argv[2], sys.argv[2:], os.environ)
"""


def free_port() -> int:
    """A loopback TCP port nothing listens on now, for a server a test starts (or a connection to be refused).

    It is drawn from below the kernel's ephemeral range where there is room (``ip_local_port_range``): a port from
    ``bind(0)`` is released before the server binds it, and ports in that range are also handed to every outgoing
    connection on the machine, which can take it in between; ports below the range only go to explicit binders."""
    low = _ephemeral_low()
    for _ in range(100):
        port = _random.randrange(10_000, low) if low > 11_000 else 0
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            found: int = s.getsockname()[1]
            return found
    raise RuntimeError("no free loopback port found in 100 tries")


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range", encoding="ascii") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0  # not Linux: the kernel's choice


def orphan_proof(argv: Sequence[str]) -> list[str]:
    """``argv`` run through a launcher that asks the kernel (``PR_SET_PDEATHSIG``) to kill it when this process
    dies, so a test run killed outright leaves no server behind."""
    return [sys.executable, "-c", _LAUNCHER, str(os.getpid()), *argv]
