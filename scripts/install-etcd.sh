#!/usr/bin/env bash
# Make sure an etcd server binary is on this machine, for the etcd registry's tests (tests/discovery/etcd_server.py
# starts its own etcd on free ports; nothing here starts one). Idempotent: with etcd already installed it only says
# so. Otherwise it installs Debian's etcd-server package (etcd 3.4) with apt-get, as root, running `apt-get update`
# first only if the plain install fails. Exits non-zero, saying why, when it cannot.
#
# Prints the path of the binary on its last line of standard output; messages go to standard error.
set -uo pipefail

say() { echo "install-etcd: $*" >&2; }

find_etcd() {
  local candidate
  for candidate in "${MESHKIT_ETCD:-}" "$(command -v etcd 2>/dev/null)" /usr/bin/etcd /usr/local/bin/etcd; do
    if [ -n "$candidate" ] && [ -x "$candidate" ]; then
      echo "$candidate"
      return 0
    fi
  done
  return 1
}

if path=$(find_etcd); then
  say "etcd is installed: $path ($("$path" --version 2>/dev/null | head -n 1))"
  echo "$path"
  exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
  say "error: etcd is not installed and this machine has no apt-get; install etcd 3.4 or newer (Debian: etcd-server)"
  say "hint: or point MESHKIT_ETCD at an etcd binary"
  exit 1
fi
if [ "$(id -u)" != 0 ]; then
  say "error: etcd is not installed and installing it needs root: sudo apt-get install -y etcd-server"
  exit 1
fi

install() {
  # The package would start a system etcd on port 2379 where an init system runs; a policy that forbids starting
  # services during this install keeps the machine as it was (the tests start their own etcd).
  local policy=/usr/sbin/policy-rc.d created=0 status
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && created=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q etcd-server >&2
  status=$?
  if [ "$created" = 1 ]; then
    rm -f "$policy"
  fi
  return $status
}

say "etcd is not installed: apt-get install -y etcd-server"
if ! install; then
  say "apt-get install failed; running apt-get update and trying again"
  if ! apt-get update -q >&2 || ! install; then
    say "error: could not install etcd-server with apt-get (see the apt-get output above)"
    exit 1
  fi
fi

if ! path=$(find_etcd); then
  say "error: etcd-server is installed but no etcd binary was found on PATH or in /usr/bin"
  exit 1
fi
say "installed $path ($("$path" --version 2>/dev/null | head -n 1))"
echo "$path"
