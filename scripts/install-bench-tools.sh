#!/usr/bin/env bash
# The load generator and the peer of benchmarks/gateway.py: wrk and nginx from Debian's packages.
# Not needed by the tests. Idempotent: does nothing when both are installed.
set -euo pipefail
if command -v wrk >/dev/null && { command -v nginx >/dev/null || test -x /usr/sbin/nginx; }; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
$SUDO apt-get update -q
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q wrk nginx-light
