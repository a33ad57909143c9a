"""The gateway against nginx, same upstream, same machine, one run.

    .venv/bin/python benchmarks/gateway.py [--duration 10] [--connections 64] [--workers 1,2] [--rounds 3]
        [--no-native] [--no-pin] [--pacing poisson|fixed] [--markdown]

Needs wrk and nginx (Debian: ``scripts/install-bench-tools.sh``). The upstream is nginx answering ``ok``; the
load generator is ``wrk -t2 -cN``. With 2+ CPUs and ``taskset`` (util-linux), the 1-worker runs pin the proxy under
test (nginx, the relay, the gateway alike) to CPU 0 and wrk and the upstream to CPU 1 (``--no-pin``: nothing is
pinned; the upstream otherwise stays on CPU 1 for the 2-worker runs too). Measured, for 1 and 2 workers each: direct
to the upstream; nginx as a reverse proxy (keep-alive to the upstream); with 1 worker, the floor under any Python
proxy (``benchmarks/python_relay.py``: a uvloop byte relay that parses nothing); the meshkit gateway with no
plugins, as the Python source runs it and, unless ``--no-native``, with the forwarding engine compiled by mypyc
(``scripts/build-native.sh``: the wheel a release builds; needs a C compiler) (nginx and each engine ``--rounds``
times, alternately, reported as medians with each round's ratio: one pair of 10-second runs on a shared machine can
differ by 20 % from the next); the meshkit gateway with JWT + rate limit +
access log. Then the latency the gateway adds at half of its
own maximum rate: wrk paced by a Lua ``delay()`` to that rate (``--pacing``: Poisson arrivals by default, or fixed
delays), direct and through the gateway, p99 difference.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from _native import native_env

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


@dataclass
class Result:
    name: str
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout}s")


def nginx(folder: Path, name: str, workers: int, server_block: str, on: Sequence[str]) -> subprocess.Popen[bytes]:
    prefix = folder / name
    (prefix / "logs").mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(
        f"""
worker_processes {workers};
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/logs/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    default_type text/plain;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    keepalive_requests 1000000;
    {server_block}
}}
"""
    )
    return subprocess.Popen([*on, NGINX, "-p", str(prefix), "-c", str(conf)], stderr=subprocess.DEVNULL)


def wrk(
    url: str, duration: int, connections: int, headers: list[str], script: Path | None = None, on: Sequence[str] = ()
) -> Result:
    cmd = [*on, "wrk", "-t2", f"-c{connections}", f"-d{duration}s", "--latency"]
    for h in headers:
        cmd += ["-H", h]
    if script is not None:
        cmd += ["-s", str(script)]
    out = subprocess.run([*cmd, url], capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]

    def pct(label: str) -> float:
        m = re.search(rf"^\s+{label}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if m is None:
            return float("nan")
        value, unit = float(m.group(1)), m.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    errors = 0
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        errors += int(m.group(1))
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        errors += sum(int(x) for x in m.groups())
    return Result("", rps, pct("50"), pct("99"), errors)


def paced_script(folder: Path, rate: float, connections: int, pacing: str) -> Path:
    """A wrk script pacing each connection so all of them together send about ``rate`` requests a second: after
    each response a connection waits a fixed delay (``fixed``: the connections, started together, stay in step and
    send in bursts of all of them at once), or an exponentially distributed one of the same mean (``poisson``: the
    requests arrive as a Poisson stream, the usual model of independent clients)."""
    delay_ms = 1000.0 * connections / rate
    path = folder / f"paced-{pacing}-{int(rate)}.lua"
    if pacing == "fixed":
        path.write_text(f"function delay() return {delay_ms:.3f} end\n")
    else:
        path.write_text(
            "local n = 0\n"
            "function setup(thread) n = n + 1; thread:set('seed', n) end\n"
            "function init(args) math.randomseed(seed * 7919 + os.time()) end\n"
            f"function delay() return -{delay_ms:.3f} * math.log(1 - math.random()) end\n"
        )
    return path


def gateway_config(folder: Path, name: str, upstream_port: int, port: int, plugins: bool) -> Path:
    plugin_block = ""
    if plugins:
        plugin_block = f"""
plugins:
  - jwt: {{algorithms: [HS256], secret: bench-secret-bench-secret-bench-secret, require: [exp]}}
  - rate_limit: {{limit: 100000000, window: 1s, key: [consumer]}}
  - access_log: {{to: {folder}/{name}-access.log}}
"""
    path = folder / f"{name}.yaml"
    path.write_text(
        f"""
listen: {{host: 127.0.0.1, port: {port}}}
limits: {{keepalive_timeout: 300s}}
{plugin_block}
routes:
  - name: all
    path: /
    targets: ["127.0.0.1:{upstream_port}"]
    breaker: false
