"""Rank-KL (CoDiEmb): KL between a softmax of the gold ranks and a softmax of the similarities."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from scipy.stats import rankdata
from torch import nn


class RankKLLoss(nn.Module):
    """``KL(softmax(r / T) || softmax(cos / T))`` over the batch, T = 0.05 as published.

    Expects ``cos`` ``[batch]`` and ``gold`` ``[batch]``. ``r`` is the gold rank rescaled to [0, 1]
    (1 = most similar pair; ties share their average rank), so the target distribution puts the most
    mass on the most similar pairs and the loss cares about order, not gold magnitudes. The KL is
    summed over the batch's pairs (a distribution over pairs); a batch of one pair gives 0.
    """

    def __init__(self, temperature: float = 0.05):
        super().__init__()
        self.temperature = temperature

    def forward(self, cos: torch.Tensor, gold: torch.Tensor) -> torch.Tensor:
        cos = cos.float().reshape(-1)
        n = cos.numel()
        if n < 2:
            return cos.sum() * 0.0
        ranks = rankdata(gold.detach().float().cpu().numpy(), method="average")  # 1 = least similar
        ideal = torch.as_tensor((ranks - 1) / (n - 1), dtype=torch.float32, device=cos.device)
        target = F.softmax(ideal / self.temperature, dim=0)
        log_pred = F.log_softmax(cos / self.temperature, dim=0)
        return F.kl_div(log_pred, target, reduction="sum")
