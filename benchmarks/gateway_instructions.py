"""Instructions the gateway process spends per proxied request (callgrind), for work on the gateway's hot path.

    .venv/bin/python benchmarks/gateway_instructions.py [--requests 2000] [--warmup 200] [--no-breaker] [--repeat 1]
        [--browser]

The upstream is a tiny asyncio HTTP/1.1 server answering ``ok`` with keep-alive, in a subprocess of its own (not
measured). The gateway (``python -m meshkit gateway``, one worker, no plugins, one route to the upstream with the
default circuit breaker unless ``--no-breaker``) runs under ``valgrind --tool=callgrind
--callgrind-out-file=/dev/null``. A raw-socket client sends ``--warmup`` keep-alive requests, then ``K`` more, one
at a time (each waits for its answer); the gateway is stopped with SIGTERM and callgrind's "Collected" count read.
This is done for K=0 and K=``--requests``; (difference) / K is the gateway's instructions per proxied request
(start-up, warm-up and shutdown cancel out). Wall-clock speed plays no part, so a busy machine does not skew it,
apart from the 0.1 s sweep timer running a little longer in the longer run (a few hundred instructions per second
of run, spread over every request).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable

UPSTREAM = r"""
import asyncio, sys

ANSWER = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\nok"

class Upstream(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport
        self.buffer = b""

    def data_received(self, data):
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            self.buffer = self.buffer[end + 4:]  # GETs without a body
            self.transport.write(ANSWER)

async def main():
    server = await asyncio.get_running_loop().create_server(Upstream, "127.0.0.1", 0)
    sys.stdout.write(f"{server.sockets[0].getsockname()[1]}\n")
    sys.stdout.flush()
    await server.serve_forever()

asyncio.run(main())
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def config(folder: Path, upstream_port: int, port: int, breaker: bool) -> Path:
    path = folder / "gateway.yaml"
    path.write_text(
        f"""
listen: {{host: 127.0.0.1, port: {port}}}
limits: {{keepalive_timeout: 300s}}
routes:
  - name: all
    path: /
    targets: ["127.0.0.1:{upstream_port}"]
{"" if breaker else "    breaker: false"}
"""
    )
    return path


def read_answer(sock: socket.socket, buffer: bytearray) -> None:
    """Read one response (content-length framed) from ``sock``; what follows it stays in ``buffer``."""
    while True:
        end = buffer.find(b"\r\n\r\n")
        if end >= 0:
            head = bytes(buffer[:end]).lower()
            m = re.search(rb"\r\ncontent-length:\s*(\d+)", head)
            if not head.startswith(b"http/1.1 200") or m is None:
                raise RuntimeError(f"unexpected answer: {bytes(buffer[:end])!r}")
            total = end + 4 + int(m.group(1))
            if len(buffer) >= total:
                del buffer[:total]
                return
        data = sock.recv(65536)
        if not data:
            raise RuntimeError("the gateway closed the connection")
        buffer += data


def measure(gateway_config: Path, port: int, warmup: int, requests: int, browser: bool = False) -> int:
    """Callgrind's instruction count of one gateway run serving ``warmup + requests`` requests."""
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    proc = subprocess.Popen(
        [
            "valgrind",
            "--tool=callgrind",
            "--callgrind-out-file=/dev/null",
            PYTHON,
            "-m",
            "meshkit",
            "gateway",
            "--config",
            str(gateway_config),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
        env=env,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if b"listening" not in line:
            raise RuntimeError(f"the gateway did not start: {line!r}")
        request = REQUEST if not browser else BROWSER_REQUEST
        with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
            buffer = bytearray()
            for _ in range(warmup + requests):
                sock.sendall(request)
                read_answer(sock, buffer)
        time.sleep(0.5)  # let the gateway notice the client left before it is told to stop
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    m = re.search(rb"Collected : (\d+)", err)
    if m is None:
        raise RuntimeError(f"no callgrind total in the gateway's stderr:\n{err.decode(errors='replace')[-2000:]}")
    return int(m.group(1))


REQUEST = b"GET / HTTP/1.1\r\nhost: bench\r\nuser-agent: gateway_instructions\r\naccept: */*\r\n\r\n"
# the head a browser sends (12 headers), to see what each header costs
BROWSER_REQUEST = (
    b"GET /api/orders/42?expand=items HTTP/1.1\r\nhost: shop.example.com\r\n"
    b"user-agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0 Safari/537.36\r\n"
    b"accept: application/json, text/plain, */*\r\naccept-language: en-GB,en;q=0.9\r\n"
    b"accept-encoding: gzip, deflate, br\r\nreferer: https://shop.example.com/orders\r\n"
    b"cookie: session=6f1d2c3b4a5e6f70; theme=dark\r\nsec-fetch-dest: empty\r\nsec-fetch-mode: cors\r\n"
    b"sec-fetch-site: same-origin\r\nx-request-id: 0b4c7d8e-1f2a-4b3c-9d8e-7f6a5b4c3d2e\r\n"
    b"connection: keep-alive\r\n\r\n"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--no-breaker", action="store_true", help="the route without its circuit breaker")
    parser.add_argument("--repeat", type=int, default=1, help="measure the pair this many times")
    parser.add_argument("--browser", action="store_true", help="send a browser's 12-header request, not 3 headers")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="meshkit-gw-instr-"))
    upstream = subprocess.Popen([PYTHON, "-c", UPSTREAM], stdout=subprocess.PIPE)
    try:
        assert upstream.stdout is not None
        upstream_port = int(upstream.stdout.readline())
        port = free_port()
        path = config(folder, upstream_port, port, breaker=not args.no_breaker)
        for _ in range(args.repeat):
            base = measure(path, port, args.warmup, 0, args.browser)
            loaded = measure(path, port, args.warmup, args.requests, args.browser)
            per = (loaded - base) / args.requests
            print(
                f"gateway instructions per proxied request: {per:,.0f} "
                f"(K=0: {base:,}; K={args.requests}: {loaded:,}; breaker {'off' if args.no_breaker else 'on'})"
            )
    finally:
        upstream.terminate()
        upstream.wait()
        for f in folder.iterdir():
            f.unlink()
        folder.rmdir()


if __name__ == "__main__":
    main()
