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


def params_for_run(data_root: str | Path | None = None, **sections: dict[str, Any]) -> Params:
    """params.yaml with this run's values: the resource's data root and the assets' config values
    (``train={...}``) over the file's, so the stage functions see what the launchpad set."""
    import dataclasses

    params = pipeline_params()
    data = params.data if data_root is None else dataclasses.replace(params.data, root=str(data_root))
    # Fields an asset's config does not expose keep their params.yaml values.
    extra = {**params.extra, **{name: {**(params.extra.get(name) or {}), **values} for name, values in sections.items()}}
    return dataclasses.replace(params, data=data, extra=extra)


def stage_section(name: str) -> Any:
    """A typed later-stage section of params.yaml (``train``, ``compress``, ...) with its defaults."""
    from mixsp_core.stage_params import stage_params

    return getattr(stage_params(pipeline_params().extra, params_file()), name)
