"""Training loop for the ``bi`` student and the ``cross`` MixSP scorer.

``run_training`` is the one entry point (CLI ``mixsp train``, the Dagster asset and the DVC stage all
call it). Read it top to bottom: pick the data, build the model, then per step draw one batch of pairs
(plus one of distillation sentences and one of NLI triplets when those losses are on), sum the
weighted losses, and step AdamW under a linear warm-up/decay schedule with gradient clipping (and
autocast on CUDA). Every ``eval_every`` steps it scores the dev sets, keeps the best checkpoint by the
mean dev Spearman, writes a resumable ``last/`` checkpoint and stops early after ``patience``
evaluations without improvement.

Batches are a pure function of (seed, step), so a resumed run draws exactly the batches the
uninterrupted run would have drawn; with the RNG and optimizer state restored it continues the same
trajectory on CPU.

With ``train.snapshot_every`` the run also saves ``start/`` (the step-0 model: the merge start theta_0)
and weights-only ``snapshots/step-N/``, the "epochs of one run" that :mod:`mixsp_core.merge` soups.
Trained-in compression (Matryoshka prefixes, 2DMSE earlier layers, ESE alignment) are terms of
:class:`Objective`. Under ``torchrun`` the same loop runs data-parallel (:mod:`mixsp_core.distributed`):
each rank encodes its slice of the global batch, the losses see the gathered global batch, and only
rank 0 evaluates and writes.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import random
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from mixsp_core.config import LOSS_TERMS, STS_TERMS, RunConfig, config_from_dict, dump_config, flatten
from mixsp_core.data.table import eval_name
from mixsp_core.errors import CheckpointError, ConfigError, DataError
from mixsp_core.evaluate.plots import plot_class_histogram, plot_dev_curve
from mixsp_core.evaluate.sts import correlations, cosine_rows
from mixsp_core.losses import (CoSENTLoss, DistillLoss, InfoNCELoss, ListwiseRankLoss, PearsonLoss, RankKLLoss,
                               RoutingLoss, ScoreBCELoss, SimilarityDistillLoss, fit_pca_projection)
from mixsp_core.losses.matryoshka import MatryoshkaLoss, alignment_loss, ese_pca, layer_weight
from mixsp_core.models.checkpoint import (build_model, load_checkpoint, read_trainer_state, restore_optimizer,
                                          save_checkpoint)
from mixsp_core.distributed import DistContext, setup, weights_digest
from mixsp_core.tracking import NullTracker, Tracker

log = logging.getLogger(__name__)

BEST_DIR, LAST_DIR, START_DIR, SNAPSHOT_DIR = "best", "last", "start", "snapshots"
# settings that may change between an interrupted run and its resumption without changing the run
_RESUME_FREE = {"train.resume", "train.device", "train.eval_batch_size", "train.log_every", "output_dir",
                "train.num_threads", "train.snapshot_every"}


@dataclass
class TrainResult:
    """What a run produced. ``best_checkpoint`` is None for ``kind: encoder`` (nothing trained)."""

    output_dir: Path
    best_checkpoint: Path | None
    best_step: int
    best_metrics: dict[str, float]  # dev Spearman per set + "primary" (their mean)
    class_metrics: dict[str, dict[str, Any]]  # per dev set: overlap, spearman_upper/lower, n_upper/lower
    history: list[dict[str, Any]]
    steps: int
    train_seconds: float
    run_id: str | None = None
    artifacts: dict[str, str] = field(default_factory=dict)
    weights_digest: str | None = None  # SHA-256 of the final weights (equal on every rank of a DDP run)

    def summary(self) -> str:
        lines = [f"output: {self.output_dir}", f"best checkpoint: {self.best_checkpoint} (step {self.best_step})",
                 f"steps: {self.steps}, training time: {self.train_seconds / 60:.1f} min"]
        lines += [f"  {name}: {value:.2f}" for name, value in self.best_metrics.items()]
        for name, cm in self.class_metrics.items():
            lines.append(f"  {name}: overlap {_fmt(cm['overlap'], '.3f')}, Spearman upper "
                         f"{_fmt(cm['spearman_upper'])}, lower {_fmt(cm['spearman_lower'])}")
        snapshots = self.output_dir / SNAPSHOT_DIR
        if snapshots.is_dir():
            lines.append(f"snapshots: {len(list(snapshots.glob('step-*')))} in {snapshots} (start: "
                         f"{self.output_dir / START_DIR})")
        if self.run_id:
            lines.append(f"MLflow run: {self.run_id}")
        return "\n".join(lines)


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "n/a" if value is None else format(value, spec)


@dataclass
class Progress:
    """Where a run stands; saved in ``last/trainer_state.json`` and restored on resume."""

    step: int = 0
    best_metric: float = -math.inf
    best_step: int = 0
    evals_since_best: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    train_seconds: float = 0.0
    stopped_early: bool = False


# --------------------------------------------------------------------------- data


def select_pairs(pairs: pd.DataFrame, config: RunConfig) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    """Training rows (``split == train`` of ``data.train_tasks``) and one frame per dev set."""
    missing = {"sentence1", "sentence2", "score", "task", "split"} - set(pairs.columns)
    if missing:
        raise DataError("<pairs table>", f"missing columns {sorted(missing)}")
    train = pairs[(pairs["split"] == "train") & pairs["task"].isin(config.data.train_tasks)]
    if train.empty:
        raise ConfigError("data.train_tasks", f"no training pairs for {config.data.train_tasks} in the pairs table "
                          f"(tasks present: {sorted(pairs['task'].unique())})")
    if config.data.max_train_pairs:
        train = train.sample(n=min(len(train), config.data.max_train_pairs), random_state=config.seed)
    names = pd.Series([eval_name(t, s) for t, s in zip(pairs["task"], pairs["split"])], index=pairs.index)
    dev = {}
    for name in config.data.dev_sets:
        frame = pairs[names == name]
        if len(frame) < 3:
            raise ConfigError("data.dev_sets", f"dev set {name!r} has {len(frame)} pairs in the pairs table")
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
    """SNLI dev + test triplets from ``data.nli_dir`` (auto: the shared SentEval SNLI folder)."""
    from mixsp_core.data.corpus import load_nli_triplets

    if config.data.nli_dir == "auto":
        from mixsp_core.pipeline_config import shared_dir

        folder = shared_dir() / "data" / "senteval" / "SNLI"
    else:
        folder = Path(config.data.nli_dir)
    return pd.concat([load_nli_triplets(folder, split) for split in ("dev", "test")], ignore_index=True)


def distill_targets(config: RunConfig, corpus: Sequence[str] | None,
                    teacher: np.ndarray | None) -> tuple[list[str], np.ndarray | None, np.ndarray | None]:
    """The distillation sentences and their targets: teacher rows (aligned with ``corpus``) projected
    to ``model.output_dim`` by an uncentred PCA fitted here; rows already that wide are used as is."""
    if not config.loss.uses_teacher and config.model.output_init != "teacher":
        return [], None, None
    if corpus is None or teacher is None:
        raise ConfigError("loss.distill", "distillation needs the corpus and its teacher embeddings")
    corpus = list(corpus)
    teacher = np.asarray(teacher, dtype=np.float32)
    if teacher.ndim != 2 or teacher.shape[0] != len(corpus):
        raise DataError("<teacher embeddings>", f"shape {teacher.shape} does not match {len(corpus)} corpus sentences")
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


def nearest_neighbours(vectors: np.ndarray, k: int, chunk: int = 1024) -> np.ndarray:
    """The ``k`` rows of highest cosine to each row (itself excluded), shape ``(n, k)``."""
    if not 1 <= k < len(vectors):
        raise ConfigError("train.distill_neighbours", f"must be between 1 and {len(vectors) - 1} (the "
                          f"distillation sentences less one), got {k}")
    unit = F.normalize(torch.as_tensor(np.asarray(vectors, dtype=np.float32)), dim=1)
    out = np.empty((len(unit), k), dtype=np.int64)
    for start in range(0, len(unit), chunk):
        sims = unit[start:start + chunk] @ unit.T
        sims[torch.arange(len(sims)), torch.arange(start, start + len(sims))] = -2.0  # not itself
        out[start:start + chunk] = sims.topk(k, dim=1).indices.numpy()
    return out


def distill_batches(targets: np.ndarray | None, batch_size: int, neighbours: int,
                    seed: int) -> BatchStream | NeighbourBatches:
    """The distillation row stream: plain random batches, or anchors with their teacher-space neighbours."""
    size = 0 if targets is None else len(targets)
    if neighbours == 0 or targets is None:
        return BatchStream(size, batch_size, seed, 1)
    return NeighbourBatches(BatchStream(size, batch_size // (neighbours + 1), seed, 1),
                            nearest_neighbours(targets, neighbours))


# --------------------------------------------------------------------------- optimisation


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("train.device", f"{name} requested but CUDA is not available")
    return torch.device(name)


def make_optimizer(model: nn.Module, config: RunConfig) -> torch.optim.AdamW:
    """AdamW; no weight decay on biases and norms; the added layers may get their own ``head_lr``."""
    tc = config.train
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = defaultdict(list)
    for name, param in model.named_parameters():
        head = not name.startswith("encoder.")
        no_decay = name.endswith(".bias") or "norm" in name.lower()
        groups[(head, no_decay)].append(param)
    param_groups = [
        {"params": params, "weight_decay": 0.0 if no_decay else tc.weight_decay,
         "lr": (tc.head_lr or tc.lr) if head else tc.lr}
        for (head, no_decay), params in sorted(groups.items())
    ]
    return torch.optim.AdamW(param_groups, lr=tc.lr)


def linear_schedule(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from 0 over ``warmup`` steps, then linear decay to 0 at ``total``."""

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


