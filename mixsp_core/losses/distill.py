"""HPD distillation: MSE between the student's k-dim output and the PCA_k-projected teacher embedding."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class DistillLoss(nn.Module):
    """``mean((student - target) ** 2)`` over all elements.

    Expects ``student`` ``[batch, k]`` (the student's output layer, before normalisation) and
    ``target`` ``[batch, k]``: the teacher's embeddings of the same sentences projected by the fixed
    uncentred PCA of :func:`fit_pca_projection`.
    """

    def forward(self, student: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(student.float(), target.to(student.device).float())


def fit_pca_projection(teacher: np.ndarray, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Fit HPD's projection on teacher embeddings ``(n, D)`` and apply it.

    As published there is no mean-centring and no bias: the components are the top-k right singular
    vectors of the raw matrix (scikit-learn's TruncatedSVD). Returns ``(targets (n, k) float32,
    components (k, D) float32)``; ``targets = teacher @ components.T``.
    """
    from sklearn.decomposition import TruncatedSVD

    teacher = np.asarray(teacher, dtype=np.float32)
    if teacher.ndim != 2 or not 1 <= k < teacher.shape[1]:
        raise ValueError(f"need teacher embeddings (n, D) with 1 <= k < D; got {teacher.shape} and k={k}")
    if teacher.shape[0] <= k:
        raise ValueError(f"need more than k={k} teacher embeddings to fit PCA, got {teacher.shape[0]}")
    svd = TruncatedSVD(n_components=k, algorithm="randomized", n_iter=7, random_state=seed).fit(teacher)
    components = svd.components_.astype(np.float32)
    return (teacher @ components.T).astype(np.float32), components
