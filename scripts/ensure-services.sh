#!/usr/bin/env bash
# Check each local server the test suite needs and start it if it is not up (the commands are the machine's own,
# see the env notes); then wait until each answers. Servers the suite starts itself on free ports (a second
# redis-server or nats-server for restart tests, etcd, a Kafka-protocol broker) are started by test fixtures.
set -uo pipefail

up() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

install_package() {  # a server missing on this machine: install Debian's package (CI machines are Debian)
  local package=$1
  if ! command -v apt-get >/dev/null 2>&1 || [ "$(id -u)" != 0 ]; then
    echo "ensure-services: error: $package is not installed and cannot be installed here (needs root and apt-get)" >&2
    return 1
  fi
  echo "ensure-services: installing $package (apt-get)" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$package" >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$package" >/dev/null 2>&1; } \
    || { echo "ensure-services: error: apt-get install $package failed" >&2; return 1; }
}

start() {  # name port command...
  local name=$1 port=$2
  shift 2
  if up "$port"; then
    return 0
  fi
  echo "ensure-services: $name is not answering on 127.0.0.1:$port; starting it" >&2
  if ! command -v "$name" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$name" ]; then
    install_package "$name" || return 1
  fi
  "$@" >/dev/null 2>&1 || true
  for _ in $(seq 1 120); do
    up "$port" && return 0
    sleep 0.5
  done
  echo "ensure-services: error: $name did not come up on port $port within 60 s" >&2
  return 1
}

status=0
mkdir -p /var/lib/redis /var/log/redis 2>/dev/null || true
start redis-server 6379 redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" \
  --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log || status=1
start nats-server 4222 start-stop-daemon --start --oknodo --background --exec /usr/sbin/nats-server -- \
  -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log || status=1
start rabbitmq-server 5672 rabbitmq-server -detached || status=1
# PostgreSQL (the outbox, sagas and event store tests): Debian's cluster, whatever its version
if ! up 5432; then
  command -v pg_ctlcluster >/dev/null 2>&1 || install_package postgresql || status=1
fi
start pg_ctlcluster 5432 bash -c 'pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | tail -1)" main start' \
  || status=1
exit $status
