"""The pipeline's view of params.yaml: the one config that Dagster, the `mixsp` CLI and DVC all read.

Dagster config classes take their defaults from here, so the launchpad shows the values DVC runs with.
``MIXSP_PARAMS`` points at another file (tests use it); the default is ``params.yaml`` in the repository.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

from mixsp_core.pipeline_config import REPO_ROOT, Params, load_params

DEFAULT_PARAMS_FILE = REPO_ROOT / "params.yaml"


def params_file() -> Path:
    """The params file in force: ``$MIXSP_PARAMS`` when set, else the repository's params.yaml."""
    return Path(os.environ.get("MIXSP_PARAMS", DEFAULT_PARAMS_FILE))


@functools.cache
def pipeline_params() -> Params:
    """params.yaml parsed once per process (raises ConfigError naming the bad field)."""
    return load_params(params_file())


def section(name: str) -> dict[str, Any]:
    """A raw section owned by a later stage (train, compress, merge, evaluate, promote); {} when absent."""
    raw = pipeline_params().extra.get(name) or {}
    if not isinstance(raw, dict):
        from mixsp_core.errors import ConfigError

        raise ConfigError(name, f"must be a mapping in {params_file()}, got {type(raw).__name__}")
    return raw


def default_tracking_uri() -> str:
    """MLflow store: ``$MLFLOW_TRACKING_URI`` (the Makefile sets it), else SQLite in the repository root."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{REPO_ROOT / 'mlflow.db'}"
