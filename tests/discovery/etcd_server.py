"""An etcd server of the tests' own, for the etcd registry's tests.

:class:`EtcdServer` starts one ``etcd`` (Debian's ``etcd-server``, 3.4; ``scripts/install-etcd.sh`` installs it when
the binary is missing) on free client and peer ports of 127.0.0.1, with its data in a temporary directory, waits until
it answers ``/health``, and stops it. ``restart(wipe=...)`` stops it and starts it again on the same ports, keeping
its data (a process restart: leases survive) or not (a new, empty etcd: every lease is lost). The heartbeat and
election timings are shortened so a lease of 1 s is honoured (etcd's least TTL is 1.5 election timeouts, rounded up
to whole seconds: 2 s with the default flags) and a restarted server elects itself quickly.

The server is started through a small launcher that asks Linux to kill it when the thread that started it dies
(``PR_SET_PDEATHSIG``), so a test run that is killed outright leaves no etcd behind. Start and restart the server
from a thread that outlives it (the test's own thread or the event loop's).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Self

import pytest

from tests.servers import free_port, orphan_proof

__all__ = ["EtcdServer", "etcd_binary"]

ROOT = Path(__file__).resolve().parents[2]


def etcd_binary(*, install: bool = True) -> str | None:
    """The etcd binary (``MESHKIT_ETCD``, PATH, /usr/bin); with ``install``, run scripts/install-etcd.sh if there is
    none. None if there is none and it could not be installed."""
    for candidate in (os.environ.get("MESHKIT_ETCD"), shutil.which("etcd"), "/usr/bin/etcd"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    if not install:
        return None
    script = ROOT / "scripts" / "install-etcd.sh"
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=900, check=False)
    if done.returncode != 0:
        sys.stderr.write(done.stderr)
        return None
    lines = done.stdout.strip().splitlines()
    return lines[-1] if lines and os.access(lines[-1], os.X_OK) else None


def _data_root() -> str | None:
    """Where data directories go: memory (/dev/shm) when there is some, so etcd's fsyncs cost nothing."""
    shm = "/dev/shm"
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None


class EtcdServer:
    """One single-member etcd on free ports of 127.0.0.1 (see the module docstring)."""

    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.client_port = free_port()
        self.peer_port = free_port()
        while self.peer_port == self.client_port:
            self.peer_port = free_port()
        self.data_dir = tempfile.mkdtemp(prefix="meshkit-etcd-", dir=_data_root())
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = Path(self.data_dir + ".log")

    @property
    def url(self) -> str:
        """The registry URL of this server."""
        return f"etcd://127.0.0.1:{self.client_port}"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    def _argv(self) -> list[str]:
        peer = f"http://127.0.0.1:{self.peer_port}"
        return [
            self.binary,
            "--name=meshkit-test",
            f"--data-dir={self.data_dir}/data",
            f"--listen-client-urls={self.endpoint}",
            f"--advertise-client-urls={self.endpoint}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=meshkit-test={peer}",
            "--initial-cluster-state=new",
            "--heartbeat-interval=50",
            "--election-timeout=500",  # least lease TTL: ceil(1.5 x 0.5 s) = 1 s
            "--logger=zap",
            "--log-outputs=stderr",
            "--log-level=warn",
        ]

    def start(self, timeout: float = 60.0) -> None:
        """Start etcd and wait until it answers as healthy (a leader elected, requests served)."""
        self.spawn()
        end = time.monotonic() + timeout
        while not self.healthy():
            if time.monotonic() > end:
                self.stop()
                raise RuntimeError(f"etcd did not become healthy within {timeout} s; its log:\n{self.log()}")
            time.sleep(0.05)

    def spawn(self) -> None:
        """Start etcd without waiting for it (:meth:`healthy` says when it answers); a no-op while it runs."""
        if self.process is not None and self.process.poll() is None:
            return
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                orphan_proof(self._argv()),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )

    def healthy(self) -> bool:
        """Whether etcd answers ``GET /health`` with ``{"health": "true"}``."""
        if self.process is None or self.process.poll() is not None:
            if self.process is not None:
                raise RuntimeError(f"etcd exited with {self.process.returncode}; its log:\n{self.log()}")
            return False
        try:
            with urllib.request.urlopen(f"{self.endpoint}/health", timeout=1) as response:
                return bool(json.loads(response.read()).get("health") == "true")
        except (OSError, urllib.error.URLError, ValueError):
            return False

    def stop(self, *, kill: bool = False) -> None:
        """Stop etcd (SIGTERM, or SIGKILL with ``kill``) and wait for it to exit; its data stays."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(15)

    def restart(self, *, wipe: bool = False, kill: bool = False) -> None:
        """Stop and start again on the same ports; with ``wipe`` the data is gone (a new, empty etcd)."""
        self.stop(kill=kill)
        if wipe:
            self.wipe()
        self.start()

    def wipe(self) -> None:
        """Delete the data of a stopped server: the next start is a new, empty etcd."""
        if self.process is not None:
            raise RuntimeError("stop etcd before wiping its data")
        shutil.rmtree(f"{self.data_dir}/data", ignore_errors=True)

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-4000:]
        return ""

    def close(self) -> None:
        """Stop etcd and delete its data and log."""
        self.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)
        with contextlib.suppress(OSError):
            self.log_path.unlink()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def require_etcd() -> str:
    """The etcd binary, installed if need be; the calling test is skipped where there is none (failed under CI)."""
    binary = etcd_binary()
    if binary is None:
        message = "no etcd binary, and scripts/install-etcd.sh could not install one"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return binary
