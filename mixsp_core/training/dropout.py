"""Dropout schedules (``train.dropout_schedule``), the three schemes compared by 2-Tier SimCSE (Wang, Zhou &
Wang 2025, "2-Tier SimCSE: Elevating BERT for Robust Sentence Embeddings"), where dropout is SimCSE's only
augmentation:

* ``standard``: every dropout of the encoder at the fixed rate ``dropout_p`` (SimCSE's 0.1);
* ``curriculum``: the rate rises linearly from ``dropout_p_start`` at the first step to ``dropout_p_end`` at
  the last (curriculum dropout: easy views first, harder ones later; the paper gives no formula, linear is
  assumed);
* ``adaptive``: the rate follows the training loss. Rule (assumed, the paper gives none): with ``L0`` the
  first step's total loss and ``A`` the moving average of the losses so far
  (``A <- m * A + (1 - m) * loss``, ``m = dropout_loss_momentum``, ``A = L0`` after the first step),
  ``p = p_start + (p_end - p_start) * clip(1 - A / L0, 0, 1)``: the further the loss has fallen, the easier
  the task has become, so the harder the views are made. The first step uses ``p_start``.
* ``none`` (the default): the encoder keeps the rates of its own config; nothing is set.

The rate is set on the ``p`` of every ``nn.Dropout`` of the encoder before each step. That reaches
attention dropout too: transformers' BERT / MPNet attention reads ``self.dropout.p`` at every call
(checked on transformers 5.23). Evaluation runs in eval mode, where dropout is off whatever ``p`` is; a
checkpoint loads with its config's own rates, so a later stage starts from those again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torch import nn

from mixsp_core.training.config import TrainConfig


def set_dropout(module: nn.Module, p: float) -> int:
    """Set ``p`` of every ``nn.Dropout`` under ``module``; returns how many were set."""
    count = 0
    for child in module.modules():
        if isinstance(child, nn.Dropout):
            child.p = p
            count += 1
    return count


def dropout_rates(module: nn.Module) -> list[float]:
    """The ``p`` of every ``nn.Dropout`` under ``module``, in module order."""
    return [child.p for child in module.modules() if isinstance(child, nn.Dropout)]


@dataclass
class DropoutSchedule:
    """The dropout rate of each step of one run (see the module doc). ``first_loss`` and ``average`` are the
    adaptive rule's state, saved with the resumable checkpoint so a resumed run sets the same rates."""

    kind: str = "none"
    p: float = 0.1
    p_start: float = 0.05
    p_end: float = 0.15
    momentum: float = 0.9
    total_steps: int = 1
    first_loss: float | None = None
    average: float | None = None

    @classmethod
    def from_config(cls, train: TrainConfig, total_steps: int) -> DropoutSchedule:
        return cls(train.dropout_schedule, train.dropout_p, train.dropout_p_start, train.dropout_p_end,
                   train.dropout_loss_momentum, max(1, total_steps))

    def rate(self, step: int) -> float | None:
        """The rate of step ``step`` (0-based); None for ``none`` (leave the encoder's own rates)."""
        if self.kind == "standard":
            return self.p
        if self.kind == "curriculum":
            return self.p_start + (self.p_end - self.p_start) * min(1.0, step / max(1, self.total_steps - 1))
        if self.kind == "adaptive":
            if self.average is None or self.first_loss is None or self.first_loss <= 0:
                return self.p_start
            progress = min(1.0, max(0.0, 1.0 - self.average / self.first_loss))
            return self.p_start + (self.p_end - self.p_start) * progress
        return None

    def observe(self, loss: float) -> None:
        """Record a step's total training loss (what the adaptive rule reads; a non-finite loss is ignored)."""
        if self.kind != "adaptive" or not math.isfinite(loss):
            return
        if self.first_loss is None or self.average is None:
            self.first_loss = self.average = loss
        else:
            self.average = self.momentum * self.average + (1.0 - self.momentum) * loss

    def apply(self, model: nn.Module, step: int) -> float | None:
        """Set the rate of ``step`` on the encoder of ``model`` (the model itself when it has none)."""
        p = self.rate(step)
        if p is not None:
            set_dropout(getattr(model, "encoder", model), p)
        return p

    def state_dict(self) -> dict[str, Any]:
        return {"first_loss": self.first_loss, "average": self.average}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        state = state or {}
        self.first_loss, self.average = state.get("first_loss"), state.get("average")
