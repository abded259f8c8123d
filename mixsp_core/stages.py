"""The pipeline's stages as plain functions: the one implementation that Dagster assets, the `mixsp` CLI
and the DVC stages all call.

Each stage reads its inputs from, and writes its outputs to, deterministic paths under the data root
(``PipelinePaths``), so DVC can version them. Outputs are written atomically and only after the stage's
own checks pass: a failed or interrupted stage never replaces a good artifact.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import pandas as pd

from mixsp_core.data.corpus import build_corpus, read_corpus, write_corpus
from mixsp_core.data.sources import load_pairs
from mixsp_core.data.validate import validate_corpus, validate_pairs

if TYPE_CHECKING:
    from mixsp_core.teacher_cache import SentenceEncoder
    from mixsp_core.teacher_shards import MergeReport, ShardResult, ShardSpec


@dataclass(frozen=True)
class PipelinePaths:
    """Where each stage writes, relative to one data root (``data/`` in the repository)."""

    root: Path

    @property
    def pairs(self) -> Path:
        return self.root / "pairs" / "pairs.parquet"

    @property
    def corpus(self) -> Path:
        return self.root / "corpus" / "corpus.txt"

    @property
    def teacher(self) -> Path:
        return self.root / "teacher"

    def teacher_cache(self, identity: str) -> Path:
        """The cache folder of one teacher (``identity`` from :func:`mixsp_core.teacher_cache.teacher_identity`):
        ``teacher/`` for a Hub id or plain folder (the teacher stage's cache, as before),
        ``teacher/finetuned-<sha16>/`` for a fine-tuned teacher, so its cache sits beside the released
        teacher's (both under the one DVC output) instead of clashing with it."""
        _, sep, digest = identity.partition("+finetuned@sha256:")
        return self.teacher / f"finetuned-{digest[:16]}" if sep else self.teacher

    @property
    def teacher_shards(self) -> Path:
        """Shard directories (shard-K-of-N/) of sharded teacher encoding, merged into ``teacher``."""
        return self.root / "teacher_shards"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def student(self) -> Path:
        """The pipeline's training run (best/, last/, snapshots/step-N/, metrics.json, plots/)."""
        return self.models / "student"

    @property
    def compressed(self) -> Path:
        return self.models / "compressed"

    @property
    def merged(self) -> Path:
        return self.models / "merged"

    @property
    def champion(self) -> Path:
        return self.models / "champion"

    @property
    def evaluation(self) -> Path:
        return self.reports / "evaluation.json"


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file in the same folder, then rename over ``path`` in one step."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; artifacts are meant to be shared
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_validated_pairs(data_spec: str) -> pd.DataFrame:
    """Read pairs from ``data_spec`` and validate them; raise with every failing expectation otherwise."""
    pairs = load_pairs(data_spec)
    validate_pairs(pairs, name=data_spec).raise_for_failures()
    return pairs


def write_pairs(pairs: pd.DataFrame, paths: PipelinePaths) -> Path:
    atomic_write(paths.pairs, lambda tmp: pairs.to_parquet(tmp, index=False))
    return paths.pairs


def read_pairs(paths: PipelinePaths) -> pd.DataFrame:
    if not paths.pairs.is_file():
        raise FileNotFoundError(f"{paths.pairs}: no pairs table yet; run the data stage first (`mixsp prepare`)")
    return pd.read_parquet(paths.pairs)


def make_corpus(pairs: pd.DataFrame, text_files: list[Path], max_sentences: int, seed: int) -> list[str]:
    """Build and validate the unlabeled sentence corpus."""
    corpus = build_corpus(pairs, text_files, max_sentences=max_sentences, seed=seed)
    validate_corpus(corpus).raise_for_failures()
    return corpus


def write_corpus_file(corpus: list[str], paths: PipelinePaths) -> Path:
    write_corpus(corpus, paths.corpus)  # atomic already
    return paths.corpus


def read_corpus_file(paths: PipelinePaths) -> list[str]:
    if not paths.corpus.is_file():
        raise FileNotFoundError(f"{paths.corpus}: no corpus yet; run the data stage first (`mixsp prepare`)")
    return read_corpus(paths.corpus)


def encode_teacher(corpus: list[str], paths: PipelinePaths, teacher: str, batch_size: int = 64,
                   device: str | None = None, show_progress: bool = True):
    """Encode the corpus with the teacher through the sentence-hash cache; returns (embeddings, stats).

    ``teacher``: a Hub id or a local model folder; a fine-tuned teacher's cache is keyed by the sha256 of
    its weights (:func:`mixsp_core.teacher_cache.teacher_identity`), so re-training it never serves the old
    model's rows."""
    from mixsp_core.models.encoder import Encoder
    from mixsp_core.teacher_cache import TeacherCache

    cache_dir, identity = _teacher_cache_of(paths, teacher)
    cache = TeacherCache(cache_dir, model_name=identity)
    # Loading the teacher costs seconds and 400 MB: skip it when every sentence is cached already.
    encoder = None if not cache.missing(corpus) else Encoder(teacher, device=device, show_progress=show_progress)
    embeddings, stats = cache.encode(corpus, encoder, batch_size=batch_size)
    return np.asarray(embeddings, dtype=np.float32), stats


@dataclass
class PrepareResult:
    pairs: pd.DataFrame
    corpus: list[str]
    paths: PipelinePaths

    def summary(self) -> str:
        counts = self.pairs.groupby(["task", "split"]).size()
        rows = "\n".join(f"  {task} {split}: {n}" for (task, split), n in counts.items())
        return (f"pairs: {len(self.pairs)} -> {self.paths.pairs}\n{rows}\n"
                f"corpus: {len(self.corpus)} sentences -> {self.paths.corpus}")


def run_prepare(params) -> PrepareResult:
    """Data stage: load + validate pairs, build + validate the corpus, then write both (atomically)."""
    paths = PipelinePaths(params.data.root_path())
    pairs = load_validated_pairs(params.data.resolved_spec())
    corpus = make_corpus(pairs, params.data.resolved_corpus_files(),
                         params.data.max_corpus_sentences, params.data.seed)
    write_pairs(pairs, paths)
    write_corpus_file(corpus, paths)
    return PrepareResult(pairs, corpus, paths)


def teacher_loader(teacher: str, device: str | None = None, threads: int | None = None,
                   show_progress: bool = True) -> Callable[[], "SentenceEncoder"]:
    """A loader that builds the teacher ``Encoder`` on first call and returns the same one after.
    ``threads`` caps the CPU threads it encodes on (None: all), so parallel shards share the cores."""
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


def encode_teacher_shard(corpus: list[str], paths: PipelinePaths, teacher: str, spec: "ShardSpec",
                         batch_size: int = 64, device: str | None = None, threads: int | None = None,
                         show_progress: bool = True) -> "ShardResult":
    """Encode shard ``spec`` (K of N) of the corpus sentences missing from the teacher cache into
    ``paths.teacher_shards``; a shard already done is kept (see ``mixsp_core.teacher_shards.encode_shard``)."""
    from mixsp_core.teacher_shards import encode_shard

    cache_dir, identity = _teacher_cache_of(paths, teacher)
    return encode_shard(corpus, cache_dir, paths.teacher_shards, identity, spec,
                        teacher_loader(teacher, device, threads, show_progress), batch_size=batch_size)


def merge_teacher_shards(corpus: list[str], paths: PipelinePaths, teacher: str, shards: int) -> "MergeReport":
    """Merge the ``shards`` shard directories into the teacher cache; every corpus sentence must then be cached."""
    from mixsp_core.teacher_shards import merge_shards

    cache_dir, identity = _teacher_cache_of(paths, teacher)
    return merge_shards(cache_dir, paths.teacher_shards, identity, shards, sentences=corpus)


def _teacher_cache_of(paths: PipelinePaths, teacher: str) -> tuple[Path, str]:
    """The cache folder and the name it is keyed by for ``teacher`` (as :func:`encode_teacher` uses them)."""
    from mixsp_core.teacher_cache import teacher_identity

    identity = teacher_identity(teacher)
    return paths.teacher_cache(identity), identity


@dataclass(frozen=True)
class TeacherResult:
    """The teacher stage: ``encoded`` corpus sentences were new to the cache (encoded by the shards, here or
    elsewhere), ``reused`` were cached before; ``encoded_here`` of them were encoded by this call."""

    encoded: int
    reused: int
    encoded_here: int
    rows: int
    dim: int
    shards: int

    def summary(self) -> str:
        return (f"teacher cache: {self.encoded} sentences encoded, {self.reused} reused "
                f"({self.shards} shards, {self.encoded_here} encoded by this process)")


def sharded_teacher(corpus: list[str], paths: PipelinePaths, teacher: str, shards: int, batch_size: int = 64,
                    device: str | None = None, show_progress: bool = True) -> TeacherResult:
    """Teacher stage: encode every shard not done yet (one after another, one teacher load), then merge all
    shards into the cache. Shards encoded beforehand (parallel steps, other machines) are only merged."""
    from mixsp_core.teacher_cache import TeacherCache
    from mixsp_core.teacher_shards import all_shards, encode_shard, merge_shards

    cache_dir, identity = _teacher_cache_of(paths, teacher)
    distinct = len(set(corpus))
    missing = len(TeacherCache(cache_dir, identity).missing(corpus))
    load = teacher_loader(teacher, device, show_progress=show_progress)  # loaded once, only if a shard needs it
    here = sum(encode_shard(corpus, cache_dir, paths.teacher_shards, identity, spec, load,
                            batch_size=batch_size).encoded for spec in all_shards(shards))
    merge_shards(cache_dir, paths.teacher_shards, identity, shards, sentences=corpus)
    cache = TeacherCache(cache_dir, identity)
    return TeacherResult(encoded=missing, reused=distinct - missing, encoded_here=here, rows=len(corpus),
                         dim=int(cache.dim or 0), shards=shards)


def run_teacher(params) -> TeacherResult:
    """Teacher stage (`mixsp teacher`, DVC): all ``teacher.shards`` shards of the written corpus, then the merge."""
    paths = PipelinePaths(params.data.root_path())
    t = params.teacher
    return sharded_teacher(read_corpus_file(paths), paths, t.model, t.shards, batch_size=t.batch_size,
                           device=t.resolved_device())


def run_teacher_shard(params, spec: "ShardSpec") -> "ShardResult":
    """`mixsp teacher --shard K/N`: one shard, e.g. on another machine; N must be params.yaml's teacher.shards."""
    from mixsp_core.errors import ConfigError

    if spec.count != params.teacher.shards:
        raise ConfigError("teacher.shards", f"is {params.teacher.shards}, but --shard {spec} splits into "
                                            f"{spec.count}; the merge expects {params.teacher.shards} shards")
    paths = PipelinePaths(params.data.root_path())
    t = params.teacher
    return encode_teacher_shard(read_corpus_file(paths), paths, t.model, spec, batch_size=t.batch_size,
                                device=t.resolved_device())


def run_teacher_merge(params) -> "MergeReport":
    """`mixsp teacher --merge-shards`: merge the shards (encoding nothing); an absent or bad shard is an error."""
    paths = PipelinePaths(params.data.root_path())
    return merge_teacher_shards(read_corpus_file(paths), paths, params.teacher.model, params.teacher.shards)


def training_inputs(config, paths: PipelinePaths, data_spec: str | None = None):
    """Pairs, corpus and teacher embeddings for one training config.

    ``data.spec: auto`` reads the pipeline's validated pairs table (the data stage's output); any other
    spec is loaded and validated here. The corpus and teacher embeddings are read only when the config
    distils (or initialises its output layer from the teacher); teacher rows come from the cache, and only
    sentences missing from it are encoded.
    """
    spec = data_spec or config.data.spec
    pairs = read_pairs(paths) if spec == "auto" else load_validated_pairs(spec)
    if not config.loss.uses_teacher and config.model.output_init != "teacher":
        return pairs, None, None
    corpus = read_corpus_file(paths) if config.data.corpus == "auto" else read_corpus(Path(config.data.corpus))
    teacher, _ = encode_teacher(corpus, paths, config.data.teacher)
    return pairs, corpus, teacher


def run_train(config, paths: PipelinePaths, output: Path | None = None, tracker=None, show_progress: bool = True):
    """Training stage: one run of ``mixsp_core.train.run_training`` with its inputs and MLflow tracker."""
    from mixsp_core.tracking import tracker_for_run
    from mixsp_core.train import run_training

    out = Path(output) if output else config.resolved_output_dir()
    pairs, corpus, teacher = training_inputs(config, paths)
    tracker = tracker if tracker is not None else tracker_for_run(config, out)
    return run_training(config, pairs, corpus, teacher, out, tracker, show_progress=show_progress)


def pipeline_paths_of(params_path: Path | None) -> PipelinePaths:
    from mixsp_core.pipeline_config import REPO_ROOT, load_params

    return PipelinePaths(load_params(params_path or REPO_ROOT / "params.yaml").data.root_path())


def run_train_from_file(config_path: Path, output: Path | None = None, params_path: Path | None = None):
    """`mixsp train --config FILE`: FILE is a training config (configs/*.yaml)."""
    from mixsp_core.config import load_config

    return run_train(load_config(config_path), pipeline_paths_of(params_path), output)


def run_finetune_teacher_from_file(config_path: Path, output: Path, params_path: Path | None = None,
                                   show_progress: bool = True):
    """`mixsp finetune-teacher --config FILE --out DIR`: fine-tune the teacher of FILE (e.g.
    configs/teacher_finetune.yaml) on the pairs a training run would read, into DIR/run/ and DIR/teacher/."""
    from mixsp_core.config import load_config
    from mixsp_core.teacher_finetune import RUN_DIR, check_teacher_config, finetune_teacher
    from mixsp_core.tracking import tracker_for_run

    config = load_config(config_path)
    check_teacher_config(config)  # before the pairs are read and an MLflow run is opened
    pairs, _, _ = training_inputs(config, pipeline_paths_of(params_path))
    tracker = tracker_for_run(config, Path(output) / RUN_DIR)
    return finetune_teacher(config, pairs, output, tracker, show_progress=show_progress)


# --------------------------------------------------------------------------- stage 2: train .. promote
# The pipeline's own training run (`mixsp train --config params.yaml`, the `student` asset) and the
# stages after it live in mixsp_core.pipeline_stages (which imports this module); they are re-exported
# here lazily so every stage is reachable as ``mixsp_core.stages.run_<stage>``.
_STAGE2 = ("CompressResult", "MergeStageResult", "load_pipeline_embedder", "run_compress", "run_evaluate",
           "run_merge", "run_promote", "run_soup", "run_student", "student_config")


def __getattr__(name: str):
    if name in _STAGE2:
        from mixsp_core import pipeline_stages

        return getattr(pipeline_stages, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
