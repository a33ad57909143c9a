"""Examples and documentation run as a new user would run them."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_the_resilience_demo_shows_every_policy_at_work() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "resilience_demo.py")],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for expected in (
        "breaker closed -> open",
        "breaker open -> half_open",
        "breaker half_open -> closed",
        "retry #1",
        "served from cache (CircuitOpen)",
        "what the policies did",
    ):
        assert expected in text, f"{expected!r} missing from the demo output:\n{text}"
    assert "Traceback" not in out.stderr


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


@pytest.mark.parametrize(
    ("doc", "index"),
    [(d, i) for d in DOCS for i in range(len(python_blocks(d)))],
    ids=lambda v: v.name if isinstance(v, Path) else str(v),
)
def test_python_examples_in_the_docs_run(doc: Path, index: int, tmp_path: Path) -> None:
    code = python_blocks(doc)[index]
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False, cwd=tmp_path
    )
    assert out.returncode == 0, f"{doc.name} example {index} failed:\n{code}\n{out.stderr}"