"""
    )
    return path


def start_gateway(
    config: Path, workers: int, on: Sequence[str], env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """``env``: added to the environment (``PYTHONPATH`` of the compiled build)."""
    return subprocess.Popen(
        [*on, PYTHON, "-m", "meshkit", "gateway", "--config", str(config), "--workers", str(workers)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
        env={**os.environ, **env} if env else None,
    )


def median_result(results: Sequence[Result]) -> Result:
    """The run with the median rate (its own latencies with it)."""
    ordered = sorted(results, key=lambda r: r.rps)
    chosen = ordered[(len(ordered) - 1) // 2]
    return Result(chosen.name, chosen.rps, chosen.p50_ms, chosen.p99_ms, sum(r.errors for r in results))


def bench_token() -> str:
    import jwt  # PyJWT, installed with the gateway extra

    return str(jwt.encode({"sub": "bench", "exp": int(time.time()) + 3600}, "bench-secret-bench-secret-bench-secret"))


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument(
        "--pin",
        action=argparse.BooleanOptionalAction,
        default=(os.cpu_count() or 1) >= 2 and shutil.which("taskset") is not None,
        help="1-worker runs: the proxy under test on CPU 0, wrk and the upstream on CPU 1 (default: with 2+ CPUs)",
    )
    parser.add_argument("--pacing", choices=("poisson", "fixed"), default="poisson", help="see paced_script")
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="nginx and the no-plugin gateway are measured this many times, alternately; medians are reported",
    )
    parser.add_argument(
        "--native",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure the engine compiled with mypyc, as a wheel built with the hook carries it",
    )
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    for tool in ("wrk", NGINX):
        if shutil.which(tool) is None and not Path(tool).exists():
            sys.exit(f"error: {tool} is not installed\nhint: scripts/install-bench-tools.sh")
    engines: dict[str, dict[str, str] | None] = {"Python engine": None}
    if args.native:
        native = native_env()
        if native is None:
            print("the compiled engine cannot be built here: measuring the Python engine only", file=sys.stderr)
        else:
            engines["compiled engine"] = native
    folder = Path(tempfile.mkdtemp(prefix="meshkit-gw-bench-"))
    d, c = args.duration, args.connections
    # Pinned, a 1-worker proxy has a core to itself and the load (wrk, the upstream) the other: neither steals the
    # other's CPU, as on separate machines. Two workers need both cores, so those runs are never pinned.
    load_cpu = ["taskset", "-c", "1"] if args.pin else []
    proxy_cpu = ["taskset", "-c", "0"] if args.pin else []
    print(f"pinned: {'yes (proxy CPU 0, load CPU 1)' if args.pin else 'no'}; pacing: {args.pacing}", file=sys.stderr)
    up_port = free_port()
    upstream = nginx(
        folder,
        "upstream",
        1,
        f'server {{ listen 127.0.0.1:{up_port}; location / {{ return 200 "ok"; }} }}',
        load_cpu,
    )
    procs: list[subprocess.Popen[bytes]] = [upstream]
    rows: list[Result] = []
    token = bench_token()
    try:
        wait_port(up_port)
        wrk(f"http://127.0.0.1:{up_port}/", 2, c, [], on=load_cpu)  # warm up
        direct = wrk(f"http://127.0.0.1:{up_port}/", d, c, [], on=load_cpu)
        direct.name = "direct to upstream" + (" (wrk and upstream on one CPU: the load's ceiling)" if args.pin else "")
        rows.append(direct)
        print(f"{direct.name}: {direct.rps:,.0f} rps", file=sys.stderr)
        for workers in [int(w) for w in args.workers.split(",")]:
            pinned = args.pin and workers == 1
            on_proxy, on_load = (proxy_cpu, load_cpu) if pinned else ([], [])
            where = ", pinned" if pinned else ""
            port = free_port()
            proxy = nginx(
                folder,
                f"proxy{workers}",
                workers,
                f"""
    upstream up {{ server 127.0.0.1:{up_port}; keepalive 256; keepalive_requests 1000000; }}
    server {{ listen 127.0.0.1:{port};
        location / {{ proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection ""; }} }}
