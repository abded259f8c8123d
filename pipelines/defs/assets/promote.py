"""Promote stage (group ``promote``): the evaluated best becomes a new version of the MLflow registry
model; the alias ``champion`` (and data/models/champion/) moves only when it beats the current champion
on the dev primary metric, else the version is tagged ``challenger``."""

# No `from __future__ import annotations` here: Dagster reads the config class from the real annotation.

import dagster as dg

from pipelines.defs.assets.evaluate import evaluation_report
from pipelines.defs.resources import MlflowResource, ModelGateResource, PathsResource, pipeline_params

_PROMOTE = pipeline_params().promote


class ChampionConfig(dg.Config):
    """The registry alias that marks the champion (params.yaml ``promote.alias``); the registered model
    name comes from the MLflow resource."""

    alias: str = _PROMOTE.alias


@dg.asset(
    group_name="promote",
    kinds={"mlflow"},
    deps=[evaluation_report],
    description="Registers the evaluated best as a version of the registry model; moves alias 'champion' "
                "and data/models/champion/ only when it beats the current champion on dev.",
)
def champion(context: dg.AssetExecutionContext, config: ChampionConfig, paths: PathsResource,
             mlflow: MlflowResource, model_gate: ModelGateResource) -> dg.MaterializeResult:
    from mixsp_core.stages.promote import run_promote

    params = paths.params(promote={"registered_model": mlflow.registered_model, "alias": config.alias,
                                   "experiment": mlflow.experiment})
    promotion = run_promote(params, target=mlflow.target(context), floor=model_gate.min_dev_spearman)
    context.log.info(promotion.summary())
    return dg.MaterializeResult(metadata={
        "registered_model": promotion.registered_model,
        "version": promotion.version,
        "promoted": promotion.promoted,
        "dev/mean": float(promotion.dev),
        "champion_version": promotion.champion_version,
        "champion_dev": float(promotion.champion_dev),
        "model": promotion.model_name,
        "verdict": promotion.summary(),
        "path": dg.MetadataValue.path(str(paths.pipeline_paths().champion)),
        "mlflow_run_id": promotion.promote_run_id,
        "training_run_id": promotion.run_id,  # the registered version's source run
    })
