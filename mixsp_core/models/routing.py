"""MixSP's router and projectors ("space decomposition").

A :class:`Router` maps a routing input (e.g. a sentence's pooled state and its [CLS] state) to
probabilities over K projectors. A :class:`Projector` is the published MLP ``d -> mult*d -> d`` with
ReLU. :class:`RoutedProjector` combines them:

* ``hard`` (published): keep only the top-1 probability p, *not* renormalised, so
  ``z = p * Projector_top(h)`` and the router still gets a gradient through p;
* ``soft``: ``z = sum_k p_k * Projector_k(h)``;
* K = 1: one projector and no router (``z = Projector(h)``), the "no routing" ablation;
* K = 0: identity (no projector at all).

Convention shared with the routing loss: projector 0 is "lower", projector 1 is "upper".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

LOWER, UPPER = 0, 1


class Projector(nn.Module):
    """MLP ``d -> mult*d -> d`` with ReLU (published).

    With ``residual`` the input is added to the output and the last layer starts at zero, so the
    projector starts as the identity: a pretrained encoder's embedding passes unchanged at step 0
    instead of through a random MLP (the project's option for the ``bi`` student; not published).
    """

    def __init__(self, dim: int, mult: int = 10, residual: bool = False):
        super().__init__()
        self.fc1 = nn.Linear(dim, dim * mult)
        self.fc2 = nn.Linear(dim * mult, dim)
        self.residual = residual
        if residual:
            nn.init.zeros_(self.fc2.weight)
            nn.init.zeros_(self.fc2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fc2(torch.relu(self.fc1(x)))
        return out + x if self.residual else out


class Router(nn.Module):
    """``Linear(d_in, K)`` then softmax: expects ``[batch, d_in]``, returns probabilities ``[batch, K]``."""

    def __init__(self, in_dim: int, num_projectors: int):
        super().__init__()
        self.gate = nn.Linear(in_dim, num_projectors)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.gate(x), dim=-1)


@dataclass
class RoutingOutput:
    """What a routed projection produced.

    ``z``: ``[batch, d]``; ``probs``: full router probabilities ``[batch, K]`` (None without a router);
    ``gate``: the weights actually applied (top-1 masked for hard routing), the input of the routing
    loss; ``choice``: argmax projector per row.
    """

    z: torch.Tensor
    probs: torch.Tensor | None
    gate: torch.Tensor | None
    choice: torch.Tensor | None


class RoutedProjector(nn.Module):
    """K projectors of width ``dim`` behind a router over ``router_dim`` inputs.

    ``forward(h, router_input)``: ``h`` ``[batch, dim]`` is what the projectors transform,
    ``router_input`` ``[batch, router_dim]`` is what the router sees.
    """

    def __init__(self, dim: int, router_dim: int, num_projectors: int = 2, mode: str = "hard",
                 mult: int = 10, residual: bool = False):
        super().__init__()
        if mode not in ("hard", "soft"):
            raise ValueError(f"routing mode must be 'hard' or 'soft', got {mode!r}")
        if num_projectors < 0:
            raise ValueError(f"num_projectors must be >= 0, got {num_projectors}")
        self.dim = dim
        self.mode = mode
        self.num_projectors = num_projectors
        self.projectors = nn.ModuleList(Projector(dim, mult, residual) for _ in range(num_projectors))
        self.router = Router(router_dim, num_projectors) if num_projectors >= 2 else None

    def forward(self, h: torch.Tensor, router_input: torch.Tensor | None = None) -> RoutingOutput:
        if self.num_projectors == 0:
            return RoutingOutput(h, None, None, None)
        if self.router is None:
            return RoutingOutput(self.projectors[0](h), None, None, None)
        if router_input is None:
            raise ValueError("a routed projector needs router_input")
        probs = self.router(router_input)
        choice = probs.argmax(dim=-1)
        if self.mode == "hard":
            # top-1 kept as is (not renormalised to 1), as in the published code
            gate = torch.zeros_like(probs).scatter(1, choice[:, None], probs.gather(1, choice[:, None]))
        else:
            gate = probs
        # K is small (2): running every projector and weighting is simpler than gathering rows
        outs = torch.stack([proj(h) for proj in self.projectors], dim=1)  # [batch, K, dim]
        z = torch.einsum("bk,bkd->bd", gate.to(outs.dtype), outs)
        return RoutingOutput(z, probs, gate, choice)
