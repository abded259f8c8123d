"""The analyses of one model, as the evaluate stage runs them for its best variant and ``mixsp analyse``
for any model folder: redundancy and geometry (:mod:`mixsp_core.evaluate.geometry`), whitening and
classification transfer (:mod:`mixsp_core.evaluate.transfer`).

Every sentence set is encoded once: the dev sentences, a deterministic sample of corpus sentences (what
the geometry is measured on and every whitening is fitted on, never the task data) and each transfer task's
sentences; prefixes and whitenings are transforms of those cached vectors. Output: a JSON-ready dict
(:func:`run_analyses`), its markdown (:func:`analyses_markdown`) and two plots, written together by
:func:`write_analyses` as ``analyses.json``, ``analyses.md``, ``analyses_prefix.png`` and
``analyses_transfer.png``.

Measured (all-MiniLM-L6-v2, the defaults: 5,000 corpus sentences, 2,000 per task, the 2-core CPU busy at
load 4): 161 s in all (encoding 3,834 dev + 5,000 corpus + 12,000 task sentences 130 s, geometry 11 s, the
6 x 252 logistic-regression fits 8.5 s). Dev STS 83.26 raw, 78.98 for each whitening; transfer mean 79.82
raw, 79.40-79.42 whitened: on this contrastively trained model whitening hurts STS and, slightly,
classification. The first 128 dims keep 82.39 of 83.26; TwoNN 6.3, IsoScore 0.30, I(W) 0.72, mean cosine 0.03.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mixsp_core.compress.transform import Embedder
from mixsp_core.compress.whitening import WHITENING_METHODS, whitening_from_spec
from mixsp_core.errors import ConfigError
from mixsp_core.evaluate.geometry import dev_scores, pair_rows, prefix_spearman, space_geometry
from mixsp_core.evaluate.sts import DEV_TASKS, json_ready
from mixsp_core.evaluate.transfer import TRANSFER_TASKS, check_task_names, classification_accuracy, load_transfer_task
from mixsp_core.io import write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)
RAW = "none"  # the row of the embeddings as the model gives them
ANALYSES_FILES = ("analyses.json", "analyses.md", "analyses_prefix.png", "analyses_transfer.png")


@dataclass
class AnalysesSpec:
    """What to run. ``whitenings``: ``METHOD`` or ``METHOD:K`` (``pca`` / ``pca-cor`` reduced to K dims);
    ``senteval_dir`` None skips transfer; ``transfer_max_sentences`` caps each task (per split)."""

    sample_sentences: int = 5000
    transfer_tasks: list[str] = field(default_factory=lambda: list(TRANSFER_TASKS))
    transfer_max_sentences: int | None = 2000
    whitenings: list[str] = field(default_factory=lambda: list(WHITENING_METHODS))
    senteval_dir: Path | None = None
    batch_size: int = 64
    seed: int = 0
    c: float = 1.0

    def validate(self) -> AnalysesSpec:
        if self.sample_sentences < 3:
            raise ConfigError("evaluate.analyses_sentences", f"must be >= 3, got {self.sample_sentences}")
        if self.transfer_max_sentences is not None and self.transfer_max_sentences < 10:
            raise ConfigError("evaluate.transfer_max_sentences", f"must be >= 10, got {self.transfer_max_sentences}")
        check_task_names(self.transfer_tasks)
        for spec in self.whitenings:
            whitening_from_spec(spec, "evaluate.transfer_whitenings")
        return self


def _encode(embedder: Embedder, sentences: list[str], batch_size: int) -> np.ndarray:
    from mixsp_core.evaluate.grid import _encode_timed

    return _encode_timed(embedder, sentences, batch_size)[0]


def sample_corpus(corpus: Sequence[str], count: int, seed: int) -> list[str]:
    """``count`` distinct corpus sentences drawn with ``seed``, in corpus order."""
    unique = list(dict.fromkeys(corpus))
    keep = np.sort(np.random.default_rng(seed).permutation(len(unique))[:count])
    return [unique[i] for i in keep]


def run_analyses(embedder: Embedder, pairs: pd.DataFrame, corpus: Sequence[str], spec: AnalysesSpec | None = None,
                 model: str = "") -> dict[str, Any]:
    """Prefix Spearman on the dev ``pairs``, geometry of the ``corpus`` sample, dev STS and transfer accuracy
    of the raw vectors and of each whitening fitted on that sample. Returns the JSON-ready report."""
    spec = (spec or AnalysesSpec()).validate()
    if pairs.empty:
        raise ValueError("run_analyses: no dev pairs")
    started = time.perf_counter()
    seconds: dict[str, float] = {}
    sample = sample_corpus(corpus, spec.sample_sentences, spec.seed)
    if len(sample) < 3:
        raise ValueError(f"run_analyses: needs >= 3 distinct corpus sentences, got {len(sample)}")
    unique = list(pd.unique(pd.concat([pairs["sentence1"], pairs["sentence2"]], ignore_index=True)))
    left, right = pair_rows(pairs, unique)
    t0 = time.perf_counter()
    dev_vecs, corpus_vecs = _encode(embedder, unique, spec.batch_size), _encode(embedder, sample, spec.batch_size)
    seconds["encode_dev_and_sample"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    geometry = space_geometry(corpus_vecs)
    prefix = prefix_spearman(pairs, dev_vecs, left, right, corpus_vecs)
    seconds["geometry"] = time.perf_counter() - t0

    variants: dict[str, Any] = {RAW: None}
    skipped: dict[str, str] = {}
    for name in spec.whitenings:
        try:
            variants[name] = whitening_from_spec(name).fit(corpus_vecs)
        except (ConfigError, ValueError, np.linalg.LinAlgError) as err:  # e.g. fewer sample rows than dims
            skipped[name] = str(err)
    rows = []
    for name, transform in variants.items():
        vecs = dev_vecs if transform is None else transform.apply(dev_vecs)
        dev, tasks = dev_scores(pairs, vecs, left, right)
        rows.append({"embedding": name, "dims": int(vecs.shape[1]), "dev": dev,
                     "dev_tasks": {t: tasks[t] for t in DEV_TASKS if t in tasks}, "accuracy": {}})

    tasks_info: dict[str, Any] = {}
    t0 = time.perf_counter()
    for task_name in spec.transfer_tasks if spec.senteval_dir else []:
        task = load_transfer_task(spec.senteval_dir, task_name, spec.transfer_max_sentences, spec.seed)
        if task is None:
            skipped[task_name] = f"no {task_name} files under {spec.senteval_dir}"
            continue
        task_started = time.perf_counter()
        features = _encode(embedder, task.sentences, spec.batch_size)
        encoded = time.perf_counter() - task_started
        for row, transform in zip(rows, variants.values()):
            vecs = features if transform is None else transform.apply(features)
            row["accuracy"][task_name] = classification_accuracy(vecs, task, spec.c, seed=spec.seed)
        tasks_info[task_name] = {"sentences": len(task.sentences), "classes": task.classes,
                                 "test_sentences": int(task.test.sum()) if task.test is not None else None,
                                 "protocol": task.protocol, "encode_seconds": encoded,
                                 "classify_seconds": time.perf_counter() - task_started - encoded}
        log.info("transfer %s: %s", task_name, {r["embedding"]: round(r["accuracy"][task_name], 2) for r in rows})
    seconds["transfer"] = time.perf_counter() - t0
    for row in rows:
        row["mean"] = float(np.mean(list(row["accuracy"].values()))) if row["accuracy"] else None
    seconds["total"] = time.perf_counter() - started
    return json_ready({
        "model": model, "dev_sentences": len(unique), "sample_sentences": len(sample),
        "geometry": geometry, "prefix": prefix,
        "transfer": {"tasks": tasks_info, "rows": rows, "c": spec.c,
                     "fitted_on": f"{len(sample)} corpus sentences"},
        "skipped": skipped, "seconds": seconds,
    })


def analyses_metrics(result: dict[str, Any]) -> dict[str, float]:
    """The numbers as flat metric names (MLflow, Dagster metadata): ``analyses/geometry/<measure>``,
    ``analyses/prefix/<k>/dev``, ``analyses/<embedding>/dev``, ``analyses/<embedding>/transfer/<task>`` and
    ``.../transfer/mean``; undefined values left out."""
    metrics = {f"analyses/geometry/{k}": v for k, v in result["geometry"].items() if k not in ("sentences", "width")}
    metrics.update({f"analyses/prefix/{r['dims']}/dev": r["prefix"] for r in result["prefix"]})
    for row in result["transfer"]["rows"]:
        base = f"analyses/{row['embedding']}"
        metrics[f"{base}/dev"] = row["dev"]
        metrics.update({f"{base}/transfer/{task}": acc for task, acc in row["accuracy"].items()})
        metrics[f"{base}/transfer/mean"] = row["mean"]
    return {k: float(v) for k, v in metrics.items() if v is not None}


def _cell(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def analyses_markdown(result: dict[str, Any]) -> str:
    """The three tables: prefix Spearman, geometry, whitening x (dev STS, transfer accuracy)."""
    dev_sets = [t for t in DEV_TASKS if any(t in r["tasks"] for r in result["prefix"])]
    lines = [f"### Redundancy: dev Spearman of the first k dims ({result['model']})", "",
             "| dims | prefix | PCA to k (corpus-fitted) | " + " | ".join(f"prefix {t}" for t in dev_sets) + " |",
             "|" + "---:|" * (3 + len(dev_sets))]
    for row in result["prefix"]:
        lines.append(f"| {row['dims']} | {_cell(row['prefix'])} | {_cell(row.get('pca'))} | "
                     + " | ".join(_cell(row["tasks"].get(t)) for t in dev_sets) + " |")
    g = result["geometry"]
    lines += ["", f"### Geometry ({g['sentences']} corpus sentences)", "",
              "| width | TwoNN intrinsic dim | IsoScore | I(W) | mean pairwise cosine |", "|---:|---:|---:|---:|---:|",
              f"| {g['width']} | {_cell(g['twonn_dimension'], 1)} | {_cell(g['isoscore'], 4)} | "
              f"{_cell(g['partition_isotropy'], 4)} | {_cell(g['mean_cosine'], 4)} |"]
    transfer = result["transfer"]
    tasks = list(transfer["tasks"])
    lines += ["", f"### Whitening: dev STS and classification transfer (whitenings fitted on "
                  f"{transfer['fitted_on']}; accuracy x100, logistic regression C={transfer['c']:g})", "",
              "| embedding | dims | dev STS | " + " | ".join(tasks) + " | transfer mean |",
              "|---|" + "---:|" * (3 + len(tasks))]
    for row in transfer["rows"]:
        lines.append(f"| {row['embedding']} | {row['dims']} | {_cell(row['dev'])} | "
                     + " | ".join(_cell(row["accuracy"].get(t)) for t in tasks) + f" | {_cell(row['mean'])} |")
    if tasks:
        lines += [""] + [f"- {name}: {info['sentences']} sentences, {info['classes']} classes, {info['protocol']}"
                         for name, info in transfer["tasks"].items()]
    lines += [f"- skipped {name}: {why}" for name, why in result["skipped"].items()]
    seconds = result["seconds"]
    lines += ["", "Time: " + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items())]
    return "\n".join(lines)


def plot_prefix(result: dict[str, Any], path: str | Path) -> Path:
    """Dev Spearman against k: the first k dims, and a PCA to k dims."""
    from mixsp_core.evaluate.plots import _pyplot, save_figure

    plt = _pyplot()
    rows = result["prefix"]
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    for key, label in (("prefix", "first k dims"), ("pca", "PCA to k dims (corpus-fitted)")):
        points = [(r["dims"], r[key]) for r in rows if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points), marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks([r["dims"] for r in rows], [str(r["dims"]) for r in rows])
    ax.minorticks_off()
    ax.set_xlabel("k")
    ax.set_ylabel("dev Spearman x100")
    ax.set_title(f"Spearman vs prefix size: {'/'.join(Path(result['model']).parts[-2:]) or result['model']}",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = save_figure(fig, path)
    plt.close(fig)
    return path


def plot_transfer(result: dict[str, Any], path: str | Path) -> Path:
    """Transfer accuracy per task and whitening (grouped bars), beside each whitening's dev STS Spearman."""
    from mixsp_core.evaluate.plots import _pyplot, save_figure

    plt = _pyplot()
    rows = result["transfer"]["rows"]
    tasks = [*result["transfer"]["tasks"], "mean"] if result["transfer"]["tasks"] else []
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [3, 1]})
    width = 0.8 / max(1, len(rows))
    for i, row in enumerate(rows):
        values = [row["accuracy"].get(t) if t != "mean" else row["mean"] for t in tasks]
        left.bar(np.arange(len(tasks)) + i * width, [np.nan if v is None else v for v in values], width,
                 label=row["embedding"])
    left.set_xticks(np.arange(len(tasks)) + width * (len(rows) - 1) / 2, tasks)
    left.set_ylabel("accuracy x100")
    left.set_title("transfer accuracy per whitening" if tasks else "transfer: no task data")
    accuracies = [v for r in rows for v in r["accuracy"].values()]
    if accuracies:
        left.set_ylim(max(0.0, min(accuracies) - 10), min(100.0, max(accuracies) + 3))
    left.legend(fontsize=7, ncol=3)
    names = [r["embedding"] for r in rows]
    bars = right.bar(range(len(rows)), [np.nan if r["dev"] is None else r["dev"] for r in rows], color="#48a")
    right.bar_label(bars, fmt="%.1f", fontsize=7)
    right.set_xticks(range(len(rows)), names, rotation=40, ha="right", fontsize=8)
    right.set_title("dev STS Spearman x100")
    fig.tight_layout()
    path = save_figure(fig, path)
    plt.close(fig)
    return path


def write_analyses(result: dict[str, Any], directory: str | Path) -> dict[str, Path]:
    """``analyses.json``, ``analyses.md``, ``analyses_prefix.png`` and ``analyses_transfer.png`` in ``directory``."""
    directory = Path(directory)
    return {"json": write_json_atomic(directory / "analyses.json", result),
            "markdown": write_text_atomic(directory / "analyses.md", analyses_markdown(result) + "\n"),
            "prefix_plot": plot_prefix(result, directory / "analyses_prefix.png"),
            "transfer_plot": plot_transfer(result, directory / "analyses_transfer.png")}