Gather = Callable[[torch.Tensor], torch.Tensor]


def _no_gather(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


class Objective(nn.Module):
    """The weighted sum of the configured loss terms for one step; returns the total and each term.

    Each ``*_terms`` method runs the forward pass on this process's rows and passes what the losses
    need through ``gather`` (identity in one process; :meth:`mixsp_core.distributed.DistContext.gather`
    under torchrun), so every term is computed on the global batch. ``forward`` is what runs the model
    (the DDP wrapper when distributed; ``model`` itself by default).

    Trained-in compression (bi only), with A = the weighted sum of the STS terms:
    ``matryoshka``: sum over prefix sizes k of A(e[:k]); ``ese_alignment``: ESE's D(e[:m], PCA_m(e));
    ``layers``: 2DMSE's layer-weighted [A(e_i) + prefixes + alignment] on the embedding from an earlier
    encoder layer i, drawn per step from (seed, step) (``layer_mode: sample``) or all layers averaged (``all``).
    """

    def __init__(self, config: RunConfig, class_counts: tuple[int, int]):
        super().__init__()
        lc = config.loss
        self.weights = {name: getattr(lc, name) for name in LOSS_TERMS if getattr(lc, name) > 0}
        self.threshold = config.data.upper_threshold
        self.seed = config.seed
        self.cosent = CoSENTLoss(lc.cosent_scale)
        self.pearson = PearsonLoss()
        self.rank_kl = RankKLLoss(lc.rank_kl_temperature)
        self.listwise = ListwiseRankLoss(lc.rank_kl_temperature)
        self.score_bce = ScoreBCELoss()
        self.routing = RoutingLoss(class_counts)
        self.distill = DistillLoss()
        self.distill_sim = SimilarityDistillLoss()
        self.infonce = InfoNCELoss(lc.infonce_temperature)
        self.layer_mode, self.ese_dim = lc.layer_mode, lc.ese_dim
        # prefixes only: the full-width term is the STS terms themselves
        self.prefixes = MatryoshkaLoss(self.sts, lc.matryoshka_dims, full_weight=0.0, ese_dim=None)
        # one earlier layer's stack: full + (prefixes when matryoshka is on) + (alignment when ESE is on)
        self.layer_stack = MatryoshkaLoss(self.sts, lc.matryoshka_dims if lc.matryoshka > 0 else [],
                                          full_weight=1.0, ese_dim=lc.ese_dim if lc.ese_alignment > 0 else None)

    def sts(self, cos: torch.Tensor, gold: torch.Tensor) -> torch.Tensor:
        """A(cos, gold): the weighted STS terms, the base loss of the Matryoshka and layer terms."""
        return sum(self.weights[name] * getattr(self, name)(cos, gold) for name in STS_TERMS if name in self.weights)

    def layers_for_step(self, step: int, num_layers: int) -> list[int]:
        """Earlier layers (1-based, below ``num_layers``) whose embeddings the ``layers`` term needs."""
        if "layers" not in self.weights or num_layers < 2:
            return []
        if self.layer_mode == "all":
            return list(range(1, num_layers))
        # a function of (seed, step), like the batches: every rank and a resumed run draw the same layer
        return [int(np.random.default_rng([self.seed, 3, step]).integers(1, num_layers))]

    def pair_terms(self, model: nn.Module, left: list[str], right: list[str], gold: torch.Tensor, step: int = 0,
                   forward: Callable | None = None, gather: Gather = _no_gather) -> dict[str, torch.Tensor]:
        """Terms on a batch of pairs: this process's ``left`` / ``right`` rows, ``gold`` of the global batch."""
        forward = forward or model
        upper = gold >= self.threshold
        terms: dict[str, torch.Tensor] = {}
        if model.kind == "cross":
            out = forward(model.tokenize_pairs(left, right))
            terms["score_bce"] = self.score_bce(gather(out.logits), gold)
            gates = (out.routing_a.gate, out.routing_b.gate)
        else:
            layers = self.layers_for_step(step, model.num_layers)
            out = forward(model.tokenize(left + right), layers=layers)
            n = len(left)
            a, b = gather(out.embedding[:n]), gather(out.embedding[n:])
            cos = F.cosine_similarity(a.float(), b.float(), dim=-1)
            for name in STS_TERMS:
                if name in self.weights:
                    terms[name] = getattr(self, name)(cos, gold)
            if "matryoshka" in self.weights:
                terms["matryoshka"] = self.prefixes(a, b, gold)
            if "ese_alignment" in self.weights and self.ese_dim < a.shape[-1]:
                both = torch.cat([a, b], dim=0)  # every sentence of the batch shapes the PCA target
                terms["ese_alignment"] = alignment_loss(both[:, : self.ese_dim], ese_pca(both, self.ese_dim))
            if layers:
                per_layer = [layer_weight(i) * self.layer_stack(gather(e[:n]), gather(e[n:]), gold)
                             for i, e in sorted(out.layer_embeddings.items())]
                terms["layers"] = sum(per_layer) / len(per_layer)
            gate = out.routing.gate
            gates = (gate[:n], gate[n:]) if gate is not None else (None, None)
        if "routing" in self.weights and gates[0] is not None:
            terms["routing"] = (self.routing(gather(gates[0]), upper) + self.routing(gather(gates[1]), upper)) / 2
        return terms

    def distill_terms(self, model: nn.Module, sentences: list[str], targets: torch.Tensor,
                      forward: Callable | None = None, gather: Gather = _no_gather) -> dict[str, torch.Tensor]:
        """HPD's MSE and/or the similarity MSE (whichever is weighted): this process's ``sentences``;
        ``targets`` of the global batch."""
        student = gather((forward or model)(model.tokenize(sentences)).embedding)
        terms = {}
        if "distill" in self.weights:
            terms["distill"] = self.distill(student, targets)
        if "distill_sim" in self.weights:
            terms["distill_sim"] = self.distill_sim(student, targets)
        return terms

    def nli_term(self, model: nn.Module, anchor: list[str], positive: list[str], negative: list[str],
                 forward: Callable | None = None, gather: Gather = _no_gather) -> torch.Tensor:
        """InfoNCE over the global batch: every rank's positives and hard negatives are candidates."""
        n = len(anchor)
        emb = (forward or model)(model.tokenize(anchor + positive + negative)).embedding
        return self.infonce(gather(emb[:n]), gather(emb[n:2 * n]), gather(emb[2 * n:]))

    def total(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(self.weights[name] * value for name, value in terms.items())


# --------------------------------------------------------------------------- evaluation


def pair_scores(model, left: list[str], right: list[str], batch_size: int) -> np.ndarray:
    """Predicted similarity per pair: the model's own ``score_pairs`` (bi: cosine, cross: sigmoid
    score), or the cosine of a plain encoder's embeddings."""
    if hasattr(model, "score_pairs"):
        return model.score_pairs(left, right, batch_size=batch_size)
    unique = list(dict.fromkeys(left + right))
    vectors = model.encode(unique, batch_size=batch_size, show_progress=False)
    row = {s: i for i, s in enumerate(unique)}
    return cosine_rows(vectors[[row[s] for s in left]], vectors[[row[s] for s in right]])


def evaluate_dev(model, dev: dict[str, pd.DataFrame], batch_size: int) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Spearman x100 per dev set plus ``primary`` (their mean), and the raw scores per set."""
    scores = {name: pair_scores(model, list(frame["sentence1"]), list(frame["sentence2"]), batch_size)
              for name, frame in dev.items()}
    return dev_metrics(scores, dev), scores


def dev_metrics(scores: dict[str, np.ndarray], dev: dict[str, pd.DataFrame]) -> dict[str, float]:
    """Spearman x100 of each dev set's scores against gold, and ``primary``: their mean (the selection
    metric; with the default dev sets, the mean of STS-B dev and SICK trial)."""
    metrics = {name: correlations(scores[name], frame["score"].to_numpy())["spearman"] for name, frame in dev.items()}
    metrics["primary"] = float(np.mean([metrics[name] for name in dev]))
    return metrics


def finish_report(scores: dict[str, np.ndarray], dev: dict[str, pd.DataFrame], config: RunConfig, out: Path,
                  history: list[dict[str, Any]], tracker: Tracker) -> tuple[dict[str, float], dict[str, dict]]:
    """Dev metrics of the chosen model's ``scores`` (per dev set), MixSP's class measurements and the
    figures; written to ``out/metrics.json`` and logged."""
    metrics = dev_metrics(scores, dev)
    plots = out / "plots"
    per_class = {}
    for name, frame in dev.items():
        per_class[name] = plot_class_histogram(scores[name], frame["score"].to_numpy(),
                                               plots / f"classes-{name}.png", config.data.upper_threshold,
                                               title=f"{config.name} on {name}")
    if history:
        plot_dev_curve(history, plots / "dev-spearman.png", keys=[*dev, "primary"])
    report = {"best": metrics, "class_metrics": per_class, "history": history}
    (out / "metrics.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    flat = {f"best/{k}": v for k, v in metrics.items()}
    for name, cm in per_class.items():
        flat.update({f"class/{name}/{k}": v for k, v in cm.items() if v is not None})
    tracker.log_metrics(flat, step=history[-1]["step"] if history else 0)
    tracker.log_artifact(plots, "plots")
    tracker.log_artifact(out / "metrics.json")
    return metrics, per_class


# --------------------------------------------------------------------------- the run


def run_training(config: RunConfig, pairs: pd.DataFrame, corpus: Sequence[str] | None = None,
                 teacher_targets: np.ndarray | None = None, out_dir: str | Path | None = None,
                 tracker: Tracker | None = None, triplets: pd.DataFrame | None = None,
                 show_progress: bool = True) -> TrainResult:
    """Train (or, for ``model.kind: encoder``, only evaluate) as ``config`` says; see the module doc.

    ``pairs``: the pairs table (training rows and the dev sets); ``corpus`` + ``teacher_targets``
    (rows aligned): distillation data, needed when ``loss.distill > 0``; ``triplets``: NLI triplets
    (columns anchor, positive, hard_negative), loaded from ``data.nli_dir`` when None and
    ``data.nli`` is on. Writes ``out_dir`` (default ``config.output_dir``): ``best/``, ``last/``,
    ``metrics.json``, ``history.json``, ``run_config.yaml``, ``plots/``; with ``train.snapshot_every``
    also ``start/`` (the step-0 model) and ``snapshots/step-N/``.

    Under torchrun every rank calls this with the same arguments; only rank 0 writes files and uses
    ``tracker``, and only rank 0's result carries the metrics.
    """
    out = Path(out_dir) if out_dir is not None else config.resolved_output_dir()
    threads_before = torch.get_num_threads()
    if config.train.num_threads:
        torch.set_num_threads(config.train.num_threads)
    ctx = setup(resolve_device(config.train.device))
    try:
        if not ctx.is_main:  # rank 0 alone records the run and shows progress
            tracker, show_progress = NullTracker(), False
        return _run(config, pairs, corpus, teacher_targets, out, tracker or NullTracker(), triplets,
                    show_progress, ctx)
    finally:
        ctx.close()
        torch.set_num_threads(threads_before)


def _run(config: RunConfig, pairs: pd.DataFrame, corpus: Sequence[str] | None, teacher_targets: np.ndarray | None,
         out: Path, tracker: Tracker, triplets: pd.DataFrame | None, show_progress: bool,
         ctx: DistContext) -> TrainResult:
    """The body of :func:`run_training` on one process (rank ``ctx.rank``)."""
    tc, lc = config.train, config.loss
    main = ctx.is_main
    seed_everything(config.seed)
    device = ctx.device
    train, dev = select_pairs(pairs, config)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        dump_config(config, out / "run_config.yaml")
    tracker.set_tags({"mixsp_kind": config.model.kind, "config_name": config.name})

    if config.model.kind == "encoder":  # a released model: evaluate only
        from mixsp_core.models.encoder import Encoder

        if not main:
            ctx.barrier()
            return TrainResult(out, None, 0, {}, {}, [], 0, 0.0)
        tracker.log_params(flatten(config.to_dict()))
        encoder = Encoder(config.model.encoder, device=str(device))
        metrics, per_class = finish_report(evaluate_dev(encoder, dev, tc.eval_batch_size)[1], dev, config, out, [],
                                           tracker)
        tracker.log_artifact(out / "run_config.yaml")
        tracker.finish()
        ctx.barrier()
        return TrainResult(out, None, 0, metrics, per_class, [], 0, 0.0, tracker.run_id)

    # ---- data streams (global batches; each rank takes its slice)
    ctx.check_divisible("train.batch_size", tc.batch_size)
    if lc.uses_teacher:
        ctx.check_divisible("train.distill_batch_size", tc.distill_batch_size)
    if lc.infonce > 0:
        ctx.check_divisible("train.nli_batch_size", tc.nli_batch_size)
    gold_all = train["score"].to_numpy(dtype=np.float32)
    upper_all = gold_all >= config.data.upper_threshold
    class_counts = tuple(lc.routing_class_counts) or (max(1, int((~upper_all).sum())), max(1, int(upper_all.sum())))
    pair_stream = BatchStream(len(train), tc.batch_size, config.seed, 0,
                              tuple(train["task"]) if tc.batch_by_task else None)
    total_steps = tc.max_steps or max(1, math.ceil(tc.epochs * pair_stream.batches_per_epoch))
    distill_sentences, targets, components = distill_targets(config, corpus, teacher_targets)
    distill_stream = distill_batches(targets, tc.distill_batch_size, tc.distill_neighbours, config.seed)
    if lc.infonce > 0 and triplets is None:
        triplets = load_triplets(config)
    nli_stream = BatchStream(len(triplets), tc.nli_batch_size, config.seed, 2) if lc.infonce > 0 else None
    if components is not None and main:
        np.save(out / "teacher_pca_components.npy", components)

    # ---- model, optimizer, schedule: fresh or resumed
    state = _resume_state(out / LAST_DIR, config) if tc.resume else None
    model = load_checkpoint(out / LAST_DIR) if state else build_model(config.model)
    model.to(device).train()
    if state is None and config.model.output_init != "random":
        _init_output(model, config, train, distill_sentences, targets)
    if state is None and tc.snapshot_every and main:
        # the fusion start theta_0: the heads are random per seed, so the base encoder alone is not it
        save_checkpoint(model, out / START_DIR, extra={"step": 0, "config": config.to_dict()})
    net = ctx.wrap(model)  # DDP copies rank 0's weights to every rank here
    optimizer = make_optimizer(model, config)
    scheduler = linear_schedule(optimizer, int(tc.warmup_ratio * total_steps), total_steps)
    progress = Progress()
    if state:
        restore_optimizer(optimizer, state, state.pop("_tensors"), out / LAST_DIR)
        scheduler.load_state_dict(state["scheduler"])
        progress = Progress(**{k: state[k] for k in Progress.__dataclass_fields__})
        log.info("resuming %s from step %d", out, progress.step)
    if ctx.rank > 0:  # own dropout masks per rank; rank 0 keeps the single-process RNG stream
        torch.manual_seed(int(np.random.default_rng([config.seed, ctx.rank, progress.step]).integers(2**31)))
    objective = Objective(config, class_counts).to(device)
    use_amp = tc.amp and device.type == "cuda"
    amp_dtype = torch.bfloat16 if tc.amp_dtype == "bf16" else torch.float16
    scaler = torch.amp.GradScaler("cuda") if use_amp and amp_dtype == torch.float16 else None
    tracker.log_params({**flatten(config.to_dict()), "derived.total_steps": total_steps,
                        "derived.train_pairs": len(train), "derived.class_counts": list(class_counts),
                        "derived.device": str(device), "derived.distill_sentences": len(distill_sentences),
                        "derived.world_size": ctx.world_size})

    best_scores: dict[str, np.ndarray] = {}  # the best model's dev scores, for the final report

    def evaluate_and_checkpoint() -> None:
        """Rank 0 scores the dev sets, keeps the best model and writes the resumable last/ checkpoint;
        the other ranks wait, then all take rank 0's early-stopping decision."""
        if main:
            metrics, scores = evaluate_dev(model, dev, tc.eval_batch_size)
            progress.train_seconds = time.perf_counter() - started
            progress.history.append({"step": progress.step, **metrics, "train_seconds": progress.train_seconds})
            tracker.log_metrics({f"dev/{k}": v for k, v in metrics.items()}, progress.step)
            if not math.isfinite(metrics["primary"]):
                # NaN Spearman means constant similarities: the model collapsed (e.g. a saturated tanh).
                raise FloatingPointError(f"{config.name}: dev Spearman is {metrics} at step {progress.step}: "
                                         "the model's similarities are constant or not finite")
            if metrics["primary"] > progress.best_metric:
                progress.best_metric, progress.best_step, progress.evals_since_best = (metrics["primary"],
                                                                                       progress.step, 0)
                best_scores.update(scores)
                save_checkpoint(model, out / BEST_DIR, extra={"step": progress.step, "dev": metrics,
                                                              "config": config.to_dict()})
            else:
                progress.evals_since_best += 1
            progress.stopped_early = bool(tc.patience and progress.evals_since_best >= tc.patience)
            if tc.save_last:
                save_checkpoint(model, out / LAST_DIR, optimizer=optimizer, trainer_state={
                    **asdict(progress), "total_steps": total_steps, "scheduler": scheduler.state_dict(),
                    "config": config.to_dict(), "tracking_run_id": tracker.run_id})
        ctx.barrier()
        progress.stopped_early = ctx.broadcast_flag(progress.stopped_early)

    # ---- the loop
    window: dict[str, list[float]] = defaultdict(list)
    bar = tqdm(total=total_steps, initial=progress.step, desc=f"train {config.name}", disable=not show_progress)
    started = time.perf_counter() - progress.train_seconds
    try:
        if progress.step == 0 and tc.eval_at_start:
            evaluate_and_checkpoint()
        while progress.step < total_steps and not progress.stopped_early:
            step = progress.step
            model.train()
            idx = pair_stream.indices(step)
            local = ctx.shard(idx)
            gold = torch.as_tensor(gold_all[idx], device=device)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                terms = objective.pair_terms(model, list(train["sentence1"].iloc[local]),
                                             list(train["sentence2"].iloc[local]), gold, step, net, ctx.gather)
                if lc.uses_teacher:
                    rows = distill_stream.indices(step)
                    terms |= objective.distill_terms(
                        model, [distill_sentences[i] for i in ctx.shard(rows)],
                        torch.as_tensor(targets[rows], device=device), net, ctx.gather)
                if nli_stream is not None:
                    rows = triplets.iloc[ctx.shard(nli_stream.indices(step))]
                    terms["infonce"] = objective.nli_term(model, list(rows["anchor"]), list(rows["positive"]),
                                                          list(rows["hard_negative"]), net, ctx.gather)
                loss = objective.total(terms)
            optimizer.zero_grad(set_to_none=True)
            # every rank holds the same global loss but only its own slice's gradient: DDP averages the
            # slices, so scale by the world size to get the global loss's gradient
            scaled = loss * ctx.grad_scale if ctx.enabled else loss
            if scaler is not None:
                scaler.scale(scaled).backward()
                scaler.unscale_(optimizer)
            else:
                scaled.backward()
            # the norm before clipping is logged: a check that every rank's update is the global batch's
            grad_norm = float(nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip or math.inf))
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            scheduler.step()
            progress.step = step = step + 1
            bar.update(1)

            window["loss"].append(float(loss.detach()))
            for name, value in terms.items():
                window[name].append(float(value.detach()))
            if math.isfinite(grad_norm):
                window["grad_norm"].append(grad_norm)
            if step % tc.log_every == 0 or step == total_steps:
                logged = {f"train/{k}": float(np.mean(v)) for k, v in window.items()}
                logged["train/lr"] = scheduler.get_last_lr()[0]
                tracker.log_metrics(logged, step)
                bar.set_postfix(loss=f"{logged['train/loss']:.4f}")
                window.clear()
            if tc.snapshot_every and step % tc.snapshot_every == 0 and main:
                save_checkpoint(model, out / SNAPSHOT_DIR / f"step-{step}",
                                extra={"step": step, "start": str(out / START_DIR), "config": config.to_dict()})
            if step % tc.eval_every == 0 or step == total_steps:
                evaluate_and_checkpoint()
    except BaseException:
        tracker.finish("KILLED")
        raise
    finally:
        bar.close()
    seconds = time.perf_counter() - started
    history, best_step, step = progress.history, progress.best_step, progress.step
    digest = weights_digest(model)
    if not ctx.all_equal(digest):
        raise RuntimeError("the training processes ended with different weights (DDP replicas diverged)")
    if not main:
        ctx.barrier()  # rank 0 writes the report
        return TrainResult(out, out / BEST_DIR, best_step, {}, {}, history, step, seconds, None, {}, digest)

    # ---- the best model's report
    (out / "history.json").write_text(json.dumps(history, indent=2) + "\n", encoding="utf-8")
    if not best_scores:  # resumed after the best evaluation: score the saved best model again
        best_scores.update(evaluate_dev(load_checkpoint(out / BEST_DIR, device=device), dev, tc.eval_batch_size)[1])
    metrics, per_class = finish_report(best_scores, dev, config, out, history, tracker)
    tracker.log_metrics({"train_seconds": seconds, "best_step": best_step}, step)
    tracker.log_artifact(out / "run_config.yaml")
    tracker.log_artifact(out / "history.json")
    if config.tracking.log_checkpoint:
        tracker.log_artifact(out / BEST_DIR, "best_checkpoint")
    tracker.finish()
    ctx.barrier()
    return TrainResult(out, out / BEST_DIR, best_step, metrics, per_class, history, step, seconds, tracker.run_id,
                       {"plots": str(out / "plots"), "metrics": str(out / "metrics.json")}, digest)


