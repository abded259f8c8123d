"""After `make run`: record the run's artifacts in DVC and the DVC hashes in MLflow.

The assets write exactly the outputs the DVC stages declare (same library functions, same paths), so
``dvc commit -f`` pins them in dvc.lock as if ``dvc repro`` had run, and ``dvc status`` is clean. The
lock's hashes are then logged to every MLflow run of the Dagster run (params ``dvc.<stage>.<path>`` and
the file itself), so an MLflow run names the exact data and weights to ``dvc checkout``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from mixsp_core.paths import REPO_ROOT

BIN = Path(sys.executable).parent


def dvc_env() -> dict[str, str]:
    """The environment DVC stages need: the venv's ``mixsp`` and ``dvc`` first on PATH."""
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "DVC_NO_ANALYTICS": "1"}


def dvc(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``dvc ARGS`` in the repository (the venv's dvc)."""
    exe = BIN / "dvc" if (BIN / "dvc").exists() else "dvc"
    return subprocess.run([str(exe), *args], cwd=REPO_ROOT, env=dvc_env(), capture_output=True, text=True,
                          check=check, timeout=1800)


def commit_all() -> str:
    """``dvc commit -f`` every stage (outputs into the cache, hashes into dvc.lock); returns ``dvc status``."""
    dvc("commit", "-f")
    return dvc("status").stdout.strip()


def lock_hashes(lock: Path = REPO_ROOT / "dvc.lock") -> dict[str, str]:
    """``{"dvc.<stage>.<path>": md5}`` of every output in dvc.lock."""
    data: dict[str, Any] = yaml.safe_load(lock.read_text()) or {}
    hashes = {}
    for stage, entry in (data.get("stages") or {}).items():
        for out in entry.get("outs") or []:
            hashes[f"dvc.{stage}.{out['path']}"] = str(out.get("md5", ""))
    return hashes


def log_to_mlflow(tracking_uri: str, dagster_run_id: str, lock: Path = REPO_ROOT / "dvc.lock") -> list[str]:
    """Log dvc.lock (artifact) and its output hashes (params) to each MLflow run tagged with
    ``dagster_run_id``; returns the MLflow run ids."""
    from mlflow import MlflowClient
    from mlflow.entities import Param

    client = MlflowClient(tracking_uri=tracking_uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, filter_string=f"tags.`dagster.run_id` = '{dagster_run_id}'")
    hashes = lock_hashes(lock)
    for run in runs:
        params = [Param(k, v) for k, v in hashes.items() if k not in run.data.params]
        for start in range(0, len(params), 100):
            client.log_batch(run.info.run_id, params=params[start:start + 100])
        client.log_artifact(run.info.run_id, str(lock), artifact_path="dvc")
    return [run.info.run_id for run in runs]
