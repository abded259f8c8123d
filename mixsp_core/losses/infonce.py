"""In-batch InfoNCE with hard negatives, for NLI triplets (SimCSE-style supervised contrastive loss)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class InfoNCELoss(nn.Module):
    """Cross-entropy of each anchor against its positive among every positive and hard negative.

    Expects ``anchor``, ``positive``, ``negative``, each ``[batch, dim]`` (row i of each is one
    triplet: premise, entailed hypothesis, contradicted hypothesis). Logits are cosines / T
    (T = 0.05) against ``concat(positive, negative)``, so every other row's positive and every row's
    hard negative serve as negatives; the target of anchor i is column i.
    """

    def __init__(self, temperature: float = 0.05):
        super().__init__()
        self.temperature = temperature

    def forward(self, anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
        a = F.normalize(anchor.float(), dim=-1)
        candidates = F.normalize(torch.cat([positive, negative]).float(), dim=-1)
        logits = a @ candidates.T / self.temperature
        labels = torch.arange(a.shape[0], device=a.device)
        return F.cross_entropy(logits, labels)
