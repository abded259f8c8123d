"""Teacher stage (group ``teacher``): the corpus encoded by the teacher, cached by sentence hash."""

# No `from __future__ import annotations` here: Dagster reads the config class from the real annotation.

import time

import dagster as dg

from pipelines.defs.assets.prepare import sentence_corpus
from pipelines.defs.resources import PathsResource
from pipelines.metadata import file_metadata
from pipelines.params import pipeline_params

_TEACHER = pipeline_params().teacher


class TeacherConfig(dg.Config):
    """The teacher model (params.yaml ``teacher``): a Hub id or a local HF folder."""

    model: str = _TEACHER.model
    batch_size: int = _TEACHER.batch_size


@dg.asset(
    group_name="teacher",
    kinds={"pytorch", "numpy"},
    deps=[sentence_corpus],
    description="Teacher embeddings of every corpus sentence under data/teacher/ (embeddings.npy + "
                "index.parquet keyed by sha256 of the text); only unseen sentences are encoded.",
)
def teacher_embeddings(context: dg.AssetExecutionContext, config: TeacherConfig,
                       paths: PathsResource) -> dg.MaterializeResult:
    from mixsp_core.stages import encode_teacher, read_corpus_file

    layout = paths.pipeline_paths()
    corpus = read_corpus_file(layout)
    started = time.perf_counter()
    embeddings, stats = encode_teacher(corpus, layout, config.model, batch_size=config.batch_size,
                                       device=paths.torch_device())
    seconds = time.perf_counter() - started
    context.log.info(f"teacher cache: {stats.encoded} sentences encoded, {stats.reused} reused ({seconds:.1f} s)")
    files = {}
    for name in ("embeddings.npy", "index.parquet"):
        if (layout.teacher / name).is_file():
            meta = file_metadata(layout.teacher / name)
            files.update({f"{name}/{key}": value for key, value in meta.items()})
    return dg.MaterializeResult(metadata={
        "model": config.model,
        "dagster/row_count": int(embeddings.shape[0]),
        "dim": int(embeddings.shape[1]),
        "encoded": int(stats.encoded),
        "reused": int(stats.reused),
        "seconds": round(seconds, 2),
        "path": dg.MetadataValue.path(str(layout.teacher)),
        **files,
    })
