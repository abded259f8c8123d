"""What the training loop draws its batches from: the training pairs and dev sets, the distillation
sentences and their teacher targets, the NLI triplets, and the seeded row streams over them.

Every stream is a pure function of (seed, step), so a resumed run draws exactly the batches the
uninterrupted run would have drawn and needs no saved sampler state. Streams return row indices of
the *global* batch; under torchrun each rank takes its slice (:meth:`DistContext.shard`).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from mixsp_core.data.table import eval_name
from mixsp_core.errors import ConfigError, DataError
from mixsp_core.losses import fit_pca_projection
from mixsp_core.paths import shared_dir
from mixsp_core.training.config import RunConfig
from mixsp_core.training.neighbours import nearest_neighbours
from mixsp_core.training.silver import silver_pairs

log = logging.getLogger(__name__)

# the seed-stream number of each data source, so their permutations never coincide
PAIR_STREAM, DISTILL_STREAM, NLI_STREAM = 0, 1, 2


def select_pairs(pairs: pd.DataFrame, config: RunConfig) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    """Training rows (``split == train`` of ``data.train_tasks``) and one frame per dev set."""
    missing = {"sentence1", "sentence2", "score", "task", "split"} - set(pairs.columns)
    if missing:
        raise DataError("<pairs table>", f"missing columns {sorted(missing)}")
    train = pairs[(pairs["split"] == "train") & pairs["task"].isin(config.data.train_tasks)]
    # every task named must contribute: a missing file (sts-train.csv) must not silently train on the rest
    absent = [task for task in config.data.train_tasks if not (train["task"] == task).any()]
    if absent:
        with_train = sorted(pairs.loc[pairs["split"] == "train", "task"].unique())
        raise ConfigError("data.train_tasks", f"task(s) {', '.join(map(repr, absent))} have no training pairs in "
                          f"the pairs table (tasks with training pairs: {', '.join(with_train) or 'none'}); "
                          "is a training file missing from the data, e.g. STS/STSBenchmark/sts-train.csv?")
    if config.data.max_train_pairs:
        train = train.sample(n=min(len(train), config.data.max_train_pairs), random_state=config.seed)
    names = pd.Series([eval_name(t, s) for t, s in zip(pairs["task"], pairs["split"])], index=pairs.index)
    dev = {}
    for name in config.data.dev_sets:
        frame = pairs[names == name]
        if len(frame) < 3:
            raise ConfigError("data.dev_sets", f"dev set {name!r} has {len(frame)} pairs in the pairs table")
        if frame["score"].nunique() < 2:  # a correlation with a constant is NaN: no step could be selected
            raise ConfigError("data.dev_sets", f"dev set {name!r}: every gold score is {frame['score'].iloc[0]:g} "
                              f"(from {frame['source'].iloc[0] if 'source' in frame else 'the pairs table'}); "
                              "Spearman is undefined")
        dev[name] = frame.reset_index(drop=True)
    return train.reset_index(drop=True), dev


@dataclass(frozen=True)
class BatchStream:
    """Row indices of batch ``step``: a fresh seeded permutation per epoch, cut into full batches.

    With ``groups`` (one label per row, e.g. the task), every batch holds rows of one group only and
    the epoch's batches of all groups are shuffled together: STS-B's and SICK's gold scales mean
    different things, so a ranking loss should not compare pairs across them. A pure function of
    (seed, step), so resuming needs no state.
    """

    size: int
    batch_size: int
    seed: int
    stream: int
    groups: tuple[str, ...] | None = None

    @functools.cached_property
    def batches_per_epoch(self) -> int:
        if self.groups is None:
            return max(1, self.size // self.batch_size)
        counts = pd.Series(self.groups).value_counts()
        return max(1, int(sum(max(1, n // self.batch_size) for n in counts)))

    def indices(self, step: int) -> np.ndarray:
        epoch, position = divmod(step, self.batches_per_epoch)
        if self.groups is None:
            order = np.random.default_rng([self.seed, self.stream, epoch]).permutation(self.size)
            return order[position * self.batch_size:(position + 1) * self.batch_size]
        return self._grouped_epoch(epoch)[position]

    @functools.lru_cache(maxsize=2)  # noqa: B019 - a frozen, hashable dataclass: caching per epoch is safe
    def _grouped_epoch(self, epoch: int) -> list[np.ndarray]:
        labels = np.asarray(self.groups)
        batches = []
        for g, name in enumerate(sorted(set(self.groups))):
            rows = np.flatnonzero(labels == name)
            rows = rows[np.random.default_rng([self.seed, self.stream, epoch, g]).permutation(len(rows))]
            count = max(1, len(rows) // self.batch_size)
            batches += [rows[i * self.batch_size:(i + 1) * self.batch_size] for i in range(count)]
        order = np.random.default_rng([self.seed, self.stream, epoch]).permutation(len(batches))
        return [batches[i] for i in order]


def load_triplets(config: RunConfig) -> pd.DataFrame:
    """SNLI triplets of ``data.nli_splits`` from ``data.nli_dir`` (auto: the shared SentEval SNLI folder)."""
    from mixsp_core.data.corpus import load_nli_triplets

    folder = snli_folder(config)
    return pd.concat([load_nli_triplets(folder, split) for split in config.data.nli_splits], ignore_index=True)


def snli_folder(config: RunConfig) -> Path:
    """``data.nli_dir``, or (auto) the shared SentEval SNLI folder."""
    return shared_dir() / "data" / "senteval" / "SNLI" if config.data.nli_dir == "auto" else Path(config.data.nli_dir)


def teacher_rows(corpus: Sequence[str] | None, teacher: np.ndarray | None,
                 field: str, what: str) -> tuple[list[str], np.ndarray]:
    """``corpus`` as a list and its raw teacher rows as float32, checked to be present and aligned
    (``field`` and ``what`` name the setting that needs them in the error)."""
    if corpus is None or teacher is None:
        raise ConfigError(field, f"{what} needs the corpus and its teacher embeddings")
    corpus = list(corpus)
    teacher = np.asarray(teacher, dtype=np.float32)
    if teacher.ndim != 2 or teacher.shape[0] != len(corpus):
        raise DataError("<teacher embeddings>", f"shape {teacher.shape} does not match {len(corpus)} corpus sentences")
    return corpus, teacher


def distill_targets(config: RunConfig, corpus: Sequence[str] | None,
                    teacher: np.ndarray | None) -> tuple[list[str], np.ndarray | None, np.ndarray | None]:
    """The distillation sentences and their targets: teacher rows (aligned with ``corpus``) projected
    to ``model.output_dim`` by an uncentred PCA fitted here; rows already that wide are used as is.

    Empty unless a loss term or ``model.output_init`` reads them: silver pairs alone (the other use of
    the teacher, :attr:`RunConfig.needs_teacher`) take the raw rows and need no PCA fitted here."""
    if not config.loss.uses_teacher and config.model.output_init != "teacher":
        return [], None, None
    corpus, teacher = teacher_rows(corpus, teacher, "loss.distill", "distillation")
    k = config.model.output_dim
    if teacher.shape[1] == k:
        return corpus, teacher, None
    targets, components = fit_pca_projection(teacher, k, seed=config.seed)
    return corpus, targets, components


@dataclass(frozen=True)
class NeighbourBatches:
    """Distillation batches of ``anchors.batch_size`` random rows, each followed by its nearest neighbours
    (``neighbours[row]``, k per row): a batch of ``anchors.batch_size * (k + 1)`` rows in which every
    anchor has close partners. A pure function of (seed, step), like :class:`BatchStream`."""

    anchors: BatchStream
    neighbours: np.ndarray  # (n, k) row indices

    def indices(self, step: int) -> np.ndarray:
        rows = self.anchors.indices(step)
        return np.concatenate([rows[:, None], self.neighbours[rows]], axis=1).reshape(-1)


def distill_batches(targets: np.ndarray | None, batch_size: int, neighbours: int,
                    seed: int) -> BatchStream | NeighbourBatches:
    """The distillation row stream: plain random batches, or anchors with their teacher-space neighbours."""
    size = 0 if targets is None else len(targets)
    if neighbours == 0 or targets is None:
        return BatchStream(size, batch_size, seed, DISTILL_STREAM)
    return NeighbourBatches(BatchStream(size, batch_size // (neighbours + 1), seed, DISTILL_STREAM),
                            nearest_neighbours(targets, neighbours))


@dataclass(frozen=True)
class TrainData:
    """Everything one run draws training batches from (global batches: each rank takes its slice).

    ``train`` holds the silver pairs (task ``silver``) after the gold ones when ``data.silver_pairs > 0``.
    ``distill_*`` are empty / None unless distillation (or ``model.output_init: teacher``) is on;
    ``triplets`` and ``nli`` are None unless ``loss.infonce > 0``. ``pca_components`` is the teacher
    projection fitted for the distillation targets (None when the teacher is already ``output_dim`` wide).
    """

    train: pd.DataFrame  # the training pairs
    gold: np.ndarray  # their scores, float32
    class_counts: tuple[int, int]  # (lower, upper) pairs for the routing loss's class balance
    pairs: BatchStream
    distill_sentences: list[str]
    distill_targets: np.ndarray | None
    pca_components: np.ndarray | None
    distill: BatchStream | NeighbourBatches
    triplets: pd.DataFrame | None
    nli: BatchStream | None
    # The methods' own streams, None when off; the loop attaches them (with_method_streams) because those
    # modules build on this one: Conan's mining.HardNegativeMiner, CoDiEmb's tasks.TaskSampler and
    # tasks.RetrievalBatches, 2-Tier SimCSE's unsupervised.SentenceBatches (corpus sentences, loss.simcse > 0)
    mined: object | None = None
    tasks: object | None = None
    retrieval: object | None = None
    simcse: object | None = None

    @classmethod
    def build(cls, config: RunConfig, train: pd.DataFrame, corpus: Sequence[str] | None,
              teacher: np.ndarray | None, triplets: pd.DataFrame | None) -> TrainData:
        """The streams of ``train`` (from :func:`select_pairs`; plus silver pairs of the corpus when
        ``data.silver_pairs > 0``), the distillation data (``corpus`` with its aligned, raw ``teacher`` rows)
        and the NLI ``triplets`` (loaded from ``data.nli_dir`` when None)."""
        tc, lc = config.train, config.loss
        if config.data.silver_pairs > 0:
            # before gold, the class counts and the pair stream: silver rows are training pairs like the others
            train = with_silver_pairs(config, train, corpus, teacher)
        gold = train["score"].to_numpy(dtype=np.float32)
        upper = gold >= config.data.upper_threshold
        class_counts = tuple(lc.routing_class_counts) or (max(1, int((~upper).sum())), max(1, int(upper.sum())))
        pairs = BatchStream(len(train), tc.batch_size, config.seed, PAIR_STREAM,
                            tuple(train["task"]) if tc.batch_by_task else None)
        sentences, targets, components = distill_targets(config, corpus, teacher)
        distill = distill_batches(targets, tc.distill_batch_size, tc.distill_neighbours, config.seed)
        if lc.infonce > 0 and triplets is None:
            triplets = load_triplets(config)
        nli = BatchStream(len(triplets), tc.nli_batch_size, config.seed, NLI_STREAM) if lc.infonce > 0 else None
        return cls(train, gold, class_counts, pairs, sentences, targets, components, distill, triplets, nli)


def with_silver_pairs(config: RunConfig, train: pd.DataFrame, corpus: Sequence[str] | None,
                      teacher: np.ndarray | None) -> pd.DataFrame:
    """``train`` followed by ``data.silver_pairs`` silver pairs (:func:`~mixsp_core.training.silver.silver_pairs`)
    of ``corpus``, scored by its raw (full-width) ``teacher`` rows on the gold scores' distribution."""
    d = config.data
    sentences, rows = teacher_rows(corpus, teacher, "data.silver_pairs", "silver pairs")
    silver = silver_pairs(sentences, rows, train["score"].to_numpy(dtype=np.float64), d.silver_pairs,
                          d.silver_neighbour_ranks, d.silver_random_fraction, config.seed)
    if len(silver):
        log.info("silver pairs: %d of %d asked (teacher %s, %d corpus sentences), scores %.3f to %.3f, %d random",
                 len(silver), d.silver_pairs, d.teacher, len(sentences), silver["score"].min(),
                 silver["score"].max(), int((silver["subset"] == "random").sum()))
    else:
        log.info("silver pairs: none of %d asked were kept (every pair a near-duplicate)", d.silver_pairs)
    # the training frame's columns only (select_pairs needs five; a full pairs table has all of PAIR_COLUMNS)
    columns = [c for c in train.columns if c in silver.columns]
    return pd.concat([train, silver.loc[:, columns]], ignore_index=True)