def _init_output(model, config: RunConfig, train: pd.DataFrame, sentences: list[str],
                 targets: np.ndarray | None) -> None:
    """Data-driven output layer (``model.output_init``), on a seeded sample of sentences."""
    from mixsp_core.models.student import init_output_layer

    rng = np.random.default_rng(config.seed)
    n = config.train.output_init_sentences
    if config.model.output_init == "teacher":
        rows = rng.permutation(len(sentences))[:n]
        stats = init_output_layer(model, [sentences[i] for i in rows], targets[rows])
    else:
        pool = list(dict.fromkeys(list(train["sentence1"]) + list(train["sentence2"])))
        stats = init_output_layer(model, [pool[i] for i in rng.permutation(len(pool))[:n]])
    log.info("output layer initialised (%s): %s", config.model.output_init, stats)


def _resume_state(last: Path, config: RunConfig) -> dict[str, Any] | None:
    """The saved trainer state when ``last`` holds a resumable checkpoint of this same run."""
    if not (last / "trainer_state.json").is_file():
        return None
    state, tensors = read_trainer_state(last)
    saved, current = flatten(state.get("config", {})), flatten(config.to_dict())
    defaults = flatten(config_from_dict({}).to_dict())  # fields newer than the saved run read as their default
    for key in sorted(set(saved) | set(current)):
        if key in _RESUME_FREE or key.startswith("tracking."):
            continue
        if saved.get(key, defaults.get(key)) != current.get(key):
            raise CheckpointError(
                f"{last / 'trainer_state.json'}: was written by a run with {key}={saved.get(key)!r}, this config "
                f"has {current.get(key)!r}; use another output directory or set train.resume: false")
    state["_tensors"] = tensors
    return state
