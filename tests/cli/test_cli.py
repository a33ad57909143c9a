from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import meshkit.cli.config as config_command
from meshkit import __version__
from meshkit.cli import main


def run(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The real console entry point, in a fresh process, as a person would run it."""
    base = {"PATH": "/usr/bin:/bin", "HOME": str(cwd), "NO_COLOR": "1", "COLUMNS": "120"}
    return subprocess.run(
        [sys.executable, "-m", "meshkit", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**base, **(env or {})},
        timeout=120,
        check=False,
    )


def test_version_and_help(tmp_path: Path) -> None:
    out = run(["--version"], tmp_path)
    assert (out.returncode, out.stdout.strip()) == (0, f"meshkit {__version__}")
    out = run(["--help"], tmp_path)
    assert out.returncode == 0
    assert "config" in out.stdout
    assert "Usage" in out.stdout


def test_no_arguments_shows_help(tmp_path: Path) -> None:
    out = run([], tmp_path)
    assert "Usage" in out.stdout + out.stderr
    assert out.returncode != 0 or "config" in out.stdout


def test_config_shows_values_and_sources(tmp_path: Path) -> None:
    (tmp_path / "meshkit.toml").write_text('[broker]\nurl = "redis://localhost:6379/0"\n')
    out = run(["config", "--json"], tmp_path, env={"MESHKIT_LOG__LEVEL": "debug"})
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["broker.url"] == {"value": "redis://localhost:6379/0", "source": "meshkit.toml:2"}
    assert data["log.level"] == {"value": "DEBUG", "source": "environment variable MESHKIT_LOG__LEVEL"}
    assert data["registry.url"]["source"] == "default"
    table = run(["config"], tmp_path)
    assert table.returncode == 0
    assert "redis://localhost:6379/0" in table.stdout
    assert "meshkit.toml:2" in table.stdout


def test_config_does_not_print_secret_export_headers(tmp_path: Path) -> None:
    (tmp_path / "meshkit.toml").write_text('[tracing]\nheaders = { x-api-key = "s3cret-key" }\n')
    for args in (["config", "--json"], ["config"]):
        out = run(args, tmp_path)
        assert out.returncode == 0, out.stderr
        assert "s3cret-key" not in out.stdout
        assert "x-api-key" in out.stdout
    data = json.loads(run(["config", "--json"], tmp_path).stdout)
    assert data["tracing.headers"]["value"] == {"x-api-key": "***"}


def test_a_bad_config_prints_error_and_hint_without_a_traceback(tmp_path: Path) -> None:
    (tmp_path / "meshkit.toml").write_text('[broker]\nurl = "memory://"\n\n[brokr]\nurl = "x"\n')
    out = run(["config"], tmp_path)
    assert out.returncode == 2
    assert out.stderr.splitlines() == [
        "error: unknown setting 'brokr' (meshkit.toml:4)",
        "hint: did you mean 'broker'?",
    ]
    assert "Traceback" not in out.stderr


def test_bad_environment_and_missing_file(tmp_path: Path) -> None:
    out = run(["config"], tmp_path, env={"MESHKIT_TRACING__SAMPLE_RATIO": "lots"})
    assert out.returncode == 2
    assert out.stderr.startswith("error: invalid value for tracing.sample_ratio (environment variable")
    out = run(["config", "--file", str(tmp_path / "missing.toml")], tmp_path)
    assert out.returncode == 2
    assert "does not exist" in out.stderr
    assert "Traceback" not in out.stderr


def test_usage_errors_read_like_every_other_error(tmp_path: Path) -> None:
    out = run(["config", "--bogus"], tmp_path)
    assert out.returncode == 2
    assert out.stderr.splitlines() == ["error: No such option: --bogus", "hint: see 'meshkit config --help'"]
    out = run(["bogus"], tmp_path)
    assert out.returncode == 2
    assert out.stderr.splitlines()[0] == "error: No such command 'bogus'."
    assert "Traceback" not in out.stderr


def test_unexpected_errors_are_one_line_unless_debugging(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("something internal")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(config_command, "load_settings", broken)
    monkeypatch.delenv("MESHKIT_DEBUG", raising=False)
    with pytest.raises(SystemExit) as info:
        main(["config"])
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert "error: internal error: RuntimeError: something internal" in err
    assert "MESHKIT_DEBUG=1" in err
    assert "Traceback" not in err

    monkeypatch.setenv("MESHKIT_DEBUG", "1")
    with pytest.raises(RuntimeError, match="something internal"):
        main(["config"])
