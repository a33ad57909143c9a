#!/usr/bin/env bash
# The tests of the modules a release wheel compiles with mypyc (scripts/build-native.sh: the gateway's forwarding
# engine, the span recorder) again, against the compiled build, so that it is held to the same tests as the
# Python source. Skipped (exit 0, with a
# message) where no C compiler or Python headers are available.
set -euo pipefail
cd "$(dirname "$0")/.."
status=0
scripts/build-native.sh .native/site || status=$?
if [ "$status" -eq 3 ]; then
    echo "test-native: skipped (the compiled modules cannot be built here)" >&2
    exit 0
elif [ "$status" -ne 0 ]; then
    exit "$status"
fi
PYTHONPATH=.native/site .venv/bin/python - <<'PY'
import meshkit.gateway.server as server
import meshkit.tracing._recorder as recorder
for module in (server, recorder):
    assert module.__file__.endswith(".so"), f"the compiled module was not picked up: {module.__file__}"
PY
echo "test-native: the gateway's and the tracing's tests against the compiled build" >&2
PYTHONPATH=.native/site exec .venv/bin/pytest tests/gateway tests/tracing tests/client tests/runtime/test_service.py \
    -q -p no:cacheprovider
