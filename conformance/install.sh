#!/usr/bin/env bash
# Installs the real servers `make conformance` runs against, each into its own virtualenv under
# FLEET_CONFORMANCE_CACHE (default ~/.cache/fleet-conformance), outside the clone, so a second run
# starts in seconds. Each install_<server>.sh is idempotent: it returns at once when its stamp exists.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
export FLEET_CONFORMANCE_CACHE=${FLEET_CONFORMANCE_CACHE:-$HOME/.cache/fleet-conformance}
mkdir -p "$FLEET_CONFORMANCE_CACHE"
shopt -s nullglob
for script in "$here"/install_*.sh; do
  bash "$script"
done
