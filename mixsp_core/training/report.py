"""What a run reports: its result, its progress (saved for resuming), the dev-set scores it selects the
best model on, and the final report of the best model (``metrics.json``, the plots, the tracker's metrics)."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mixsp_core.evaluate.plots import plot_class_histogram, plot_dev_curve
from mixsp_core.evaluate.sts import correlations, cosine_rows, mean_dev_spearman
from mixsp_core.io import write_json_atomic
from mixsp_core.paths import RunDir
from mixsp_core.tracking.metrics import dev_metrics as named_dev_metrics
from mixsp_core.tracking.tracker import Tracker
from mixsp_core.training.config import RunConfig, flatten
from mixsp_core.training.distributed import DistContext


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
        run = RunDir(self.output_dir)
        lines = [f"output: {self.output_dir}", f"best checkpoint: {self.best_checkpoint} (step {self.best_step})",
                 f"steps: {self.steps}, training time: {self.train_seconds / 60:.1f} min"]
        lines += [f"  {name}: {value:.2f}" for name, value in self.best_metrics.items()]
        for name, cm in self.class_metrics.items():
            lines.append(f"  {name}: overlap {_fmt(cm['overlap'], '.3f')}, Spearman upper "
                         f"{_fmt(cm['spearman_upper'])}, lower {_fmt(cm['spearman_lower'])}")
        if run.snapshots.is_dir():
            lines.append(f"snapshots: {len(list(run.snapshots.glob('step-*')))} in {run.snapshots} (start: "
                         f"{run.start})")
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

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Progress:
        """The progress saved in a trainer state (which holds more keys: the scheduler, the config...)."""
        return cls(**{k: state[k] for k in cls.__dataclass_fields__})


class LossWindow:
    """The training losses since the last log line, averaged per name when logged."""

    def __init__(self) -> None:
        self._values: dict[str, list[float]] = defaultdict(list)

    def add(self, name: str, value: float) -> None:
        self._values[name].append(value)

    def flush(self) -> dict[str, float]:
        """``train/<name>``: the mean since the last flush; then starts a new window."""
        means = {f"train/{k}": float(np.mean(v)) for k, v in self._values.items()}
        self._values.clear()
        return means


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
    """Spearman x100 of each dev set's scores against gold, and ``primary``: their mean, the selection
    metric (:func:`mixsp_core.evaluate.sts.mean_dev_spearman`; with the default dev sets, the mean of
    STS-B dev and SICK trial). ``dev`` is never empty (``data.dev_sets`` must name one set)."""
    metrics = {name: correlations(scores[name], frame["score"].to_numpy())["spearman"] for name, frame in dev.items()}
    metrics["primary"] = mean_dev_spearman(metrics, dev)
    return metrics


def finish_report(scores: dict[str, np.ndarray], dev: dict[str, pd.DataFrame], config: RunConfig, run: RunDir,
                  history: list[dict[str, Any]], tracker: Tracker) -> tuple[dict[str, float], dict[str, dict]]:
    """Dev metrics of the chosen model's ``scores`` (per dev set), MixSP's class measurements and the
    figures; written to ``run.metrics`` and ``run.plots`` and logged."""
    metrics = dev_metrics(scores, dev)
    per_class = {}
    for name, frame in dev.items():
        per_class[name] = plot_class_histogram(scores[name], frame["score"].to_numpy(),
                                               run.plots / f"classes-{name}.png", config.data.upper_threshold,
                                               title=f"{config.name} on {name}")
    if history:
        plot_dev_curve(history, run.plots / "dev-spearman.png", keys=[*dev, "primary"])
    report = {"best": metrics, "class_metrics": per_class, "history": history}
    write_json_atomic(run.metrics, report)
    # Logged last, at the run's last step, under the curve's names: the run's latest dev/mean (what MLflow's
    # compare view shows) is its best checkpoint's.
    flat = named_dev_metrics(metrics)
    for name, cm in per_class.items():
        flat.update({f"class/{name}/{k}": v for k, v in cm.items() if v is not None})
    tracker.log_metrics(flat, step=history[-1]["step"] if history else 0)
    tracker.log_artifact(run.plots, "plots")
    tracker.log_artifact(run.metrics)
    return metrics, per_class


def evaluate_encoder(config: RunConfig, dev: dict[str, pd.DataFrame], run: RunDir, tracker: Tracker,
                     ctx: DistContext) -> TrainResult:
    """``model.kind: encoder``: score the released model on the dev sets; nothing is trained."""
    from mixsp_core.models.encoder import Encoder

    if not ctx.is_main:
        ctx.barrier()
        return TrainResult(run.root, None, 0, {}, {}, [], 0, 0.0)
    tracker.log_params(flatten(config.to_dict()))
    if config.model.decoder_prompt:  # a causal LM read at its prompt's last token (Token Prepending)
        from mixsp_core.models.token_prepending import DecoderEncoder

        encoder = DecoderEncoder.from_model_config(config.model, device=str(ctx.device), show_progress=False)
    else:
        encoder = Encoder(config.model.encoder, device=str(ctx.device))
    scores = evaluate_dev(encoder, dev, config.train.eval_batch_size)[1]
    metrics, per_class = finish_report(scores, dev, config, run, [], tracker)
    tracker.log_artifact(run.config)
    tracker.finish()
    ctx.barrier()
    return TrainResult(run.root, None, 0, metrics, per_class, [], 0, 0.0, tracker.run_id)
