"""MixSP's routing loss: class-weighted BCE of the router's applied gate against the pair's class."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

# STS-B train as published: 4,343 lower vs 1,406 upper pairs
PUBLISHED_CLASS_COUNTS = (4343, 1406)


class RoutingLoss(nn.Module):
    """Published form: ``BCEWithLogits(gate, onehot(class), pos_weight=total / count_per_class)``.

    Expects ``gate`` ``[batch, 2]``: the weights the router applied (for hard routing the top-1
    probability, others zeroed; see :class:`mixsp_core.models.routing.RoutingOutput`), and ``upper``
    ``[batch]`` bool (gold >= 4 of 5). Column 0 is the lower projector, column 1 the upper one.
    As in the official code the gate *probabilities* are fed to BCE-with-logits (a sigmoid on top of
    them), and each column's positive term is weighted by the inverse frequency of its class
    (``class_counts`` = (lower, upper) in the training data).
    """

    def __init__(self, class_counts: Sequence[int] = PUBLISHED_CLASS_COUNTS):
        super().__init__()
        lower, upper = (float(c) for c in class_counts)
        if lower <= 0 or upper <= 0:
            raise ValueError(f"class_counts must both be positive, got {tuple(class_counts)}")
        total = lower + upper
        self.register_buffer("pos_weight", torch.tensor([total / lower, total / upper]), persistent=False)

    def forward(self, gate: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
        gate = gate.float()
        target = F.one_hot(upper.long().to(gate.device), num_classes=2).float()
        return F.binary_cross_entropy_with_logits(gate, target, pos_weight=self.pos_weight.to(gate.device))
