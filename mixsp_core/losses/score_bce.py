"""The cross model's score loss (published): BCE-with-logits of the score head against gold / 5."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ScoreBCELoss(nn.Module):
    """``BCEWithLogits(logits, gold / max_score)``, mean over the batch.

    Expects ``logits`` ``[batch]`` from the cross model's ``Linear(2d, 1)`` head and ``gold``
    ``[batch]`` on the 0-``max_score`` scale (5 for STS).
    """

    def __init__(self, max_score: float = 5.0):
        super().__init__()
        self.max_score = max_score

    def forward(self, logits: torch.Tensor, gold: torch.Tensor) -> torch.Tensor:
        target = (gold.to(logits.device).float() / self.max_score).clamp(0.0, 1.0)
        return F.binary_cross_entropy_with_logits(logits.float().reshape(-1), target.reshape(-1))
