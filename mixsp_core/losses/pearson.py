"""Pearson-correlation loss (Pcc-tuning): 1 - r between predicted similarities and gold."""

from __future__ import annotations

import torch
from torch import nn


class PearsonLoss(nn.Module):
    """``1 - pearson(cos, gold)`` over the batch.

    Expects ``cos`` ``[batch]`` and ``gold`` ``[batch]`` (at least 2 pairs). A batch with constant gold
    (or constant predictions) has no defined correlation and gives 0 with no gradient signal.
    """

    def __init__(self, eps: float = 1e-8):
        super().__init__()
        self.eps = eps

    def forward(self, cos: torch.Tensor, gold: torch.Tensor) -> torch.Tensor:
        x = cos.float().reshape(-1)
        y = gold.to(x.device).float().reshape(-1)
        if x.numel() < 2 or torch.all(y == y[0]):
            return x.sum() * 0.0
        xc, yc = x - x.mean(), y - y.mean()
        r = (xc * yc).sum() / (xc.norm() * yc.norm()).clamp(min=self.eps)
        return 1.0 - r
