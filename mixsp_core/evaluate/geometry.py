"""Redundancy and geometry of an embedding space: dev Spearman of prefixes, intrinsic dimension, isotropy.

- **Prefix Spearman**: the dev STS Spearman of the first ``k`` dims (k = 8, 16, 32, ... and the full width)
  beside the Spearman of a PCA to ``k`` dims fitted on corpus vectors. A prefix curve that stays flat says
  the trailing dims are redundant (Matryoshka-style training, or a PCA head); the PCA curve says how much
  a linear ``k``-dim summary keeps.
- **TwoNN intrinsic dimension** (Facco, d'Errico, Rodriguez & Laio 2017, "Estimating the intrinsic
  dimension of datasets by a minimal neighborhood information"): for each point the ratio
  ``mu = r2 / r1`` of its second to first nearest-neighbour distance (Euclidean, scikit-learn
  ``NearestNeighbors``) follows a Pareto law ``F(mu) = 1 - mu^-d``; ``d`` is the slope, through the origin,
  of ``-log(1 - F_emp(mu))`` against ``log(mu)``, fitted on the smallest 90% of the ratios (the paper's
  discard of the largest 10%, whose ``F_emp`` is noisy). Points with a duplicate (``r1 = 0``) are left out.
- **IsoScore** (Rudman, Gillman, Rayne & Eickhoff 2022, "IsoScore: measuring the uniformity of embedding
  space utilization"): the variances along the principal axes, normalised to length ``sqrt(n)``; their
  distance ``delta`` to the all-ones vector gives the fraction of dims used ``phi`` and
  ``iota = (n phi - 1) / (n - 1)``: 1 for isotropic data, 0 when all variance lies on one axis.
- **I(W)** (Mu & Viswanath 2018, "All-but-the-Top"): ``min_c Z(c) / max_c Z(c)``, ``Z(c) = sum_i exp(c . x_i)``
  over the eigenvectors ``c`` of ``X^T X`` of the *uncentred* vectors. We take both signs of each eigenvector
  (an eigenvector's sign is arbitrary; with both the number does not depend on it). 1 = isotropic.
- **Mean pairwise cosine** of distinct rows (0 for an isotropic cloud around the origin; near 1 for the
  "narrow cone" of anisotropic embeddings).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from mixsp_core.compress.pca import PCATransform
from mixsp_core.evaluate.sts import cosine_rows, primary_metric, score_table

PREFIX_START = 8


def prefix_sizes(width: int, start: int = PREFIX_START) -> list[int]:
    """8, 16, 32, ... below ``width``, then ``width`` itself."""
    sizes, k = [], start
    while k < width:
        sizes.append(k)
        k *= 2
    return [*sizes, width]


def twonn_dimension(x: np.ndarray, discard_fraction: float = 0.1) -> float:
    """TwoNN intrinsic dimension of the rows of ``x`` (see the module docstring)."""
    from sklearn.neighbors import NearestNeighbors

    x = np.asarray(x, dtype=np.float64)
    if len(x) < 3:
        raise ValueError(f"TwoNN needs at least 3 points, got {len(x)}")
    distances, _ = NearestNeighbors(n_neighbors=3).fit(x).kneighbors(x)
    r1, r2 = distances[:, 1], distances[:, 2]  # column 0 is the point itself
    keep = r1 > 0
    mu = np.sort(r2[keep] / r1[keep])
    n = len(mu)
    if n < 3:
        raise ValueError("TwoNN: fewer than 3 points without a duplicate")
    empirical = np.arange(1, n + 1) / n
    used = slice(0, max(2, int(np.floor(n * (1 - discard_fraction)))))
    xs, ys = np.log(mu[used]), -np.log1p(-empirical[used])
    denominator = float(xs @ xs)
    return float(xs @ ys / denominator) if denominator > 0 else float("nan")


def isoscore(x: np.ndarray) -> float:
    """IsoScore of the rows of ``x``: 1 isotropic, 0 one-dimensional (Rudman et al. 2022)."""
    x = np.asarray(x, dtype=np.float64)
    n = x.shape[1]
    if len(x) < 2 or n < 2:
        raise ValueError(f"IsoScore needs >= 2 points of >= 2 dims, got {x.shape}")
    variances = np.clip(np.linalg.eigvalsh(np.cov(x, rowvar=False)), 0.0, None)  # along the principal axes
    norm = np.linalg.norm(variances)
    if norm == 0:
        return 0.0
    normalised = np.sqrt(n) * variances / norm
    delta = np.linalg.norm(normalised - 1) / np.sqrt(2 * (n - np.sqrt(n)))
    phi = (n - delta**2 * (n - np.sqrt(n))) ** 2 / n**2
    return float((n * phi - 1) / (n - 1))


def partition_isotropy(x: np.ndarray) -> float:
    """Mu & Viswanath's I(W) of the (uncentred) rows of ``x``: ``min Z(c) / max Z(c)`` over ``±`` the
    eigenvectors of ``X^T X``; computed in log space."""
    from scipy.special import logsumexp

    x = np.asarray(x, dtype=np.float64)
    _, vectors = np.linalg.eigh(x.T @ x)
    projections = x @ vectors
    log_z = np.concatenate([logsumexp(projections, axis=0), logsumexp(-projections, axis=0)])
    return float(np.exp(log_z.min() - log_z.max()))


def mean_pairwise_cosine(x: np.ndarray) -> float:
    """Mean cosine over all pairs of distinct rows, in O(n d): ``(|sum u_i|^2 - n) / (n (n - 1))``."""
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    if n < 2:
        raise ValueError("mean pairwise cosine needs at least 2 rows")
    units = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    total = units.sum(axis=0)
    return float((total @ total - n) / (n * (n - 1)))


def space_geometry(corpus_vectors: np.ndarray) -> dict[str, Any]:
    """Intrinsic dimension and isotropy of corpus embeddings."""
    x = np.asarray(corpus_vectors, dtype=np.float64)
    return {"sentences": int(len(x)), "width": int(x.shape[1]), "twonn_dimension": twonn_dimension(x),
            "isoscore": isoscore(x), "partition_isotropy": partition_isotropy(x),
            "mean_cosine": mean_pairwise_cosine(x)}


def pair_rows(pairs: pd.DataFrame, sentences: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Row indices into ``sentences`` (each unique sentence once) of each pair's two sides."""
    row_of = {s: i for i, s in enumerate(sentences)}
    return (np.array([row_of[s] for s in pairs["sentence1"]]), np.array([row_of[s] for s in pairs["sentence2"]]))


