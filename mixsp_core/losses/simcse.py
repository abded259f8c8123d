"""Unsupervised SimCSE loss (Gao, Yao & Chen 2021, "SimCSE: Simple Contrastive Learning of Sentence
Embeddings"): each sentence encoded twice in train mode, the two dropout masks making the two views.

Followed as published: cosine similarities / T (T = 0.05), in-batch negatives, cross-entropy of view 1 of
sentence i against view 2 of every sentence, target column i. The official loss is one-directional
(``z1 @ z2.T``) and that is the default here; ``symmetric=True`` averages it with the transposed direction
(``z2`` against ``z1``), an option the paper does not use.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SimCSELoss(nn.Module):
    """In-batch contrastive loss between two views of the same sentences.

    Expects ``first`` and ``second``, each ``[batch, dim]`` (row i of both: sentence i, encoded twice with
    independent dropout masks; at least 2 rows, or there is no negative). Logits are
    ``cos(first_i, second_j) / T``; the target of row i is column i, every other row's second view is a
    negative. Returns the mean cross-entropy (with ``symmetric``: the mean of both directions).
    """

    def __init__(self, temperature: float = 0.05, symmetric: bool = False):
        super().__init__()
        self.temperature = temperature
        self.symmetric = symmetric

    def forward(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        a = F.normalize(first.float(), dim=-1)
        b = F.normalize(second.float(), dim=-1)
        logits = a @ b.T / self.temperature
        labels = torch.arange(a.shape[0], device=a.device)
        loss = F.cross_entropy(logits, labels)
        if self.symmetric:
            loss = (loss + F.cross_entropy(logits.T, labels)) / 2
        return loss
