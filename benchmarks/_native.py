"""The mypyc-compiled build the benchmarks measure beside the Python source (what a release wheel carries)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SITE = ROOT / ".native" / "site"


def native_env() -> dict[str, str] | None:
    """``{"PYTHONPATH": ...}`` that runs the compiled build, made first if the source changed
    (``scripts/build-native.sh``); None where it cannot be built here (no C compiler or Python headers: the script
    says which). Any other failure of the build ends the benchmark."""
    done = subprocess.run([str(ROOT / "scripts" / "build-native.sh"), str(SITE)], check=False)
    if done.returncode == 3:
        return None
    if done.returncode != 0:
        sys.exit("error: scripts/build-native.sh failed (see above)")
    return {"PYTHONPATH": str(SITE)}