def dev_scores(pairs: pd.DataFrame, vectors: np.ndarray, left: np.ndarray,
               right: np.ndarray) -> tuple[float | None, dict[str, float]]:
    """The dev mean and each task's Spearman (x100) of cosine on ``vectors`` (one row per unique sentence)."""
    tasks = score_table(pairs, cosine_rows(vectors[left], vectors[right]))
    return primary_metric({"tasks": tasks}), {name: float(row["spearman"]) for name, row in tasks.items()}


def prefix_spearman(pairs: pd.DataFrame, vectors: np.ndarray, left: np.ndarray, right: np.ndarray,
                    fit_vectors: np.ndarray | None = None) -> list[dict[str, Any]]:
    """One row per prefix size: the dev Spearman of the first ``k`` dims (``prefix``, ``tasks``) and, with
    ``fit_vectors``, of a PCA to ``k`` dims fitted on them (``pca``; the full width: the vectors as they are)."""
    rows = []
    width = vectors.shape[1]
    sizes = prefix_sizes(width)
    projected = None
    if fit_vectors is not None and len(sizes) > 1:
        top = min(sizes[-2], len(fit_vectors))
        # PCA directions are nested: one fit to the largest k, then its first k outputs for each k
        projected = PCATransform(top).fit(fit_vectors).apply(vectors)
    for k in sizes:
        dev, tasks = dev_scores(pairs, vectors[:, :k], left, right)
        row: dict[str, Any] = {"dims": k, "prefix": dev, "tasks": tasks}
        if fit_vectors is not None:
            if k >= width:
                row["pca"] = dev
            elif projected is not None and k <= projected.shape[1]:
                row["pca"] = dev_scores(pairs, projected[:, :k], left, right)[0]
            else:
                row["pca"] = None
        rows.append(row)
    return rows
