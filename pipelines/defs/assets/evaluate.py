"""Evaluate stage (group ``evaluate``): every variant on dev, the best picked, the grid of the best
full-precision model, the analyses of the best; data/reports/evaluation.{json,md,png}, grid.{json,md,png}
and analyses.{json,md}, analyses_prefix.png, analyses_transfer.png. One MLflow run per
materialisation holds the metrics and the report files."""

# No `from __future__ import annotations` here: Dagster reads the config class from the real annotation.

from pathlib import Path

import dagster as dg

from mixsp_core.tracking.metrics import DEV_MEAN, variant_dev_metrics, variant_prefix
from pipelines.defs.assets.compress import compressed_variants
from pipelines.defs.assets.merge import merged_model
from pipelines.defs.assets.prepare import sentence_corpus, sts_pairs
from pipelines.defs.assets.train import student
from pipelines.defs.resources import MlflowResource, PathsResource, pipeline_params
from pipelines.metadata import file_metadata, png_file_markdown

_EVALUATE = pipeline_params().evaluate


class EvaluateConfig(dg.Config):
    """Grid cells of the best full-precision model (``grid_layers`` empty: full depth). Defaults:
    params.yaml ``evaluate``."""

    grid_layers: list[int] = list(_EVALUATE.grid_layers)
    grid_dims: list[int] = list(_EVALUATE.grid_dims)
    grid_vector_types: list[str] = list(_EVALUATE.grid_vector_types)
    grid_fit_sentences: int = _EVALUATE.grid_fit_sentences
    # analyses of the best variant (prefix Spearman, geometry, whitening x transfer)
    analyses: bool = _EVALUATE.analyses
    analyses_sentences: int = _EVALUATE.analyses_sentences
    transfer_max_sentences: int = _EVALUATE.transfer_max_sentences


@dg.asset(
    group_name="evaluate",
    kinds={"mlflow", "json"},
    deps=[student, compressed_variants, merged_model, sts_pairs, sentence_corpus],
    description="Every variant (student, compressed, merged) on the dev sets; the best by the dev primary "
                "metric; the evaluation grid; the analyses of the best (prefixes, geometry, whitening x transfer). "
                "data/reports/evaluation.json/.md/.png, grid.*, analyses*",
)
def evaluation_report(context: dg.AssetExecutionContext, config: EvaluateConfig, paths: PathsResource,
                      mlflow: MlflowResource) -> dg.MaterializeResult:
    from mixsp_core.stages.evaluate import run_evaluate

    params = paths.params(evaluate={
        "grid_layers": config.grid_layers, "grid_dims": config.grid_dims,
        "grid_vector_types": config.grid_vector_types, "grid_fit_sentences": config.grid_fit_sentences,
        "analyses": config.analyses, "analyses_sentences": config.analyses_sentences,
        "transfer_max_sentences": config.transfer_max_sentences})
    report = run_evaluate(params, target=mlflow.target(context))
    reports = params.paths.reports
    meta = {
        "best": report["best"],
        # the names the MLflow runs use: the chosen variant's dev/..., every variant's variant/<name>/dev/mean
        **variant_dev_metrics(report["variants"][report["best"]], report["dev_sets"]),
        **{f"{variant_prefix(name)}{DEV_MEAN}": float(value) for name, value in report["dev"].items()},
        "report": dg.MetadataValue.md(Path(reports / "evaluation.md").read_text()),
        "plot": png_file_markdown(reports / "evaluation.png"),
        "grid": dg.MetadataValue.md((reports / "grid.md").read_text()),
        "grid_plot": png_file_markdown(reports / "grid.png"),
        "mlflow_run_id": report["mlflow_run_id"],
        **file_metadata(params.paths.evaluation),
    }
    if report.get("analyses"):
        from mixsp_core.evaluate.analyses import analyses_markdown, analyses_metrics

        metrics = analyses_metrics(report["analyses"])
        meta.update({
            "analyses": dg.MetadataValue.md(analyses_markdown(report["analyses"])),
            "analyses_prefix_plot": png_file_markdown(reports / "analyses_prefix.png"),
            "analyses_transfer_plot": png_file_markdown(reports / "analyses_transfer.png"),
            # the headline numbers; the full set is in the MLflow run and analyses.json
            **{k: v for k, v in metrics.items() if k.startswith("analyses/geometry/") or k.endswith("/mean")
               or (k.endswith("/dev") and "/prefix/" not in k)},
        })
    return dg.MaterializeResult(metadata=meta)
