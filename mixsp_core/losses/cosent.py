"""CoSENT: a pairwise ranking loss on cosine similarities (Su, 2022)."""

from __future__ import annotations

import torch
from torch import nn


class CoSENTLoss(nn.Module):
    """``log(1 + sum over (i, j) with gold_i > gold_j of exp(scale * (cos_j - cos_i)))``.

    Expects ``cos`` ``[batch]`` (the cosine of each pair's two embeddings) and ``gold`` ``[batch]``
    (any monotone scale, e.g. 0-5). Every pair is compared with every other pair of the batch; a batch
    whose gold scores are all equal gives 0. ``scale`` = 20 as published.
    """

    def __init__(self, scale: float = 20.0):
        super().__init__()
        self.scale = scale

    def forward(self, cos: torch.Tensor, gold: torch.Tensor) -> torch.Tensor:
        cos = cos.float().reshape(-1)
        gold = gold.to(cos.device).float().reshape(-1)
        diff = self.scale * (cos[None, :] - cos[:, None])  # diff[i, j] = s * (cos_j - cos_i)
        ordered = gold[:, None] > gold[None, :]
        terms = diff[ordered]
        # the leading 0 is the "1 +" inside the log
        return torch.logsumexp(torch.cat([terms.new_zeros(1), terms]), dim=0)
