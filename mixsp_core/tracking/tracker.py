"""A thin experiment tracker for training runs: MLflow when wanted, an in-memory recorder otherwise.

``train.run_training`` only calls the :class:`Tracker` methods below, so tests pass a
:class:`NullTracker` and never touch MLflow. :class:`MLflowTracker` uses an explicit ``MlflowClient``
(no global "active run"), so several runs in one process (Dagster) do not interfere.

Runs of one pipeline run are nested: :class:`RunTarget` keeps one *parent* run per pipeline run (keyed by
the Dagster run id, ``$MIXSP_PIPELINE_RUN``, a sweep, or, for a CLI / DVC chain, the key the training run
recorded in ``mlflow_run.json`` of its run directory) and tags each stage's run ``mlflow.parentRunId``. The
training run is found by ``tags.mixsp.stage = 'train'`` with ``tags.mixsp.pipeline_run`` (or
``tags.`dagster.run_id```) of the pipeline run, or by the run directory's ``mlflow_run.json``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import uuid
from pathlib import Path
from typing import Any, Protocol

from mixsp_core.paths import REPO_ROOT, latest_stage_state

log = logging.getLogger(__name__)

_PARAM_MAX = 6000  # MLflow's limit on a param value's length
PARENT_RUN_TAG = "mlflow.parentRunId"  # MLflow's own tag: the UI nests a run under this run id
PIPELINE_RUN_TAG = "mixsp.pipeline_run"  # the pipeline run (Dagster run id, chain or sweep key) a run belongs to
STAGE_TAG = "mixsp.stage"  # train / evaluate / promote, or "pipeline" on the parent run
PIPELINE_STAGE = "pipeline"
PIPELINE_RUN_ENV = "MIXSP_PIPELINE_RUN"  # set it to group CLI stages of one chain under one parent
TRAINING_RUN_FILE = "mlflow_run.json"  # in a training run directory: its MLflow run and pipeline run
_SAFE_KEY = re.compile(r"^[A-Za-z0-9_.:\-]{1,200}$")


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
    store of :func:`tracking_uri`, the git commit); the Dagster resource adds the Dagster run's tags and
    its run id as ``pipeline_run``, so both paths record the same runs.

    ``pipeline_run`` keys the parent run the stages' runs nest under (default ``$MIXSP_PIPELINE_RUN``; when
    neither is set, a training run starts a new chain and evaluate / promote join the chain of the training
    run they descend from); ``pipeline_name`` names the parent run when it is created."""

    def __init__(self, uri: str | None = None, tags: dict[str, str] | None = None,
                 pipeline_run: str | None = None, pipeline_name: str | None = None):
        self.uri = uri or tracking_uri()
        commit = git_commit()
        self.tags = {"git.commit": commit, "mlflow.source.git.commit": commit, **(tags or {})}
        self.pipeline_run = _safe_key(pipeline_run or os.environ.get(PIPELINE_RUN_ENV) or "") or None
        self.pipeline_name = pipeline_name
        self._parents: dict[tuple[str, str], str] = {}

    def client(self):
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)

    def tracker(self, experiment: str, run_name: str, tags: dict[str, str] | None = None,
                lineage: Path | None = None) -> MLflowTracker:
        """A new MLflow run ``run_name`` in ``experiment`` with this target's tags and ``tags``, nested under
        the pipeline run's parent (``lineage``: the training run directory the stage's models descend from,
        whose chain a CLI stage joins)."""
        return MLflowTracker(experiment=experiment, run_name=run_name, uri=self.uri,
                             tags={**self.tags, **self.nested_tags(experiment, lineage), **(tags or {})})

    def nested_tags(self, experiment: str, lineage: Path | None = None) -> dict[str, str]:
        """``mlflow.parentRunId`` (the pipeline run's parent run in ``experiment``, created on first use)
        and ``mixsp.pipeline_run`` for a new run of this pipeline run."""
        key = self.pipeline_key(lineage)
        return {PARENT_RUN_TAG: self.parent_run_id(experiment, key), PIPELINE_RUN_TAG: key}

    def pipeline_key(self, lineage: Path | None = None) -> str:
        """This pipeline run's key: the one given, else the chain of the training run in ``lineage``
        (its ``mlflow_run.json``), else a new chain; kept for the target's later stages."""
        if self.pipeline_run is None:
            record = read_training_run(lineage) if lineage is not None else {}
            self.pipeline_run = _safe_key(str(record.get("pipeline_run") or "")) or uuid.uuid4().hex
        return self.pipeline_run

    def parent_run_id(self, experiment: str, key: str) -> str:
        """The parent run of pipeline run ``key`` in ``experiment``: found by its tags or created (one per
        key even when two processes race: the older run wins, the younger is deleted); marked RUNNING while a
        stage runs (:meth:`MLflowTracker.finish` ends it)."""
        client = self.client()
        experiment_id = ensure_experiment(client, experiment)
        parent = self._parents.get((experiment_id, key)) or _find_parent(client, experiment_id, key)
        if parent is None:
            created = client.create_run(experiment_id, run_name=self.pipeline_name or f"pipeline {key[:12]}",
                                        tags={**self.tags, PIPELINE_RUN_TAG: key, STAGE_TAG: PIPELINE_STAGE})
            parent = _find_parent(client, experiment_id, key) or created.info.run_id
            if parent != created.info.run_id:
                client.delete_run(created.info.run_id)
        self._parents[(experiment_id, key)] = parent
        client.update_run(parent, status="RUNNING")
        return parent


