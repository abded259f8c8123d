"""Compress stage (group ``compress``): post-hoc variants of the student (PCA, int8, ...), each saved
as a self-contained model under data/models/compressed/<variant>/."""

# No `from __future__ import annotations` here: Dagster reads the config class from the real annotation.

import dagster as dg

from pipelines.defs.assets.prepare import sentence_corpus
from pipelines.defs.assets.train import student
from pipelines.defs.resources import PathsResource, pipeline_params
from pipelines.metadata import markdown_table

_COMPRESS = pipeline_params().compress


class CompressConfig(dg.Config):
    """``variants``: transform specs (``pca:128``, ``int8``, ``pca:64+int8``); fitted on
    ``fit_sentences`` corpus sentences. Defaults: params.yaml ``compress``."""

    variants: list[str] = list(_COMPRESS.variants)
    fit_sentences: int = _COMPRESS.fit_sentences


@dg.asset(
    group_name="compress",
    kinds={"numpy", "safetensors"},
    deps=[student, sentence_corpus],
    description="Compressed variants of the student's best checkpoint (transforms fitted on the corpus), "
                "under data/models/compressed/.",
)
def compressed_variants(context: dg.AssetExecutionContext, config: CompressConfig,
                        paths: PathsResource) -> dg.MaterializeResult:
    from mixsp_core.stages.compress import run_compress

    params = paths.params(compress={"variants": config.variants, "fit_sentences": config.fit_sentences})
    result = run_compress(params)
    context.log.info(result.summary())
    rows = [[name, v["steps"], v["output_dim"], v["vector_type"], v["bytes_per_vector"]]
            for name, v in result.variants.items()]
    return dg.MaterializeResult(metadata={
        "variants": dg.MetadataValue.md(markdown_table(["variant", "steps", "dims", "vector", "bytes/vector"], rows)),
        "count": len(result.variants),
        "fit_sentences": result.fit_sentences,
        **{f"bytes_per_vector/{name}": int(v["bytes_per_vector"]) for name, v in result.variants.items()},
        "seconds": round(result.seconds, 1),
        "path": dg.MetadataValue.path(str(paths.pipeline_paths().compressed)),
    })
