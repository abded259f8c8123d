"""Listwise ranking term (CoDiEmb's PRO loss adapted to STS)."""

from __future__ import annotations

import torch
from torch import nn


class ListwiseRankLoss(nn.Module):
    """PRO: for each pair k (in gold order), a softmax over k and the pairs ranked strictly below it.

    Expects ``cos`` ``[batch]`` and ``gold`` ``[batch]``. With ``s = cos / T`` and ``w_kj = gold_k -
    gold_j`` for every j with ``gold_j < gold_k - eps``, step k contributes
    ``-log softmax([s_k * max_j w_kj, s_j * w_kj ...])[0]``; the loss is the mean over steps that have at
    least one lower pair (0 when there is none). Gold differences weight the logits, so confusing
    far-apart pairs costs more than confusing near neighbours.
    """

    def __init__(self, temperature: float = 0.05, eps: float = 1e-8):
        super().__init__()
        self.temperature = temperature
        self.eps = eps

    def forward(self, cos: torch.Tensor, gold: torch.Tensor) -> torch.Tensor:
        s = cos.float().reshape(-1) / self.temperature
        g = gold.to(s.device).float().reshape(-1)
        weights = g[:, None] - g[None, :]  # w[k, j] = gold_k - gold_j
        below = weights > self.eps
        rows = below.any(dim=1)
        if not rows.any():
            return s.sum() * 0.0
        w_top = torch.where(below, weights, torch.zeros_like(weights)).max(dim=1).values
        logits_neg = torch.where(below, s[None, :] * weights, torch.full_like(weights, float("-inf")))
        logit_pos = (s * w_top)[:, None]
        all_logits = torch.cat([logit_pos, logits_neg], dim=1)[rows]
        log_prob = all_logits[:, 0] - torch.logsumexp(all_logits, dim=1)
        return -log_prob.mean()
