"""A thin experiment tracker for training runs: MLflow when wanted, an in-memory recorder otherwise.

``train.run_training`` only calls the :class:`Tracker` methods below, so tests pass a
:class:`NullTracker` and never touch MLflow. :class:`MLflowTracker` uses an explicit ``MlflowClient``
(no global "active run"), so several runs in one process (Dagster) do not interfere.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
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
    """``$MLFLOW_TRACKING_URI``, else a SQLite store ``mlflow.db`` in the working directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


class MLflowTracker:
    """One MLflow run. ``run_id`` continues an existing run (a resumed training); otherwise a new run
    named ``run_name`` is created in ``experiment`` (created when missing)."""

    def __init__(self, experiment: str = "mixsp", run_name: str | None = None, run_id: str | None = None,
                 uri: str | None = None, tags: dict[str, str] | None = None):
        from mlflow import MlflowClient

        self.uri = uri or tracking_uri()
        self.client = MlflowClient(tracking_uri=self.uri)
        if run_id is not None:
            self.run_id = self.client.get_run(run_id).info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            found = self.client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
            run = self.client.create_run(experiment_id, run_name=run_name, tags=tags or {})
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


def tracker_for_run(config, out_dir: str | Path) -> Tracker:
    """The tracker a training run should use: a :class:`NullTracker` when ``tracking.enabled`` is
    false or on a torchrun rank other than 0; the MLflow run recorded in
    ``out_dir/last/trainer_state.json`` when the run will resume from there; otherwise a new MLflow run
    named after the config."""
    from mixsp_core.distributed import is_main_process

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
            return MLflowTracker(run_id=run_id)
    return MLflowTracker(experiment=config.tracking.experiment, run_name=config.tracking.run_name or config.name)
