"""JTCSE in the training loop: the twin towers' setup, their loss terms, and their share of the checkpoint.

The modulus constraint (``loss.modulus`` / ``loss.modulus_nli``, :class:`~mixsp_core.losses.ModulusLoss`) is
computed by :class:`~mixsp_core.training.objective.Objective` itself, on the embeddings the STS and InfoNCE
terms see. With ``model.twin_cross_attention`` the loop also holds :class:`~mixsp_core.models.twin.TwinTowers`
(tower B + cross-attention) beside the student (tower A), and each step adds, on the step's batch of pairs:

* ``twin_ensemble``: A(cos of the ensemble embeddings, gold), A the weighted STS terms, plus the modulus term
  on the ensemble's positive pairs when ``loss.modulus`` > 0; this trains tower B, the cross-attention and
  (through its token states) tower A's encoder;
* ``twin_distill``: the MSE between tower A's plain in-batch cosines (no cross-attention: what the saved
  model computes) and the ensemble's, the ensemble detached (it is the teacher; only tower A learns from it).

Tower A keeps every term it has without the twin (its own STS terms, routing, ...), so the saved model is
trained directly and by distillation. Tower A is encoded once more for the twin (its own dropout mask), tower B
once: a twin step costs about 1.5x a plain one. Dev selection scores tower A alone (the checkpoint); one
process only (under torchrun the twin's gradients would not be averaged: refused).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mixsp_core.errors import ConfigError
from mixsp_core.losses import SimilarityDistillLoss
from mixsp_core.models.twin import TWIN_DIR, TwinTowers
from mixsp_core.training.config import RunConfig
from mixsp_core.training.objective import make_optimizer

TWIN_SEED_OFFSET = 1  # tower B's heads and noise are drawn from seed + 1: never the student's own draws


def build_twin(config: RunConfig, model: nn.Module, distributed: bool) -> TwinTowers | None:
    """Tower B and the cross-attention for ``model`` (tower A, already on its device), or None when
    ``model.twin_cross_attention`` is off. ``model``'s recorded config gets ``twin_cross_attention: false``:
    the checkpoint it is saved as is a plain student."""
    if not config.model.twin_cross_attention:
        return None
    if distributed:
        raise ConfigError("model.twin_cross_attention", "runs in one process only (not under torchrun)")
    twin = TwinTowers.build(model, config.seed + TWIN_SEED_OFFSET)
    model.model_config = dataclasses.replace(model.model_config, twin_cross_attention=False)
    twin.tower.model_config = model.model_config
    return twin


def add_twin_params(optimizer: torch.optim.Optimizer, twin: TwinTowers | None, config: RunConfig) -> None:
    """Give ``optimizer`` the twin's parameters, grouped as the student's are (tower B's encoder at
    ``train.lr``, its heads and the cross-attention at ``train.head_lr``; no decay on biases and norms).
    Call it before the learning-rate schedule is built, so the schedule drives these groups too."""
    if twin is None:
        return
    for part in (twin.tower, twin.cross):
        for group in make_optimizer(part, config).param_groups:
            optimizer.add_param_group(group)


def trained_modules(model: nn.Module, twin: TwinTowers | None) -> nn.Module:
    """What the update clips and steps: the student, with the twin when there is one."""
    return model if twin is None else nn.ModuleList([model, twin])


def save_twin(twin: TwinTowers | None, checkpoint: Path, step: int) -> None:
    """The twin's state inside the resumable checkpoint ``checkpoint`` (``last/``), after it is written."""
    if twin is not None:
        twin.save(Path(checkpoint) / TWIN_DIR, step)


def restore_twin(twin: TwinTowers | None, checkpoint: Path, step: int) -> None:
    """Load the twin state :func:`save_twin` wrote with the ``last/`` the run resumes from (at ``step``)."""
    if twin is not None:
        twin.load_state(Path(checkpoint) / TWIN_DIR, step)


class TwinTerms(nn.Module):
    """The twin's loss terms for one batch of pairs (see the module doc); ``objective`` supplies the STS
    terms, the modulus term, their weights and the upper threshold."""

    def __init__(self, twin: TwinTowers):
        super().__init__()
        self.twin = twin
        self.distill = SimilarityDistillLoss()

    def forward(self, objective: nn.Module, model: nn.Module, left: list[str], right: list[str],
                gold: torch.Tensor) -> dict[str, torch.Tensor]:
        weights, n = objective.weights, len(left)
        batch = model.tokenize(left + right)
        hidden_a = model.encoder(**batch).last_hidden_state
        ensemble = self.twin.ensemble(model, batch, hidden_a)
        a, b = ensemble[:n].float(), ensemble[n:].float()
        terms: dict[str, torch.Tensor] = {}
        value = objective.sts(F.cosine_similarity(a, b, dim=-1), gold)
        if "modulus" in weights:
            value = value + weights["modulus"] * objective.modulus(a, b, gold >= objective.threshold)
        terms["twin_ensemble"] = value
        if "twin_distill" in weights:
            single = model.head(model.route(hidden_a, batch["attention_mask"]).z)
            terms["twin_distill"] = self.distill(single, ensemble.detach())
        return terms
