"""Instructions tracing adds to an in-process service call (callgrind), for work on the tracing hot path.

    .venv/bin/python benchmarks/tracing_instructions.py [--calls 1000] [--warmup 200] [--native]

Runs ``benchmarks/tracing.py``'s scenario (a ServiceClient calling a service through the in-process ASGI transport)
under ``valgrind --tool=callgrind`` with ``--warmup`` calls and with ``--warmup + --calls`` calls, untraced and
traced by meshkit, and prints (difference) / ``--calls`` for each: instructions per call, start-up and shutdown
cancelling out. ``--native`` runs the mypyc-compiled build (``scripts/build-native.sh``). Wall-clock speed plays no
part, so a busy machine does not skew it. String hashing is seeded with ``--hash-seed`` (default 0): with Python's
random seed, dict layouts, and so the instructions a lookup takes, change from run to run, and the same code
measured twice moved by several thousand instructions per call; with a fixed seed it repeats within a few dozen.
A change to compare is measured at the same seed; a figure to report is measured at several.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from _native import native_env

ROOT = Path(__file__).resolve().parent.parent

CHILD = """
import asyncio, sys, tempfile
from pathlib import Path
sys.path.insert(0, {benchmarks!r})
import tracing
with tempfile.TemporaryDirectory() as folder:
    asyncio.run(tracing.scenario(sys.argv[1], int(sys.argv[2]), 1, Path(folder)))
"""


def collected(mode: str, calls: int, env: dict[str, str]) -> int:
    with tempfile.TemporaryDirectory() as folder:
        script = Path(folder) / "child.py"
        script.write_text(CHILD.format(benchmarks=str(ROOT / "benchmarks")))
        done = subprocess.run(
            ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, str(script), mode,
             str(calls)],
            capture_output=True, text=True, env=env, check=True,
        )  # fmt: skip
    found = re.search(r"Collected : (\d+)", done.stderr)
    if found is None:
        sys.exit(f"error: callgrind did not report a count:\n{done.stderr[-2000:]}")
    return int(found[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--native", action="store_true", help="measure the mypyc-compiled build")
    parser.add_argument("--hash-seed", type=int, default=0, help="PYTHONHASHSEED of the measured runs (default 0)")
    args = parser.parse_args()
    if args.calls < 1 or args.warmup < 1:
        parser.error("--calls and --warmup must be positive")
    if not 0 <= args.hash_seed <= 4294967295:
        parser.error("--hash-seed must be from 0 to 4294967295 (what PYTHONHASHSEED takes)")
    env = dict(os.environ, PYTHONHASHSEED=str(args.hash_seed))
    if args.native:
        native = native_env()
        if native is None:
            sys.exit("error: the compiled build cannot be made here (see above)")
        env.update(native)
    per_call: dict[str, float] = {}
    for mode in ("none", "meshkit"):
        print(f"callgrind: {mode} ...", file=sys.stderr, flush=True)
        short = collected(mode, args.warmup, env)
        long = collected(mode, args.warmup + args.calls, env)
        per_call[mode] = (long - short) / args.calls
    base, traced = per_call["none"], per_call["meshkit"]
    build = "compiled (mypyc)" if args.native else "Python source"
    print(f"{build}, hash seed {args.hash_seed}: untraced {base / 1000:.1f}k instructions per call, ", end="")
    print(f"traced {traced / 1000:.1f}k")
    print(f"added by tracing: {(traced - base) / 1000:.1f}k ({(traced - base) / base:.1%})")


if __name__ == "__main__":
    main()
