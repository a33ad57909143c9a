"""What the tests that start their own servers (etcd, a Kafka-protocol broker, a second NATS or RabbitMQ) share: a
free loopback port, and a command line whose process the kernel kills when the test process dies."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Sequence

__all__ = ["free_port", "orphan_proof"]

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
    """A loopback TCP port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def orphan_proof(argv: Sequence[str]) -> list[str]:
    """``argv`` run through a launcher that asks the kernel (``PR_SET_PDEATHSIG``) to kill it when this process
    dies, so a test run killed outright leaves no server behind."""
    return [sys.executable, "-c", _LAUNCHER, str(os.getpid()), *argv]
