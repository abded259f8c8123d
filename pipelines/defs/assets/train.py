"""Train stage (group ``train``): one run of the configured student (params.yaml ``train``).

One MLflow run per materialisation (tagged with the Dagster run id and the git commit) records the
training curve; the asset's metadata carries the dev table, the plots and numeric dev metrics that
Dagster charts across materialisations.
"""

# No `from __future__ import annotations` here: Dagster reads the config class from the real annotation.

import dagster as dg

from mixsp_core.tracking.metrics import dev_metrics
from pipelines.defs.assets.prepare import sentence_corpus, sts_pairs
from pipelines.defs.assets.teacher import teacher_embeddings
from pipelines.defs.resources import MlflowResource, PathsResource
from pipelines.metadata import markdown_table, png_file_markdown


class StudentOverrides(dg.Config):
    """``KEY=VALUE`` strings over params.yaml's ``student`` training config for this run only, e.g.
    ``train.max_steps=50`` or ``loss.distill_sim=10``; ``config_file``: train a recipe of configs/ (e.g.
    ``configs/bi_simcse_2tier.yaml``) as the student instead (the overrides then apply to it)."""

    overrides: list[str] = []
    config_file: str = ""


def student_metadata(result, run) -> dict:
    """Dev table, numeric dev metrics, plots and paths of a finished TrainResult."""
    metrics = result.best_metrics
    rows = [[name, float(value)] for name, value in metrics.items()]
    meta = {
        **dev_metrics(metrics),  # dev/STSBenchmark, dev/SICK, dev/mean: the names the MLflow runs use
        "dev_table": dg.MetadataValue.md(markdown_table(["dev set", "Spearman x100"], rows)),
        "best_step": int(result.best_step),
        "steps": int(result.steps),
        "train_seconds": round(float(result.train_seconds), 1),
        "snapshots": len(run.snapshot_dirs()),
        "path": dg.MetadataValue.path(str(run.root)),
        "mlflow_run_id": str(result.run_id or ""),
    }
    for plot in sorted(run.plots.glob("*.png")):
        meta[f"plot/{plot.stem}"] = png_file_markdown(plot)
    return meta


@dg.asset(
    group_name="train",
    kinds={"pytorch", "mlflow"},
    deps=[sts_pairs, sentence_corpus, teacher_embeddings],
    description="The student: one training run of params.yaml's student config into data/models/student/ "
                "(best/, last/, snapshots/step-N/ for merging, metrics.json, plots/).",
)
def student(context: dg.AssetExecutionContext, config: StudentOverrides, paths: PathsResource,
            mlflow: MlflowResource) -> dg.MaterializeResult:
    from mixsp_core.stages.train import run_train

    params = paths.params()
    result = run_train(params, overrides=config.overrides, target=mlflow.target(context),
                       config_file=config.config_file or None)
    context.log.info(result.summary())
    context.log.info(f"MLflow run {result.run_id} ({mlflow.tracking_uri})")
    return dg.MaterializeResult(metadata=student_metadata(result, params.paths.student))
