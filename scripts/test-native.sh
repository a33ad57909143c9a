#!/usr/bin/env bash
# The gateway's tests again, against the mypyc-compiled forwarding engine (scripts/build-native.sh), so the
# compiled build that wheels carry is held to the same tests as the Python source. Skipped (exit 0, with a
# message) where no C compiler or Python headers are available.
set -euo pipefail
cd "$(dirname "$0")/.."
status=0
scripts/build-native.sh .native/site || status=$?
if [ "$status" -eq 3 ]; then
    echo "test-native: skipped (the compiled engine cannot be built here)" >&2
    exit 0
elif [ "$status" -ne 0 ]; then
    exit "$status"
fi
PYTHONPATH=.native/site .venv/bin/python - <<'PY'
import meshkit.gateway.server as server
assert server.__file__.endswith(".so"), f"the compiled engine was not picked up: {server.__file__}"
PY
echo "test-native: the gateway's tests against the compiled engine" >&2
PYTHONPATH=.native/site exec .venv/bin/pytest tests/gateway -q -p no:cacheprovider
