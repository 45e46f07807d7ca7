# The front door: `make run` and `make test` are all a new machine needs.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PORT ?= 8000
WORKERS ?= 1
REPLICAS ?= 0
T ?= tests
PYTEST_ARGS ?=
export PATH := $(CURDIR)/$(BIN):$(PATH)

.DEFAULT_GOAL := help

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): setup.cfg pyproject.toml .ci/constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade 'pip>=24'
	$(PY) -m pip install -q -c .ci/constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) ## create .venv and install the project with its dev tools

run: $(STAMP) ## the whole system: embedded PostgreSQL/Redis (unless URLs set), migrations, Procfile (WORKERS=K, REPLICAS=N)
	PORT=$(PORT) $(PY) -m shared.embedded up --persist --banner --replicas $(REPLICAS) -- \
		$(PY) -m shared.supervisor -f Procfile --scale worker=$(WORKERS)

test: $(STAMP) browser netns-tools ## lint, schema check and the test suite (T=path to narrow, PYTEST_ARGS=...)
	$(MAKE) --no-print-directory lint
	$(PY) -m shared.embedded up --run-dir .run/test -- $(MAKE) --no-print-directory check pytest

# The browser tests (tests/browser.py) render Flower and /docs in Debian's Chromium.
browser: ## install headless Chromium (Debian's package) if missing
	@command -v chromium >/dev/null || (apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium)

# The network-partition fault tests (tests/faults/test_network_partition.py) put processes
# in network namespaces (ip) and blackhole their links (nft): Debian's packages.
netns-tools: ## install ip and nft (Debian's iproute2, nftables) if missing, where we are root
	@command -v ip >/dev/null && command -v nft >/dev/null || [ "$$(id -u)" != 0 ] || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
		--no-install-recommends iproute2 nftables)

pytest: $(STAMP)
	$(BIN)/pytest $(T) $(PYTEST_ARGS)

lint: $(STAMP) ## ruff, ruff format --check, mypy, import contracts, session/send rules
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports
	@! grep -nE '\.(commit|rollback|close|begin)\(' -r shared --include=*.py | grep -vE 'shared/(embedded|processes|supervisor)\.py' \
		|| (echo "shared/ must not commit, roll back, close or begin sessions" && false)
	@! grep -n 'send_task' -r web shared --include=*.py | grep -v 'web/publish.py' \
		|| (echo "send_task belongs in web/publish.py (and the worker runtime) only" && false)

fmt: $(STAMP) ## format and fix what ruff can
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

migrate: $(STAMP) ## alembic upgrade head on DATABASE_URL
	$(BIN)/alembic upgrade head

revision: $(STAMP) ## autogenerate a migration: make revision m="what changed"
	$(BIN)/alembic revision --autogenerate -m "$(m)"

check: $(STAMP) ## a scratch database migrated to head must match the models (alembic check)
	$(PY) -m tests.schema_check

bench: $(STAMP) ## load harness: closed-loop, open-loop and mixed loads beside the straight design (bench/README.md)
	command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk)
	$(PY) -m bench.run $(BENCH_ARGS)

deploy-check: $(STAMP) ## rehearse docker-compose.yml on podman here: stand-in images, 3 workers, traffic, a worker SIGKILLed (KEEP=1 leaves it up)
	bash deploy/check.sh

clean: ## remove .venv and .run
	rm -rf $(VENV) .run

.PHONY: help install run test browser netns-tools pytest lint fmt migrate revision check bench deploy-check clean
