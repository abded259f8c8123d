"""After a pipeline run: pin its artifacts in DVC, push them to the remote, and record the lock in MLflow.

:func:`sync_run` is the one function both callers use: `make run` (pipelines/run.py) right after its run,
and the ``dvc_sync`` job that the ``dvc_sync_after_run`` sensor starts after every other successful
``mixsp_full`` run (launched from the UI, the weekly schedule or the source-data sensor;
pipelines/defs/dvc_sync_sensor.py). The assets write exactly the outputs the DVC stages declare (same
library functions, same paths), so ``dvc commit -f`` pins them in dvc.lock as if ``dvc repro`` had run and
``dvc status`` is clean; ``dvc push`` copies them to the remote (so `mixsp restore` can bring the run back
on any clone); dvc.lock, params.yaml and each output's hash (tags ``dvc.<stage>.<path>``) go to the
Dagster run's MLflow training run, which thereby names the exact data and weights it produced.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mixsp_core.errors import HistoryError
from mixsp_core.paths import REPO_ROOT
from mixsp_core.tracking.dvc_history import (
    ARTIFACT_DIR,
    LOCK_FILE,
    PARAMS_FILE,
    commit_outputs,
    configured_remote,
    lock_tags,
    push_outputs,
    uncommitted_files,
)

# Run tag: "inline" when the launcher syncs the run itself (make run), "off" when it must not be synced
# (make run --no-dvc); the sensor leaves such runs alone.
SYNC_TAG = "mixsp/dvc-sync"
TRAINING_STAGE = "train"  # the ``mixsp.stage`` tag of the training run the lock is logged to


@dataclass
class SyncReport:
    """What :func:`sync_run` did: ``skipped`` (why nothing was done) or the DVC status after the commit,
    the push summary, the MLflow runs the lock went to, and ``errors`` (empty when all went well)."""

    skipped: str | None = None
    committed: bool = False
    status: str = ""
    remote: str | None = None
    pushed: str | None = None
    mlflow_runs: list[str] = field(default_factory=list)
    uncommitted: list[str] = field(default_factory=list)  # of dvc.lock / params.yaml, versus git HEAD
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def lines(self) -> list[str]:
        if self.skipped:
            return [f"DVC: skipped ({self.skipped})"]
        lines = [f"DVC: dvc.lock updated; `dvc status`: {self.status or 'clean'}"] if self.committed else []
        if self.pushed is not None:
            lines.append(f"DVC: pushed to remote {self.remote}: {self.pushed}")
        elif self.remote is None and self.ok:
            lines.append("DVC: no remote (MIXSP_DVC_REMOTE=none or none configured): outputs only in the local cache")
        if self.mlflow_runs:
            lines.append(f"DVC: dvc.lock and its hashes logged to MLflow training run {', '.join(self.mlflow_runs)}")
        lines += [f"DVC: error: {error}" for error in self.errors]
        return lines


def sync_run(dagster_run_id: str, tracking_uri: str, data_root: Path, repo: Path = REPO_ROOT) -> SyncReport:
    """``dvc commit``, log the lock to the MLflow training run of ``dagster_run_id``, ``dvc push``. Only when
    ``data_root`` (where the run wrote) is the repository's ``data/``, the paths dvc.yaml names; otherwise
    nothing is done (``skipped``). A step that fails is reported in ``errors`` (the later steps still run
    when they can: the hashes are logged even when the push fails)."""
    if Path(data_root).resolve() != (repo / "data").resolve():
        return SyncReport(skipped=f"data root {data_root} is not the repository's data/, which dvc.yaml names")
    report = SyncReport()
    try:
        report.status = commit_outputs(repo)
        report.committed = True
    except HistoryError as err:
        report.errors.append(str(err))
        return report
    try:
        report.mlflow_runs = log_lock_to_mlflow(tracking_uri, dagster_run_id, repo)
        if not report.mlflow_runs:
            report.errors.append(f"no MLflow run tagged dagster.run_id={dagster_run_id} and "
                                 f"mixsp.stage={TRAINING_STAGE} in {tracking_uri}: the lock is not logged")
    except Exception as err:  # an MLflow store problem must not lose the push
        report.errors.append(f"logging dvc.lock to MLflow failed: {err}")
    try:
        remote = configured_remote(repo)
        if remote is not None:
            report.remote = f"{remote.name} ({remote.url})"
            report.pushed = push_outputs(remote, repo)
    except HistoryError as err:
        report.errors.append(str(err))
    report.uncommitted = uncommitted_files(repo)
    return report


def training_runs(tracking_uri: str, dagster_run_id: str) -> list[str]:
    """Ids of the MLflow training runs (tag ``mixsp.stage=train``) of the Dagster run ``dagster_run_id``."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    found = client.search_runs(experiments, filter_string=f"tags.`dagster.run_id` = '{dagster_run_id}' and "
                                                          f"tags.`mixsp.stage` = '{TRAINING_STAGE}'")
    return [run.info.run_id for run in found]


def log_lock_to_mlflow(tracking_uri: str, dagster_run_id: str, repo: Path = REPO_ROOT) -> list[str]:
    """Log dvc.lock and params.yaml (artifacts under ``dvc/``) and each output's md5 (tags
    ``dvc.<stage>.<path>``, and ``dvc.lock_sha256``) to the training run of ``dagster_run_id``; returns the
    run ids. Tags rather than params: hashes are not hyperparameters to compare, and a second sync of the
    same run (a re-run of the dvc_sync job) may overwrite them."""
    from mlflow import MlflowClient
    from mlflow.entities import RunTag

    client = MlflowClient(tracking_uri=tracking_uri)
    lock = repo / LOCK_FILE
    tags = [RunTag(key, value) for key, value in lock_tags(lock.read_text(encoding="utf-8")).items()]
    runs = training_runs(tracking_uri, dagster_run_id)
    for run_id in runs:
        for start in range(0, len(tags), 100):  # MLflow's batch limit
            client.log_batch(run_id, tags=tags[start:start + 100])
        client.log_artifact(run_id, str(lock), artifact_path=ARTIFACT_DIR)
        if (repo / PARAMS_FILE).is_file():
            client.log_artifact(run_id, str(repo / PARAMS_FILE), artifact_path=ARTIFACT_DIR)
    return runs


def commit_advice(report: SyncReport, mlflow_run: str | None) -> str:
    """What the user should do so the run stays restorable by git commit too (printed by `make run`)."""
    if report.skipped or not report.uncommitted:
        return ""
    files = " ".join(report.uncommitted)
    by_run = f" (until then `mixsp restore {mlflow_run}` brings it back by its MLflow run id)" if mlflow_run else ""
    return (f"{files} changed: commit them to record this run in git history{by_run}:\n"
            f"  git add {files} && git commit -m 'pipeline run: dvc.lock'")
