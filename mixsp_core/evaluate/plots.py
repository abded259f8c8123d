"""Training figures and MixSP's class measurements.

MixSP claims (i) less overlap between the predicted-similarity distributions of upper-range pairs
(gold >= 4 of 5) and lower-range pairs, and (ii) better ranking inside each class. ``class_metrics``
measures both; ``plot_class_histogram`` draws the two distributions; ``plot_dev_curve`` draws dev
Spearman over training steps; ``save_figure`` writes any figure atomically.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import spearmanr

from mixsp_core.io import atomic_write

FIGURE_DPI = 120


def overlap_coefficient(a: np.ndarray, b: np.ndarray, bins: int = 50) -> float:
    """Overlapping coefficient of two samples' distributions: ``sum_bins min(p_a, p_b)`` with both
    histograms normalised to probability over the same ``bins`` equal-width bins spanning both
    samples. 1 = identical distributions, 0 = disjoint."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.size == 0 or b.size == 0:
        raise ValueError("overlap_coefficient needs two non-empty samples")
    low, high = min(a.min(), b.min()), max(a.max(), b.max())
    if high <= low:
        return 1.0
    edges = np.linspace(low, high, bins + 1)
    pa = np.histogram(a, edges)[0] / a.size
    pb = np.histogram(b, edges)[0] / b.size
    return float(np.minimum(pa, pb).sum())


def _spearman(pred: np.ndarray, gold: np.ndarray) -> float | None:
    if pred.size < 3 or np.all(gold == gold[0]) or np.all(pred == pred[0]):
        return None
    return float(spearmanr(pred, gold).statistic * 100)


def class_metrics(scores: Sequence[float], gold: Sequence[float], threshold: float = 4.0,
                  bins: int = 50) -> dict[str, Any]:
    """Upper/lower measurements of predicted similarities against gold (0-5 scale).

    Returns ``overlap`` (coefficient above), ``spearman_upper`` / ``spearman_lower`` (x100, within
    each class; None when undefined), ``n_upper``, ``n_lower``.
    """
    scores, gold = np.asarray(scores, dtype=np.float64), np.asarray(gold, dtype=np.float64)
    if scores.shape != gold.shape:
        raise ValueError(f"scores {scores.shape} and gold {gold.shape} differ in shape")
    upper = gold >= threshold
    result: dict[str, Any] = {"n_upper": int(upper.sum()), "n_lower": int((~upper).sum())}
    result["overlap"] = (overlap_coefficient(scores[upper], scores[~upper], bins)
                         if upper.any() and (~upper).any() else None)
    result["spearman_upper"] = _spearman(scores[upper], gold[upper])
    result["spearman_lower"] = _spearman(scores[~upper], gold[~upper])
    return result


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | Path, dpi: int = FIGURE_DPI) -> Path:
    """Write the matplotlib figure ``fig`` to ``path`` atomically (parent folders created), in the format
    its suffix names (matplotlib's default format when it has none). Returns ``path``."""
    import matplotlib

    path = Path(path)
    # Named explicitly: matplotlib would read the format off the temporary file's suffix.
    fmt = path.suffix[1:] or matplotlib.rcParams["savefig.format"]
    return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format=fmt))


def plot_class_histogram(scores: Sequence[float], gold: Sequence[float], path: str | Path,
                         threshold: float = 4.0, title: str = "", bins: int = 50) -> dict[str, Any]:
    """Histogram of predicted similarity for gold-upper vs gold-lower pairs, saved as ``path`` (PNG);
    returns :func:`class_metrics` (the overlap is printed on the figure)."""
    plt = _pyplot()
    scores, gold = np.asarray(scores, dtype=np.float64), np.asarray(gold, dtype=np.float64)
    metrics = class_metrics(scores, gold, threshold, bins)
    upper = gold >= threshold
    edges = np.linspace(scores.min(), scores.max(), bins + 1) if scores.size else bins
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(scores[~upper], bins=edges, alpha=0.6, density=True, label=f"gold < {threshold:g} (n={metrics['n_lower']})")
    ax.hist(scores[upper], bins=edges, alpha=0.6, density=True, label=f"gold >= {threshold:g} (n={metrics['n_upper']})")
    ax.set_xlabel("predicted similarity")
    ax.set_ylabel("density")
    overlap = metrics["overlap"]
    ax.set_title(f"{title}  overlap = {overlap:.3f}" if overlap is not None else title)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return metrics


def plot_dev_curve(history: Sequence[dict[str, Any]], path: str | Path,
                   keys: Sequence[str] = ("STSBenchmark-dev", "SICK-trial", "primary")) -> Path:
    """Dev Spearman over steps; ``history`` rows hold ``step`` and a value per key in ``keys``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in keys:
        points = [(row["step"], row[key]) for row in history if row.get(key) is not None]
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, marker="o", label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("Spearman x100")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = save_figure(fig, path)
    plt.close(fig)
    return path
