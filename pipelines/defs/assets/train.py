"""Train stage (group ``train``): one run of the configured student (params.yaml ``train``).

One MLflow run per materialisation (tagged with the Dagster run id and the git commit) records the
training curve; the asset's metadata carries the dev table, the plots and numeric dev metrics that
Dagster charts across materialisations.
"""

# No `from __future__ import annotations` here: Dagster reads the config class from the real annotation.

import dagster as dg

from pipelines.defs.assets.prepare import sentence_corpus, sts_pairs
from pipelines.defs.assets.teacher import teacher_embeddings
from pipelines.defs.resources import MlflowResource, PathsResource
from pipelines.metadata import markdown_table, png_file_markdown
from pipelines.params import params_for_run, stage_section

_TRAIN = stage_section("train")


class StudentConfig(dg.Config):
    """``config``: a training config file (configs/*.yaml); ``overrides``: ``KEY=VALUE`` strings on top
    of it (``train.max_steps=50``). Defaults: params.yaml ``train``."""

    config: str = _TRAIN.config
    overrides: list[str] = list(_TRAIN.overrides)


def student_metadata(result, out) -> dict:
    """Dev table, numeric dev metrics, plots and paths of a finished TrainResult."""
    metrics = result.best_metrics
    rows = [[name, float(value)] for name, value in metrics.items()]
    meta = {
        "dev_primary": float(metrics["primary"]),
        **{f"dev/{name}": float(v) for name, v in metrics.items() if name != "primary"},
        "dev_table": dg.MetadataValue.md(markdown_table(["dev set", "Spearman x100"], rows)),
        "best_step": int(result.best_step),
        "steps": int(result.steps),
        "train_seconds": round(float(result.train_seconds), 1),
        "snapshots": len(list((out / "snapshots").glob("step-*"))) if (out / "snapshots").is_dir() else 0,
        "path": dg.MetadataValue.path(str(out)),
        "mlflow_run_id": str(result.run_id or ""),
    }
    for plot in sorted((out / "plots").glob("*.png")):
        meta[f"plot/{plot.stem}"] = png_file_markdown(plot)
    return meta


@dg.asset(
    group_name="train",
    kinds={"pytorch", "mlflow"},
    deps=[sts_pairs, sentence_corpus, teacher_embeddings],
    description="The student: one training run of params.yaml train.config into data/models/student/ "
                "(best/, last/, snapshots/step-N/ for merging, metrics.json, plots/).",
)
def student(context: dg.AssetExecutionContext, config: StudentConfig, paths: PathsResource,
            mlflow: MlflowResource) -> dg.MaterializeResult:
    from mixsp_core.stages import run_student, student_config

    params = params_for_run(paths.root(), train={"config": config.config, "overrides": config.overrides})
    run_config = student_config(params)
    tracker = mlflow.tracker(context, run_name=f"train {run_config.name}",
                             tags={"mixsp.stage": "train", "mixsp.config": config.config})
    result = run_student(params, tracker=tracker)
    context.log.info(result.summary())
    return dg.MaterializeResult(metadata=student_metadata(result, paths.pipeline_paths().student))