""",
                on_proxy,
            )
            procs.append(proxy)
            wait_port(port)
            wrk(f"http://127.0.0.1:{port}/", 2, c, [], on=on_load)
            # nginx and the no-plugin gateway(s) alternately, --rounds times: the machine's drift hits all alike
            plain: dict[str, tuple[int, subprocess.Popen[bytes]]] = {}
            for engine, env in engines.items():
                gport = free_port()
                config = gateway_config(folder, f"gw{workers}{engine[0]}", up_port, gport, False)
                plain[engine] = (gport, start_gateway(config, workers, on_proxy, env))
                procs.append(plain[engine][1])
                wait_port(gport)
                wrk(f"http://127.0.0.1:{gport}/", 2, c, [], on=on_load)
            runs: dict[str, list[Result]] = {"nginx": [], **{engine: [] for engine in engines}}
            for round_ in range(args.rounds):
                runs["nginx"].append(wrk(f"http://127.0.0.1:{port}/", d, c, [], on=on_load))
                for engine, (gport, _) in plain.items():
                    runs[engine].append(wrk(f"http://127.0.0.1:{gport}/", d, c, [], on=on_load))
                said = ", ".join(
                    f"{engine} {results[-1].rps:,.0f} rps ({results[-1].rps / runs['nginx'][-1].rps:.2f}x)"
                    for engine, results in runs.items()
                    if engine != "nginx"
                )
                print(
                    f"round {round_ + 1}/{args.rounds}, {workers} worker(s): nginx {runs['nginx'][-1].rps:,.0f} rps, "
                    f"{said}",
                    file=sys.stderr,
                )
            stop(proxy)
            of = f", median of {args.rounds}" if args.rounds > 1 else ""
            ng = median_result(runs["nginx"])
            ng.name = f"nginx proxy, {workers} worker(s){where}{of}"
            rows.append(ng)
            print(f"{ng.name}: {ng.rps:,.0f} rps", file=sys.stderr)
            if workers == 1:  # the floor under any Python proxy on this machine (benchmarks/python_relay.py)
                rport = free_port()
                relay = subprocess.Popen(
                    [*on_proxy, PYTHON, str(ROOT / "benchmarks" / "python_relay.py"), str(rport), str(up_port)]
                )
                procs.append(relay)
                wait_port(rport)
                wrk(f"http://127.0.0.1:{rport}/", 2, c, [], on=on_load)
                floor = wrk(f"http://127.0.0.1:{rport}/", d, c, [], on=on_load)
                floor.name = f"peer: Python floor, a uvloop byte relay (no HTTP parsing), 1 process{where}"
                floor.name += f" — {floor.rps / ng.rps:.2f}x nginx"
                rows.append(floor)
                print(f"{floor.name}: {floor.rps:,.0f} rps", file=sys.stderr)
                stop(relay)
            for engine, (gport, gw) in plain.items():
                ratios = sorted(g.rps / n.rps for n, g in zip(runs["nginx"], runs[engine], strict=True))
                r = median_result(runs[engine])
                r.name = f"meshkit gateway, no plugins, {engine}, {workers} worker(s){where}{of}"
                r.name += f" — {statistics.median(ratios):.2f}x nginx"
                if args.rounds > 1:
                    r.name += " (rounds: " + ", ".join(f"{x:.2f}" for x in ratios) + ")"
                rows.append(r)
                print(f"{r.name}: {r.rps:,.0f} rps", file=sys.stderr)
                # latency added at half of the gateway's own max rate
                half = r.rps / 2
                script = paced_script(folder, half, c, args.pacing)
                base = wrk(f"http://127.0.0.1:{up_port}/", d, c, [], script, on=on_load)
                via = wrk(f"http://127.0.0.1:{gport}/", d, c, [], script, on=on_load)
                added = Result(
                    f"p99 added at {half:,.0f} rps (half of max, {args.pacing} arrivals), {engine}, {workers} "
                    f"worker(s){where}: {via.p99_ms - base.p99_ms:.2f} ms (direct p99 {base.p99_ms:.2f} ms, via "
                    f"gateway {via.p99_ms:.2f} ms; p50 added {via.p50_ms - base.p50_ms:.2f} ms)",
                    via.rps,
                    via.p50_ms,
                    via.p99_ms,
                    via.errors,
                )
                rows.append(added)
                print(added.name, file=sys.stderr)
                stop(gw)
            gport = free_port()
            gw = start_gateway(gateway_config(folder, f"gw{workers}p", up_port, gport, True), workers, on_proxy)
            procs.append(gw)
            wait_port(gport)
            headers = [f"Authorization: Bearer {token}"]
            wrk(f"http://127.0.0.1:{gport}/", 2, c, headers, on=on_load)
            r = wrk(f"http://127.0.0.1:{gport}/", d, c, headers, on=on_load)
            r.name = f"meshkit gateway, JWT + rate limit + access log, Python engine, {workers} worker(s){where}"
            r.name += f" — {r.rps / ng.rps:.2f}x nginx"
            rows.append(r)
            print(f"{r.name}: {r.rps:,.0f} rps", file=sys.stderr)
            stop(gw)
    finally:
        for p in procs:
            stop(p)
        shutil.rmtree(folder, ignore_errors=True)
    if args.markdown:
        print("| case | rps | p50 ms | p99 ms | errors |")
        print("|---|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r.name} | {r.rps:,.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | {r.errors} |")
    else:
        for r in rows:
            print(f"{r.name:<90} {r.rps:>10,.0f} rps  p50 {r.p50_ms:6.2f} ms  p99 {r.p99_ms:6.2f} ms  err {r.errors}")


if __name__ == "__main__":
    main()
