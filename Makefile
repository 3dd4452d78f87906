# medcnn: `make run` (whole pipeline), `make verify`, `make exps`, `make test`, `make docs`, `make ui`,
# `make mlflow-server`. Everything runs inside .venv, created and filled from requirements.lock by
# `make setup` (idempotent; instant when the lock and pyproject.toml are unchanged).

PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed
# This project's machines carry the CPU build of torch in /opt/wheels; elsewhere pip's index is used.
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
export PATH := $(BIN):$(PATH)
export DVC_NO_ANALYTICS := 1

.PHONY: setup run verify exps tune test test-fast docs docs-serve ui mlflow-server mlflow-server-stop lock clean

setup: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check $(FIND_LINKS) --no-deps -r requirements.lock
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	@touch $(STAMP)

run: setup
	dvc repro
	python -m pipeline.summary

# Rerun the committed pipeline in a temporary copy and compare every output with dvc.lock.
verify: setup
	python -m pipeline.verify

# DVC experiments in 120 columns: the params that differ between them and the headline test metrics
# (dvc exp show drops every column but params and those; --only-changed drops the params that agree).
exps: setup
	dvc exp show --only-changed --md --keep 'test\.(roc_auc|accuracy|sensitivity|specificity)$$' --drop '^(?!(Experiment|seed|data\.|balance\.|train\.|cv\.|evaluate\.|explain\.|report\.|track\.)).*|train\.(best_epoch|chance_loss|epochs_run|folds|improved_after_first_epoch|left_chance|min_train_loss|parameters|per_fold\..*|val_.*|privacy\..*)|explain\.[a-z_]+\..*'

# A hyperparameter search on validation (python -m pipeline.tune); a team's study on the tracking
# server's PostgreSQL: make tune STORAGE="$$(scripts/mlflow-server.sh optuna-url)" WORKERS=2
tune: setup
	dvc repro prepare
	python -m pipeline.tune $(if $(STORAGE),--storage "$(STORAGE)") --workers $(or $(WORKERS),1)

test: setup
	python -m pytest

test-fast: setup
	python -m pytest -m "not slow"

# The documentation site (docs/, mkdocs.yml) into site/: open site/index.html, no network needed.
docs: setup
	NO_MKDOCS_2_WARNING=1 mkdocs build --strict

docs-serve: setup
	NO_MKDOCS_2_WARNING=1 mkdocs serve

ui: setup
	@echo "MLflow UI: http://127.0.0.1:5000/#/experiments?workflowType=machine_learning (model training, not GenAI)"
	mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db

# A team's tracking server: PostgreSQL + `mlflow server` with proxied artifacts, on 127.0.0.1
# ($MLFLOW_PORT, default 5000), state in .mlflow-server/. Then: export MLFLOW_TRACKING_URI=http://127.0.0.1:5000
mlflow-server: setup
	scripts/mlflow-server.sh start

mlflow-server-stop:
	scripts/mlflow-server.sh stop

# Re-pin after changing dependencies in pyproject.toml (run in a fresh venv with torch==2.13.0).
lock:
	{ sed -n '1,3p' requirements.lock; $(BIN)/python -m pip freeze --all --exclude-editable \
	  | grep -v -E '^(pip|medcnn)==' | sed 's/+cpu$$//' | LC_ALL=C sort -f; } > requirements.lock.new
	mv requirements.lock.new requirements.lock

clean:
	rm -rf $(VENV)