def _find_parent(client, experiment_id: str, key: str) -> str | None:
    """The oldest parent run of pipeline run ``key``, or None."""
    runs = client.search_runs([experiment_id], max_results=1, order_by=["attributes.start_time ASC"],
                              filter_string=f"tags.`{PIPELINE_RUN_TAG}` = '{key}' "
                                            f"AND tags.`{STAGE_TAG}` = '{PIPELINE_STAGE}'")
    return runs[0].info.run_id if runs else None


def _safe_key(key: str) -> str:
    """``key`` when it can be quoted in an MLflow filter as is, else a digest of it."""
    if not key or _SAFE_KEY.match(key):
        return key
    from mixsp_core.io import sha256_text

    return f"key-{sha256_text(key)[:32]}"


def read_training_run(run_dir: Path | None) -> dict[str, Any]:
    """``mlflow_run.json`` of a training run directory (run id, experiment, pipeline run, parent); ``{}``
    when there is none or it is unreadable (the stage then records its runs without that lineage)."""
    if run_dir is None:
        return {}
    try:
        data = json.loads((Path(run_dir) / TRAINING_RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_training_run(run_dir: Path, tracker: Tracker) -> Path | None:
    """Record ``tracker``'s MLflow run in ``run_dir/mlflow_run.json`` (nothing for an untracked run), so the
    promote stage logs the chosen model into the run that trained it and later CLI stages join its chain."""
    if not isinstance(tracker, MLflowTracker) or not tracker.run_id:
        return None
    from mixsp_core.io import write_json_atomic

    return write_json_atomic(Path(run_dir) / TRAINING_RUN_FILE, {
        "run_id": tracker.run_id, "experiment_id": tracker.experiment_id, "pipeline_run": tracker.pipeline_run,
        "parent_run_id": tracker.parent_run_id, "tracking_uri": tracker.uri})


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
            run = self.client.get_run(run_id)
            self.client.update_run(run.info.run_id, status="RUNNING")
        else:
            run = self.client.create_run(ensure_experiment(self.client, experiment), run_name=run_name,
                                         tags=tags or {})
        self.run_id = run.info.run_id
        self.experiment_id = run.info.experiment_id
        self.parent_run_id: str | None = run.data.tags.get(PARENT_RUN_TAG)
        self.pipeline_run: str | None = run.data.tags.get(PIPELINE_RUN_TAG)
        if run_id is not None and self.parent_run_id:
            self.client.update_run(self.parent_run_id, status="RUNNING")  # a resumed stage reopens its parent

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        items = [Param(k, _param_value(v)) for k, v in params.items() if k not in existing]
        for start in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[start:start + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        log_metric_batch(self.client, self.run_id, metrics, step)

    def log_parent_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        """Log ``metrics`` to the parent (pipeline) run too, if this run has one: the pipeline run's
        result, comparable across pipeline runs."""
        if self.parent_run_id:
            log_metric_batch(self.client, self.parent_run_id, metrics, step)

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
        """End this run (and its parent run with the same status: the next stage reopens it)."""
        self.client.set_terminated(self.run_id, status=status)
        if self.parent_run_id:
            self.client.set_terminated(self.parent_run_id, status=status)


def log_metric_batch(client, run_id: str, metrics: dict[str, float], step: int) -> None:
    """Log ``metrics`` (None values skipped) to run ``run_id`` at ``step``, in one request."""
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
    if items:
        client.log_batch(run_id, metrics=items)


def _param_value(value: Any) -> str:
    text = str(value)
    return text if len(text) <= _PARAM_MAX else text[: _PARAM_MAX - 3] + "..."


def tracker_for_run(config, out_dir: str | Path, tags: dict[str, str] | None = None,
                    uri: str | None = None, target: RunTarget | None = None) -> Tracker:
    """The tracker a training run should use: a :class:`NullTracker` when ``tracking.enabled`` is
    false or on a torchrun rank other than 0; the MLflow run recorded in
    ``out_dir/last/trainer_state.json`` when the run will resume from there; otherwise a new MLflow run
    named after the config (with ``target``: in its store, with its tags, nested under its pipeline run)."""
    from mixsp_core.training.distributed import is_main_process

    if not config.tracking.enabled or not is_main_process():  # under torchrun only rank 0 records
        return NullTracker()
    uri = uri or (target.uri if target is not None else None)
    run_id = resumed_run_id(config, out_dir)
    if run_id and _run_exists(run_id, uri):
        return MLflowTracker(run_id=run_id, uri=uri)
    if run_id:  # the store moved or was reset since the run started: the training resumes, in a new run
        log.warning("MLflow run %s of the resumed training %s is not in the tracking store %s: the rest of the "
                    "run is recorded in a new MLflow run (tag mixsp.resumed_from_run)", run_id, out_dir,
                    uri or tracking_uri())
        tags = {**(tags or {}), "mixsp.resumed_from_run": run_id}
    if target is not None:
        tags = {**target.tags, **target.nested_tags(config.tracking.experiment), **(tags or {})}
    return MLflowTracker(experiment=config.tracking.experiment, run_name=config.tracking.run_name or config.name,
                         uri=uri, tags=tags)


def _run_exists(run_id: str, uri: str | None) -> bool:
    """Whether the tracking store at ``uri`` holds the run ``run_id``."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    store = uri or tracking_uri()
    try:
        MlflowClient(tracking_uri=store, registry_uri=store).get_run(run_id)
    except MlflowException:
        return False
    return True


def resumed_run_id(config, out_dir: str | Path) -> str | None:
    """The MLflow run of ``out_dir/last/trainer_state.json`` when the run will resume from there, else None."""
    state_file = Path(out_dir) / "last" / "trainer_state.json"
    if getattr(config, "stages", None):  # a multi-stage run continues from its latest stage's state
        state_file = latest_stage_state(config, out_dir) or state_file
    if not (config.train.resume and state_file.is_file()):
        return None
    try:
        return json.loads(state_file.read_text(encoding="utf-8")).get("tracking_run_id") or None
    except (OSError, ValueError, AttributeError):
        return None  # run_training reports the broken file itself
