"""Resources: where artifacts live (and on which device to compute), and the MLflow tracking store."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import dagster as dg

from mixsp_core.pipeline_config import REPO_ROOT, shared_dir
from pipelines.params import default_tracking_uri, pipeline_params, stage_section

if TYPE_CHECKING:
    import mlflow

    from mixsp_core.stages import PipelinePaths


class PathsResource(dg.ConfigurableResource):
    """Deterministic, DVC-tracked artifact locations and the compute device.

    ``data_root`` is relative to the repository root unless absolute (default: params.yaml data.root).
    ``device`` is ``auto`` (CUDA when available), ``cpu`` or ``cuda[:N]``.
    """

    data_root: str = pipeline_params().data.root
    shared_dir: str = str(shared_dir())
    device: str = pipeline_params().teacher.device

    def root(self) -> Path:
        root = Path(self.data_root)
        return root if root.is_absolute() else REPO_ROOT / root

    def pipeline_paths(self) -> "PipelinePaths":
        from mixsp_core.stages import PipelinePaths

        return PipelinePaths(self.root())

    def torch_device(self) -> str | None:
        """None lets the library pick (CUDA when available)."""
        return None if self.device == "auto" else self.device


def git_commit(repo: Path = REPO_ROOT) -> str:
    """The checked-out commit (read-only ``git rev-parse``); ``unknown`` outside a git checkout."""
    try:
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


class MlflowResource(dg.ConfigurableResource):
    """One MLflow run per training or evaluation materialisation, tagged with the Dagster run and git commit."""

    tracking_uri: str = default_tracking_uri()
    experiment: str = "mixsp"
    registered_model: str = stage_section("promote").registered_model

    def client(self) -> "mlflow.MlflowClient":
        import mlflow

        return mlflow.MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)

    def run_tags(self, context: dg.AssetExecutionContext | dg.OpExecutionContext) -> dict[str, str]:
        """Tags every MLflow run of this materialisation carries: the Dagster run, job and git commit."""
        tags = {
            "dagster.run_id": context.run_id,
            "dagster.job": context.job_name,
            "git.commit": git_commit(),
            "mlflow.source.git.commit": git_commit(),
        }
        if context.has_partition_key:
            tags["dagster.partition"] = context.partition_key
        return tags

    def ensure_experiment(self) -> str:
        """The experiment id; created with its artifacts beside a SQLite store (not in the cwd)."""
        from mixsp_core.pipeline_stages import default_artifact_location
        from mixsp_core.registry import ensure_experiment

        return ensure_experiment(self.client(), self.experiment, default_artifact_location(self.tracking_uri))

    def tracker(self, context: dg.AssetExecutionContext, run_name: str, tags: Mapping[str, str] | None = None):
        """A client-based training tracker (mixsp_core.tracking.MLflowTracker) on a new tagged run."""
        from mixsp_core.tracking import MLflowTracker

        self.ensure_experiment()
        tracker = MLflowTracker(experiment=self.experiment, run_name=run_name, uri=self.tracking_uri,
                                tags={**self.run_tags(context), **(tags or {})})
        context.log.info(f"MLflow run {tracker.run_id} ({self.tracking_uri}, experiment {self.experiment})")
        return tracker

    @contextmanager
    def start_run(self, context: dg.AssetExecutionContext | dg.OpExecutionContext, run_name: str,
                  tags: Mapping[str, str] | None = None) -> Iterator["mlflow.ActiveRun"]:
        """Open an MLflow run named ``run_name`` in the configured experiment; it ends (FAILED on error) on exit."""
        import mlflow

        mlflow.set_tracking_uri(self.tracking_uri)
        mlflow.set_registry_uri(self.tracking_uri)
        mlflow.set_experiment(experiment_id=self.ensure_experiment())
        all_tags = {**self.run_tags(context), **(tags or {})}
        with mlflow.start_run(run_name=run_name, tags=all_tags) as run:
            context.log.info(f"MLflow run {run.info.run_id} ({self.tracking_uri}, experiment {self.experiment})")
            yield run


class ModelGateResource(dg.ConfigurableResource):
    """The model checks' floor: dev primary metric (Spearman x100) a model must reach (params.yaml
    ``evaluate.min_dev_spearman``)."""

    min_dev_spearman: float = stage_section("evaluate").min_dev_spearman


@dg.definitions
def resources() -> dg.Definitions:
    return dg.Definitions(resources={"paths": PathsResource(), "mlflow": MlflowResource(),
                                     "model_gate": ModelGateResource()})
