"""Similarity distillation: the student's in-batch cosine similarities regressed on the teacher's."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SimilarityDistillLoss(nn.Module):
    """``mean((cos_student(i, j) - cos_teacher(i, j)) ** 2)`` over the pairs i < j of a batch.

    Expects ``student`` ``[batch, k]`` (any width) and ``teacher`` ``[batch, m]`` (the teacher's vectors of
    the same sentences, e.g. its PCA_k targets): only cosines are compared, so the widths need not match.
    Where HPD's MSE copies the teacher's coordinates, this copies what STS scores, the teacher's
    similarities, and leaves the student free to place them in its own basis. A batch of one sentence
    has no pair and gives 0.
    """

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        s = F.normalize(student.float(), dim=-1)
        t = F.normalize(teacher.to(student.device).float(), dim=-1)
        n = s.shape[0]
        if n < 2:
            return s.sum() * 0.0
        i, j = torch.triu_indices(n, n, offset=1, device=s.device)
        return F.mse_loss((s @ s.T)[i, j], (t @ t.T)[i, j])
