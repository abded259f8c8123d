"""Resources: the typed params (params.yaml) with where artifacts live and on which device, and the MLflow
store the library's stages record their runs in."""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dagster as dg

from mixsp_core.params import PARAMS_FILE, Params, load_params
from mixsp_core.paths import in_repo, shared_dir
from mixsp_core.tracking.tracker import RunTarget, tracking_uri
from mixsp_core.training.config import check_finite

if TYPE_CHECKING:
    from mixsp_core.paths import PipelinePaths


def params_file() -> Path:
    """The params file in force: ``$MIXSP_PARAMS`` when set (tests), else the repository's params.yaml."""
    return Path(os.environ.get("MIXSP_PARAMS", PARAMS_FILE))


@functools.cache
def pipeline_params() -> Params:
    """params.yaml parsed once per process; the Dagster config classes take their defaults from it, so the
    launchpad shows the values DVC runs with."""
    return load_params(params_file())


class PathsResource(dg.ConfigurableResource):
    """Deterministic, DVC-tracked artifact locations and the compute device.

    ``data_root`` is relative to the repository root unless absolute (default: params.yaml data.root).
    ``device`` is ``auto`` (CUDA when available), ``cpu`` or ``cuda[:N]``.
    """

    data_root: str = pipeline_params().data.root
    shared_dir: str = str(shared_dir())
    device: str = pipeline_params().teacher.device

    def root(self) -> Path:
        return in_repo(self.data_root)

    def pipeline_paths(self) -> "PipelinePaths":
        return self.params().paths

    def torch_device(self) -> str | None:
        """None lets the library pick (CUDA when available)."""
        return None if self.device == "auto" else self.device

    def params(self, **sections: dict[str, Any]) -> Params:
        """params.yaml with this resource's data root and device, and an asset's config values over the
        file's section (``compress={"variants": [...]}``), so the stage sees what the launchpad set."""
        params = pipeline_params().with_data_root(self.root())
        params = dataclasses.replace(params, teacher=dataclasses.replace(params.teacher, device=self.device))
        replaced = {name: dataclasses.replace(getattr(params, name), **values) for name, values in sections.items()}
        for name, section in replaced.items():  # launchpad values get the checks params.yaml's values got
            check_finite(section, name)
            section.validate()
        return dataclasses.replace(params, **replaced)


class MlflowResource(dg.ConfigurableResource):
    """The MLflow store the stages record their runs in, each tagged with the Dagster run and git commit."""

    tracking_uri: str = tracking_uri()
    experiment: str = pipeline_params().promote.experiment
    registered_model: str = pipeline_params().promote.registered_model

    def target(self, context: dg.AssetExecutionContext | dg.OpExecutionContext) -> RunTarget:
        """Where and with which tags the library's stages record this materialisation's MLflow runs: nested
        under one parent run per Dagster run (keyed by the run id, created by the first stage that records)."""
        tags = {"dagster.run_id": context.run_id, "dagster.job": context.job_name}
        if context.has_partition_key:
            tags["dagster.partition"] = context.partition_key
        return RunTarget(uri=self.tracking_uri, tags=tags, pipeline_run=context.run_id,
                         pipeline_name=f"dagster {context.job_name} {context.run_id[:8]}")


class ModelGateResource(dg.ConfigurableResource):
    """The model checks' floor: dev mean Spearman x100 a model must reach (params.yaml
    ``evaluate.min_dev_spearman``)."""

    min_dev_spearman: float = pipeline_params().evaluate.min_dev_spearman


@dg.definitions
def resources() -> dg.Definitions:
    return dg.Definitions(resources={"paths": PathsResource(), "mlflow": MlflowResource(),
                                     "model_gate": ModelGateResource()})
