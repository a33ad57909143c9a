#!/usr/bin/env bash
# Check each local server the test suite needs and start it if it is not up.
# Servers the suite starts itself (etcd, a Kafka-protocol broker) are started by test fixtures on free ports.
# Nothing is needed yet by the foundation; backend issues add their servers here.
set -euo pipefail
exit 0
