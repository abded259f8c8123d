"""Merge stage (group ``merge``): uniform soup, greedy soup and delta-guided fusion of the training
run's snapshots (start: the step-0 snapshot); the best on dev is kept as data/models/merged/model/."""

# No `from __future__ import annotations` here: Dagster reads the config class from the real annotation.

from pathlib import Path

import dagster as dg

from pipelines.defs.assets.compress import compressed_variants
from pipelines.defs.assets.prepare import sts_pairs
from pipelines.defs.assets.train import student
from pipelines.defs.resources import PathsResource, pipeline_params
from pipelines.metadata import markdown_table

_MERGE = pipeline_params().merge


class MergeConfig(dg.Config):
    """``methods``: subset of uniform, greedy, fusion; ``p``: fusion exponent. Defaults: params.yaml ``merge``."""

    methods: list[str] = list(_MERGE.methods)
    p: float = _MERGE.p


@dg.asset(
    group_name="merge",
    kinds={"pytorch", "safetensors"},
    # compressed_variants: not read, but the stages run in the order (compress, then merge).
    deps=[student, sts_pairs, compressed_variants],
    description="The run's snapshots merged (uniform / greedy soup, delta-guided fusion); the best on dev "
                "is kept under data/models/merged/model/, every method's score in merge.json.",
)
def merged_model(context: dg.AssetExecutionContext, config: MergeConfig, paths: PathsResource) -> dg.MaterializeResult:
    from mixsp_core.stages.merge import run_merge

    result = run_merge(paths.params(merge={"methods": config.methods, "p": config.p}))
    context.log.info(result.summary())
    rows = [[Path(name).name, "input", score] for name, score in result.inputs.items()]
    rows += [[method, "merge" + (" (kept)" if method == result.best_method else ""), score]
             for method, score in result.methods.items()]
    return dg.MaterializeResult(metadata={
        "best_method": result.best_method,
        "dev_primary": float(result.methods[result.best_method]),
        **{f"dev/{method}": float(score) for method, score in result.methods.items()},
        "inputs": len(result.inputs),
        "start": str(result.start),
        "dev_table": dg.MetadataValue.md(markdown_table(["checkpoint / method", "kind", "dev Spearman x100"], rows)),
        "path": dg.MetadataValue.path(str(result.path)),
    })
