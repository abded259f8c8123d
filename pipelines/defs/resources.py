"""Resources: where artifacts live (and on which device to compute), and the MLflow tracking store."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import dagster as dg

from mixsp_core.pipeline_config import REPO_ROOT, shared_dir
from pipelines.params import default_tracking_uri, pipeline_params

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
    registered_model: str = "mixsp-student"

    def client(self) -> "mlflow.MlflowClient":
        import mlflow

        return mlflow.MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)

    @contextmanager
    def start_run(self, context: dg.AssetExecutionContext | dg.OpExecutionContext, run_name: str,
                  tags: Mapping[str, str] | None = None) -> Iterator["mlflow.ActiveRun"]:
        """Open an MLflow run named ``run_name`` in the configured experiment; it ends (FAILED on error) on exit."""
        import mlflow

        mlflow.set_tracking_uri(self.tracking_uri)
        mlflow.set_registry_uri(self.tracking_uri)
        mlflow.set_experiment(self.experiment)
        all_tags = {
            "dagster.run_id": context.run_id,
            "dagster.job": context.job_name,
            "git.commit": git_commit(),
            "mlflow.source.git.commit": git_commit(),
        }
        if context.has_partition_key:
            all_tags["dagster.partition"] = context.partition_key
        all_tags.update(tags or {})
        with mlflow.start_run(run_name=run_name, tags=all_tags) as run:
            context.log.info(f"MLflow run {run.info.run_id} ({self.tracking_uri}, experiment {self.experiment})")
            yield run


@dg.definitions
def resources() -> dg.Definitions:
    return dg.Definitions(resources={"paths": PathsResource(), "mlflow": MlflowResource()})
