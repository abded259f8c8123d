"""A thin experiment tracker for training runs: MLflow when wanted, an in-memory recorder otherwise.

``train.run_training`` only calls the :class:`Tracker` methods below, so tests pass a
:class:`NullTracker` and never touch MLflow. :class:`MLflowTracker` uses an explicit ``MlflowClient``
(no global "active run"), so several runs in one process (Dagster) do not interfere.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol

from mixsp_core.paths import REPO_ROOT

_PARAM_MAX = 6000  # MLflow's limit on a param value's length


class Tracker(Protocol):
    run_id: str | None

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def finish(self, status: str = "FINISHED") -> None: ...


class NullTracker:
    """Logs nothing anywhere; keeps what it was given in memory (handy in tests)."""

    def __init__(self) -> None:
        self.run_id: str | None = None
        self.params: dict[str, Any] = {}
        self.metrics: list[tuple[int, dict[str, float]]] = []
        self.artifacts: list[tuple[str, str | None]] = []
        self.tags: dict[str, str] = {}
        self.status: str | None = None

    def log_params(self, params: dict[str, Any]) -> None:
        self.params.update(params)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.metrics.append((step, dict(metrics)))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.artifacts.append((str(path), artifact_path))

    def set_tags(self, tags: dict[str, str]) -> None:
        self.tags.update(tags)

    def finish(self, status: str = "FINISHED") -> None:
        self.status = status

    def series(self, key: str) -> list[tuple[int, float]]:
        """``[(step, value), ...]`` of one metric."""
        return [(step, m[key]) for step, m in self.metrics if key in m]


def tracking_uri() -> str:
    """The MLflow store: ``$MLFLOW_TRACKING_URI`` (the Makefile sets it), else SQLite ``mlflow.db`` in the
    repository root. The one place the URI is resolved."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{REPO_ROOT / 'mlflow.db'}"


def default_artifact_location(uri: str) -> str | None:
    """Artifacts of a SQLite store go to ``mlartifacts/`` beside the database file (not the cwd)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri()
    return None


def ensure_experiment(client, name: str, artifact_location: str | None = None) -> str:
    """The id of experiment ``name``, created when missing: its artifacts at ``artifact_location``, by
    default beside the client's SQLite store."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = artifact_location or default_artifact_location(client.tracking_uri)
    return client.create_experiment(name, artifact_location=location)


class RunTarget:
    """Where a stage records its MLflow runs and with which tags: the CLI and DVC use the defaults (the
    store of :func:`tracking_uri`, the git commit); the Dagster resource adds the Dagster run's tags, so
    both paths record the same runs."""

    def __init__(self, uri: str | None = None, tags: dict[str, str] | None = None):
        self.uri = uri or tracking_uri()
        commit = git_commit()
        self.tags = {"git.commit": commit, "mlflow.source.git.commit": commit, **(tags or {})}

    def client(self):
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)

    def tracker(self, experiment: str, run_name: str, tags: dict[str, str] | None = None) -> "MLflowTracker":
        """A new MLflow run ``run_name`` in ``experiment`` with this target's tags and ``tags``."""
        return MLflowTracker(experiment=experiment, run_name=run_name, uri=self.uri, tags={**self.tags, **(tags or {})})


def git_commit(repo: Path = REPO_ROOT) -> str:
    """The checked-out commit (read-only ``git rev-parse``); ``unknown`` outside a git checkout."""
    import subprocess

    try:
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


class MLflowTracker:
    """One MLflow run. ``run_id`` continues an existing run (a resumed training); otherwise a new run
    named ``run_name`` is created in ``experiment`` (created when missing)."""

    def __init__(self, experiment: str = "mixsp", run_name: str | None = None, run_id: str | None = None,
                 uri: str | None = None, tags: dict[str, str] | None = None):
        from mlflow import MlflowClient

        self.uri = uri or tracking_uri()
        self.client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        if run_id is not None:
            self.run_id = self.client.get_run(run_id).info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            run = self.client.create_run(ensure_experiment(self.client, experiment), run_name=run_name,
                                         tags=tags or {})
            self.run_id = run.info.run_id

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        items = [Param(k, _param_value(v)) for k, v in params.items() if k not in existing]
        for start in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[start:start + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
        if items:
            self.client.log_batch(self.run_id, metrics=items)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path=artifact_path or path.name)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path=artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


def _param_value(value: Any) -> str:
    text = str(value)
    return text if len(text) <= _PARAM_MAX else text[: _PARAM_MAX - 3] + "..."


def tracker_for_run(config, out_dir: str | Path, tags: dict[str, str] | None = None,
                    uri: str | None = None) -> Tracker:
    """The tracker a training run should use: a :class:`NullTracker` when ``tracking.enabled`` is
    false or on a torchrun rank other than 0; the MLflow run recorded in
    ``out_dir/last/trainer_state.json`` when the run will resume from there; otherwise a new MLflow run
    named after the config."""
    from mixsp_core.training.distributed import is_main_process

    if not config.tracking.enabled or not is_main_process():  # under torchrun only rank 0 records
        return NullTracker()
    state_file = Path(out_dir) / "last" / "trainer_state.json"
    if config.train.resume and state_file.is_file():
        import json

        try:
            run_id = json.loads(state_file.read_text(encoding="utf-8")).get("tracking_run_id")
        except (OSError, ValueError):
            run_id = None  # run_training reports the broken file itself
        if run_id:
            return MLflowTracker(run_id=run_id, uri=uri)
    return MLflowTracker(experiment=config.tracking.experiment, run_name=config.tracking.run_name or config.name,
                         uri=uri, tags=tags)
