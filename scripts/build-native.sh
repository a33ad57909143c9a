#!/usr/bin/env bash
# Build meshkit's wheel with the modules a release compiles with mypyc (those listed under
# [tool.hatch.build.targets.wheel.hooks.mypyc] in pyproject.toml) and unpack it into DIR (default .native/site,
# relative to the repository's root), so that `PYTHONPATH=DIR` runs the compiled build. The wheel is left in
# DIR-wheel/.
#
#   scripts/build-native.sh [DIR]
#
# Needs a C compiler and Python's headers: without them it says so and exits 3 (callers decide whether that is an
# error). PYTHON picks the interpreter (default .venv/bin/python). Rebuilds only when a file under src/,
# pyproject.toml, README.md or the Python version changed since the last build into DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR="${1:-.native/site}"
DIR="${DIR%/}"
WHEELS="$DIR-wheel"
PY="${PYTHON:-.venv/bin/python}"
if [[ "$PY" != */* ]]; then  # a command name: from PATH
    PY="$(command -v "$PY" || true)"
fi
if [ -z "$PY" ] || [ ! -x "$PY" ]; then
    echo "build-native: no Python at ${PYTHON:-.venv/bin/python} (make venv, or set PYTHON)" >&2
    exit 1
fi
PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"  # absolute: the build runs in a copy of the tree
# the compiler the build will use: $CC, else the one Python was built with
COMPILER="${CC:-$("$PY" -c 'import sysconfig; print((sysconfig.get_config_var("CC") or "cc").split()[0])')}"
if ! command -v "${COMPILER%% *}" >/dev/null; then
    echo "build-native: no C compiler ($COMPILER): the compiled modules (gateway engine, span recorder) are not built" >&2
    exit 3
fi
INCLUDE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
if [ ! -f "$INCLUDE/Python.h" ]; then
    echo "build-native: no Python headers in $INCLUDE: the compiled modules (gateway engine, span recorder) are not built" >&2
    exit 3
fi
STAMP="$DIR/.source-hash"
HASH="$( { "$PY" -VV; find src pyproject.toml README.md -type f ! -name '*.pyc' ! -name '*.so' -print0 | sort -z |
    xargs -0 sha256sum; } | sha256sum | cut -d' ' -f1)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$HASH" ]; then
    exit 0
fi
for target in "$DIR" "$WHEELS"; do  # only ever replace what this script made
    if [ -e "$target" ] && [ -n "$(ls -A "$target")" ] && [ ! -f "$DIR/.source-hash" ]; then
        echo "build-native: $target exists and is not an earlier build of this script: not replacing it" >&2
        exit 1
    fi
done
rm -rf "$DIR" "$WHEELS"
mkdir -p "$DIR" "$WHEELS"
WHEELS="$(cd "$WHEELS" && pwd)"
echo "build-native: compiling the gateway engine and the span recorder with mypyc (about a minute)..." >&2
# from a copy: the mypyc hook compiles in the tree it builds, and .so files left beside src/*.py would shadow the
# source for everything that imports it from there (the editable install, the tests)
TREE="$(mktemp -d)"
trap 'rm -rf "$TREE"' EXIT
cp -r src pyproject.toml README.md "$TREE"/
find "$TREE/src" \( -name '__pycache__' -prune -exec rm -rf {} + \) -o \( -name '*.so' -exec rm -f {} + \)
(cd "$TREE" && CC="$COMPILER" HATCH_BUILD_HOOKS_ENABLE=1 "$PY" -m pip wheel --quiet --disable-pip-version-check \
    --no-deps -w "$WHEELS" .) >&2
"$PY" -m zipfile -e "$WHEELS"/meshkit-*.whl "$DIR"
echo "$HASH" > "$STAMP"
echo "build-native: $DIR" >&2
