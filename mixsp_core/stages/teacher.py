"""Teacher stage: the corpus encoded by the teacher into the sentence-hash cache, in shards.

The sentences missing from the cache are split into ``teacher.shards`` shards by sentence hash
(:mod:`mixsp_core.teacher.shards`). ``run_teacher_shard`` encodes one (a Dagster step each, or
`mixsp teacher --shard K/N` on another machine); ``run_teacher`` encodes every shard not done yet and merges
them all into the cache (`mixsp teacher`, DVC, the ``teacher_embeddings`` asset).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from mixsp_core.errors import ConfigError
from mixsp_core.io import claim_output, output_lock
from mixsp_core.params import Params
from mixsp_core.paths import PipelinePaths
from mixsp_core.progress import stage_progress
from mixsp_core.stages.prepare import read_corpus_file
from mixsp_core.teacher.cache import TeacherCache, teacher_identity
from mixsp_core.teacher.shards import MergeReport, ShardResult, ShardSpec, all_shards, encode_shard, merge_shards

if TYPE_CHECKING:
    from mixsp_core.teacher.cache import CacheStats, SentenceEncoder


@dataclass(frozen=True)
class TeacherResult:
    """``encoded`` corpus sentences were new to the cache (encoded by the shards, here or elsewhere),
    ``reused`` were cached before; ``encoded_here`` of them were encoded by this call; ``repaired`` of the
    encoded had a cached row that failed its check (NaN, key / vector mismatch, no check recorded)."""

    encoded: int
    reused: int
    encoded_here: int
    rows: int
    dim: int
    shards: int
    cache_dir: Path
    repaired: int = 0

    def summary(self) -> str:
        repaired = f" ({self.repaired} replacing cached rows that failed their check)" if self.repaired else ""
        return (f"teacher cache: {self.encoded} sentences encoded{repaired}, {self.reused} reused "
                f"({self.shards} shards, {self.encoded_here} encoded by this process)")


def teacher_cache(paths: PipelinePaths, teacher: str) -> TeacherCache:
    """The cache of ``teacher``: keyed by its name, or for a fine-tuned teacher by its weights' sha256, so
    re-training it never serves the old model's rows."""
    identity = teacher_identity(teacher)
    return TeacherCache(paths.teacher_cache(identity), model_name=identity)


def teacher_loader(teacher: str, device: str | None = None, threads: int | None = None,
                   show_progress: bool = True) -> Callable[[], "SentenceEncoder"]:
    """A loader that builds the teacher ``Encoder`` on first call and returns the same one after (loading
    costs seconds and 400 MB: skipped when nothing is missing). ``threads`` caps the CPU threads it encodes
    on (None: all), so parallel shards share the cores."""
    encoder = None

    def load():
        nonlocal encoder
        if encoder is None:
            from mixsp_core.models.encoder import Encoder

            encoder = Encoder(teacher, device=device, show_progress=show_progress)
            if threads:
                encoder.cpu_workers = threads
        return encoder

    return load


def encode_with_teacher(corpus: list[str], paths: PipelinePaths, teacher: str, batch_size: int = 64,
                        device: str | None = None) -> tuple[np.ndarray, "CacheStats"]:
    """Teacher rows of ``corpus`` (what distillation reads), encoding only the sentences the cache lacks."""
    cache = teacher_cache(paths, teacher)
    encoder = teacher_loader(teacher, device)() if cache.missing(corpus) else None
    embeddings, stats = cache.encode(corpus, encoder, batch_size=batch_size)
    return np.asarray(embeddings, dtype=np.float32), stats


@stage_progress("teacher")  # one progress bar for the stage's encode calls
def run_teacher(params: Params, show_progress: bool = True) -> TeacherResult:
    """Encode every shard not done yet (one after another, one teacher load), then merge all shards into the
    cache. Shards encoded beforehand (parallel steps, other machines) are only merged. Refused at once
    (:class:`~mixsp_core.errors.OutputBusyError`) while another run of this stage or of the merge holds
    ``teacher/``; the shard steps never take that lock (they run in parallel, each into its own directory)."""
    with claim_output(params.paths.teacher, "teacher stage"):
        return _teacher(params, show_progress)


def _teacher(params: Params, show_progress: bool) -> TeacherResult:
    """The body of :func:`run_teacher`, under the lock of ``teacher/``."""
    t, paths = params.teacher, params.paths
    corpus = read_corpus_file(paths)
    cache = teacher_cache(paths, t.model)
    missing, repaired = map(len, cache.pending(corpus))  # one check of the cached rows for both counts
    load = teacher_loader(t.model, t.resolved_device(), show_progress=show_progress)
    here = sum(encode_shard(corpus, cache.directory, paths.teacher_shards, cache.model_name, spec, load,
                            batch_size=t.batch_size).encoded for spec in all_shards(t.shards))
    merge_shards(cache.directory, paths.teacher_shards, cache.model_name, t.shards, sentences=corpus)
    merged = teacher_cache(paths, t.model)
    return TeacherResult(encoded=missing, reused=len(set(corpus)) - missing, encoded_here=here, rows=len(corpus),
                         dim=int(merged.dim or 0), shards=t.shards, cache_dir=merged.directory, repaired=repaired)


def run_teacher_shard(params: Params, spec: ShardSpec, threads: int | None = None,
                      show_progress: bool = True) -> ShardResult:
    """Shard ``spec`` (K of N, N = ``teacher.shards``) of the corpus sentences missing from the cache, into
    ``teacher_shards/``; a shard already done is kept."""
    t, paths = params.teacher, params.paths
    if spec.count != t.shards:
        raise ConfigError("teacher.shards", f"is {t.shards}, but --shard {spec} splits into {spec.count}; "
                                            f"the merge expects {t.shards} shards")
    cache = teacher_cache(paths, t.model)
    return encode_shard(read_corpus_file(paths), cache.directory, paths.teacher_shards, cache.model_name, spec,
                        teacher_loader(t.model, t.resolved_device(), threads, show_progress),
                        batch_size=t.batch_size)


def run_teacher_merge(params: Params) -> MergeReport:
    """Merge the shard directories into the cache (encoding nothing); an absent or bad shard is an error.
    Holds the lock of ``teacher/``, as :func:`run_teacher` does."""
    t, paths = params.teacher, params.paths
    with output_lock(paths.teacher, "teacher merge"):
        cache = teacher_cache(paths, t.model)
        return merge_shards(cache.directory, paths.teacher_shards, cache.model_name, t.shards,
                            sentences=read_corpus_file(paths))

