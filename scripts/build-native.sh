#!/usr/bin/env bash
# Build meshkit's wheel with the gateway's forwarding engine compiled by mypyc (the modules listed under
# [tool.hatch.build.targets.wheel.hooks.mypyc] in pyproject.toml) and unpack it into DIR (default
# .native/site), so that `PYTHONPATH=DIR` runs the compiled build. The wheel itself is left in DIR/../wheel.
#
#   scripts/build-native.sh [DIR]
#
# Needs a C compiler and Python's headers. Without them it says so and exits 3 (callers decide whether that is
# an error). Rebuilds only when a file under src/ or pyproject.toml changed since the last build into DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR="${1:-.native/site}"
PY="${PYTHON:-.venv/bin/python}"
PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"  # absolute: the build runs in a copy of the tree
CC_BIN="${CC:-cc}"
if ! command -v "$CC_BIN" >/dev/null && ! command -v gcc >/dev/null; then
    echo "build-native: no C compiler (cc/gcc): the compiled gateway engine is not built" >&2
    exit 3
fi
INCLUDE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
if [ ! -f "$INCLUDE/Python.h" ]; then
    echo "build-native: no Python headers in $INCLUDE: the compiled gateway engine is not built" >&2
    exit 3
fi
STAMP="$DIR/.source-hash"
HASH="$(find src -name '*.py' -type f -print0 | sort -z | xargs -0 cat pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$HASH" ]; then
    exit 0
fi
WHEELS="$(dirname "$DIR")/wheel"
rm -rf "$DIR" "$WHEELS"
mkdir -p "$DIR" "$WHEELS"
echo "build-native: compiling the gateway engine with mypyc (about half a minute)..." >&2
# from a copy: the mypyc hook compiles in the tree it builds, and .so files left beside src/*.py would shadow the
# source for everything that imports it from there (the editable install, the tests)
TREE="$(mktemp -d)"
trap 'rm -rf "$TREE"' EXIT
cp -r src pyproject.toml README.md "$TREE"/
find "$TREE/src" -name '__pycache__' -prune -exec rm -rf {} + -o -name '*.so' -exec rm -f {} +
WHEELS="$(cd "$WHEELS" && pwd)"
(cd "$TREE" && HATCH_BUILD_HOOKS_ENABLE=1 "$PY" -m pip wheel --quiet --disable-pip-version-check --no-deps \
    -w "$WHEELS" .) >&2
"$PY" -m zipfile -e "$WHEELS"/meshkit-*.whl "$DIR"
echo "$HASH" > "$STAMP"
echo "build-native: $DIR" >&2
