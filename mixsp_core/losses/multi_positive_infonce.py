"""Multi-positive InfoNCE for retrieval batches (CoDiEmb's IR objective, with several positives per query).

Variant: the positives are summed *inside* the log (MIL-NCE, Miech et al. 2020; SupCon's L_in, Khosla et al.
2020): a query is rewarded for putting its probability mass on any of its positives, rather than for each
positive separately (SupCon's L_out averages -log p over positives, which pushes positives of one query apart
from each other).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MultiPositiveInfoNCELoss(nn.Module):
    """``-log( sum_{p in P_i} exp(cos(q_i, p) / T) / sum_{c in C} exp(cos(q_i, c) / T) )``, mean over queries.

    Expects ``queries`` ``[q, dim]``, ``candidates`` ``[c, dim]`` (every query's positives and hard negatives
    of the batch, concatenated) and ``positive_mask`` ``[q, c]`` bool (True where candidate c is a positive of
    query i). Every candidate that is not one of query i's positives, i.e. the other queries' positives
    (in-batch negatives) and every hard negative, is a negative of query i. Each query needs >= 1 positive.
    """

    def __init__(self, temperature: float = 0.05):
        super().__init__()
        self.temperature = temperature

    def forward(self, queries: torch.Tensor, candidates: torch.Tensor, positive_mask: torch.Tensor) -> torch.Tensor:
        if positive_mask.shape != (queries.shape[0], candidates.shape[0]):
            raise ValueError(f"positive_mask {tuple(positive_mask.shape)} must be (queries, candidates) = "
                             f"({queries.shape[0]}, {candidates.shape[0]})")
        mask = positive_mask.to(device=queries.device, dtype=torch.bool)
        if not bool(mask.any(dim=1).all()):
            raise ValueError("every query needs at least one positive candidate")
        logits = F.normalize(queries.float(), dim=-1) @ F.normalize(candidates.float(), dim=-1).T / self.temperature
        positive = torch.logsumexp(logits.masked_fill(~mask, float("-inf")), dim=1)
        return (torch.logsumexp(logits, dim=1) - positive).mean()
