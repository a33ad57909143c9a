#!/usr/bin/env bash
# Print the first Python interpreter on PATH that is 3.11 or newer (meshkit's floor).
set -euo pipefail
for candidate in python3 python3.13 python3.12 python3.11 python; do
  if command -v "$candidate" >/dev/null 2>&1 &&
     "$candidate" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
    command -v "$candidate"
    exit 0
  fi
done
echo "error: meshkit needs Python 3.11 or newer on PATH (found none)" >&2
exit 1
