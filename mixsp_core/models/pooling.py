"""Pool token states into one sentence vector (differentiable torch ops)."""

from __future__ import annotations

from typing import Literal

import torch

PoolingName = Literal["mean", "cls"]
POOLINGS: tuple[str, ...] = ("mean", "cls")


def mean_pool(last_hidden_state: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token states where ``attention_mask`` is 1.

    ``last_hidden_state``: (batch, tokens, dim); ``attention_mask``: (batch, tokens) of 0/1.
    Returns (batch, dim) in the hidden state's dtype. A row with no tokens gives zeros, not NaN.
    """
    if last_hidden_state.dim() != 3 or attention_mask.shape != last_hidden_state.shape[:2]:
        raise ValueError(
            f"mean_pool: expected hidden (B, T, D) and mask (B, T), got {tuple(last_hidden_state.shape)} "
            f"and {tuple(attention_mask.shape)}"
        )
    mask = attention_mask.unsqueeze(-1).to(last_hidden_state.dtype)
    summed = (last_hidden_state * mask).sum(dim=1)
    counts = mask.sum(dim=1).clamp(min=1e-9)  # same floor as sentence-transformers
    return summed / counts


def cls_pool(last_hidden_state: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The first token's state (``[CLS]``); ``attention_mask`` is accepted for a uniform signature."""
    if last_hidden_state.dim() != 3:
        raise ValueError(f"cls_pool: expected hidden (B, T, D), got {tuple(last_hidden_state.shape)}")
    return last_hidden_state[:, 0]


def pool(name: str, last_hidden_state: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Apply the pooling called ``name`` (``"mean"`` or ``"cls"``)."""
    if name == "mean":
        return mean_pool(last_hidden_state, attention_mask)
    if name == "cls":
        return cls_pool(last_hidden_state, attention_mask)
    raise ValueError(f"unknown pooling {name!r}; expected one of {POOLINGS}")
