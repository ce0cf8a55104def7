#!/usr/bin/env bash
# Runs a command (make test, by default) while stress-ng keeps every core busy at normal priority, so
# a test that holds only on an idle machine fails here first. LOAD_CPUS sets how many hogs (default: one
# per core). stress-ng comes from Debian; it is installed with apt when this runs as root.
set -euo pipefail
if ! command -v stress-ng >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing stress-ng with apt-get"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends stress-ng >/dev/null
  else
    echo "stress-ng is missing: run 'sudo apt-get install stress-ng'" >&2
    exit 2
  fi
fi
cpus=${LOAD_CPUS:-$(nproc)}
stress-ng --cpu "$cpus" --quiet &
hog=$!
trap 'kill "$hog" 2>/dev/null; wait "$hog" 2>/dev/null || true' EXIT
echo "running '$*' beside stress-ng --cpu $cpus (pid $hog)"
"$@"
