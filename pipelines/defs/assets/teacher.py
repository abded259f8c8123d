"""Teacher stage (group ``teacher``): the corpus encoded by the teacher, cached by sentence hash, in shards.

The sentences missing from the cache are split into ``teacher.shards`` shards (params.yaml) by sentence hash.
Each shard is its own asset, so its own step: the multiprocess executor (``make run``, runs launched from the
UI) encodes them side by side in separate processes, and the Celery executor (``MIXSP_EXECUTOR=celery``,
pipelines/defs/executors.py) runs each on a worker, on this or another machine. ``teacher_embeddings`` depends on every shard and merges them into the
one cache; shards not materialised yet (e.g. only ``teacher_embeddings`` selected) it encodes itself first.
"""

# No `from __future__ import annotations` here: Dagster reads the config class from the real annotation.

import os
import time

import dagster as dg

from mixsp_core.teacher.shards import ShardSpec, all_shards
from pipelines.defs.assets.prepare import sentence_corpus
from pipelines.defs.resources import PathsResource, pipeline_params
from pipelines.metadata import file_metadata

_TEACHER = pipeline_params().teacher
SHARDS = _TEACHER.shards


class TeacherConfig(dg.Config):
    """The teacher model (params.yaml ``teacher``): a Hub id or a local HF folder."""

    model: str = _TEACHER.model
    batch_size: int = _TEACHER.batch_size


class ShardConfig(TeacherConfig):
    """The teacher, and the CPU threads one shard step encodes on: 0 is this machine's cores / N, for N shard
    steps side by side on one machine; on a cluster, where each step has its own machine, give its cores."""

    threads: int = 0


def shard_asset_name(spec: ShardSpec) -> str:
    return f"teacher_shard_{spec.number}_of_{spec.count}"


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _shard_asset(spec: ShardSpec) -> dg.AssetsDefinition:
    @dg.asset(
        name=shard_asset_name(spec),
        group_name="teacher",
        kinds={"pytorch", "numpy"},
        deps=[sentence_corpus],
        description=f"Shard {spec} of the corpus sentences missing from the teacher cache (by sentence hash), "
                    f"encoded into data/teacher_shards/{spec.name}/; merged by teacher_embeddings.",
    )
    def shard(context: dg.AssetExecutionContext, config: ShardConfig, paths: PathsResource) -> dg.MaterializeResult:
        from mixsp_core.stages.teacher import run_teacher_shard

        params = paths.params(teacher={"model": config.model, "batch_size": config.batch_size})
        threads = config.threads or max(1, _cpus() // spec.count)
        started = time.perf_counter()
        done = run_teacher_shard(params, spec, threads=threads, show_progress=False)
        seconds = time.perf_counter() - started
        context.log.info(f"shard {spec}: {done.sentences} sentences, {done.encoded} encoded now "
                         f"({threads} threads, {seconds:.1f} s, pid {os.getpid()})")
        return dg.MaterializeResult(metadata={
            "model": config.model,
            "shard": str(spec),
            "dagster/row_count": done.sentences,
            "encoded": done.encoded,
            "threads": threads,
            "pid": os.getpid(),
            "seconds": round(seconds, 2),
            "path": dg.MetadataValue.path(str(done.path)),
        })

    return shard


teacher_shards = [_shard_asset(spec) for spec in all_shards(SHARDS)]


@dg.asset(
    group_name="teacher",
    kinds={"pytorch", "numpy"},
    deps=[sentence_corpus, *teacher_shards],
    description="Teacher embeddings of every corpus sentence under data/teacher/ (embeddings.npy + "
                "index.parquet keyed by sha256 of the text): the shards merged (any shard not materialised "
                "yet is encoded here first); only sentences missing from the cache are encoded.",
)
def teacher_embeddings(context: dg.AssetExecutionContext, config: TeacherConfig,
                       paths: PathsResource) -> dg.MaterializeResult:
    from mixsp_core.stages.teacher import run_teacher

    params = paths.params(teacher={"model": config.model, "batch_size": config.batch_size})
    started = time.perf_counter()
    result = run_teacher(params)
    seconds = time.perf_counter() - started
    context.log.info(f"{result.summary()} ({seconds:.1f} s)")
    files = {}
    for name in ("embeddings.npy", "index.parquet"):
        if (result.cache_dir / name).is_file():
            meta = file_metadata(result.cache_dir / name)
            files.update({f"{name}/{key}": value for key, value in meta.items()})
    return dg.MaterializeResult(metadata={
        "model": config.model,
        "dagster/row_count": result.rows,
        "dim": result.dim,
        "encoded": result.encoded,
        "reused": result.reused,
        "encoded_in_this_step": result.encoded_here,
        "shards": result.shards,
        "seconds": round(seconds, 2),
        "path": dg.MetadataValue.path(str(result.cache_dir)),
        **files,
    })
