"""Matryoshka and 2DMSE / ESE: the STS loss on embedding prefixes and on earlier layers.

Wraps a base STS loss ``A(cos, gold)`` (such as :class:`CoSENTLoss`) and returns::

    full_weight * A(e) + Σ_k A(e[:k])                                     (Matryoshka, k in ``dims``)
  + align_weight * D(e[:m], PCA_m(e))                                     (ESE alignment, m = ``ese_dim``)
  + w_i * [A(e_i) + Σ_k A(e_i[:k]) + align_weight * D(e_i[:m], PCA_m(e_i))]   (2DMSE / ESE, layer i)

``e`` is the final embedding, ``e_i`` the embedding computed from encoder layer i (1-based: i layers
applied), weighted ``w_i = 1 / (1 + ln(1 + i))`` as published. Per step one earlier layer is sampled
(2DMSE; ``layer_mode="sample"``), or every layer given is used and averaged (ESE; ``"all"``).
D = MSE + KL(softmax(y / T) || softmax(x / T)) * T with T = 1, and PCA_m is ESE's published batch
"PCA": softmax(eᵀe / √d) decomposed with ``torch.svd_lowrank`` (a detached target).
Prefix sizes not smaller than the embedding width are skipped (the full term covers them).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mixsp_core.errors import ConfigError

BaseLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
DEFAULT_DIMS = (32, 64, 128, 256)
LAYER_MODES = ("sample", "all")


def layer_weight(i: int) -> float:
    """Published weight of layer ``i`` (1-based): ``1 / (1 + ln(1 + i))``."""
    if i < 1:
        raise ValueError(f"layer index is 1-based, got {i}")
    return 1.0 / (1.0 + math.log(1.0 + i))


@torch.no_grad()
def ese_pca(embeddings: torch.Tensor, k: int) -> torch.Tensor:
    """ESE's top-k feature target (batch, k) from embeddings (batch, d); detached, float32."""
    m = embeddings.detach().float()
    d = m.shape[-1]
    # Outside autocast: under bf16 autocast the matmuls drop back to bf16, and CUDA has no bf16 QR.
    with torch.autocast(device_type=m.device.type, enabled=False):
        affinity = F.softmax(m.T @ m / math.sqrt(d), dim=-1)
        u, s, _ = torch.svd_lowrank(affinity, q=k)
        return m @ (u * s)


def alignment_loss(x: torch.Tensor, target: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """ESE's D(x, y) = MSE(x, y) + T * KL(softmax(y / T) || softmax(x / T)) (batch mean)."""
    x = x.float()
    target = target.float()
    mse = F.mse_loss(x, target)
    kl = F.kl_div(F.log_softmax(x / temperature, dim=-1), F.softmax(target / temperature, dim=-1),
                  reduction="batchmean")
    return mse + kl * temperature


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.float(), b.float(), dim=-1)


class MatryoshkaLoss(nn.Module):
    """The wrapper; see the module docstring for the objective.

    ``base_loss(cos [B], gold [B]) -> scalar``. ``dims``: prefix sizes (empty: no Matryoshka terms).
    ``ese_dim``: m of the ESE alignment (None: no alignment term). ``layer_mode``: ``sample`` or ``all``.
    ``seed``: the layer sampler's seed (its own RNG, so the model's RNG stream is untouched).
    """

    def __init__(self, base_loss: BaseLoss, dims: Sequence[int] = DEFAULT_DIMS, full_weight: float = 1.0,
                 ese_dim: int | None = 128, align_weight: float = 1.0, kl_temperature: float = 1.0,
                 layer_mode: str = "sample", seed: int = 0):
        super().__init__()
        dims = [int(k) for k in dims]
        if any(k < 1 for k in dims) or len(set(dims)) != len(dims):
            raise ConfigError("matryoshka.dims", f"must be distinct positive integers, got {dims}")
        if ese_dim is not None and ese_dim < 1:
            raise ConfigError("matryoshka.ese_dim", f"must be a positive integer or null, got {ese_dim}")
        if layer_mode not in LAYER_MODES:
            raise ConfigError("matryoshka.layer_mode", f"must be one of {LAYER_MODES}, got {layer_mode!r}")
        if kl_temperature <= 0:
            raise ConfigError("matryoshka.kl_temperature", f"must be > 0, got {kl_temperature}")
        if full_weight < 0 or align_weight < 0:
            raise ConfigError("matryoshka.full_weight", "weights must be >= 0")
        self.base_loss = base_loss
        self.dims = sorted(dims)
        self.full_weight = float(full_weight)
        self.ese_dim = ese_dim
        self.align_weight = float(align_weight)
        self.kl_temperature = float(kl_temperature)
        self.layer_mode = layer_mode
        self._rng = random.Random(seed)
        self.last_terms: dict[str, float] = {}

    def sample_layer(self, num_layers: int) -> int | None:
        """The earlier layer (1..num_layers-1) to compute this step; None for a one-layer encoder.

        Call it before the forward pass so only that layer's pooled state needs computing.
        """
        if num_layers < 2:
            return None
        return self._rng.randint(1, num_layers - 1)

    def _dims_for(self, width: int) -> list[int]:
        return [k for k in self.dims if k < width]

    def _align(self, e1: torch.Tensor, e2: torch.Tensor) -> torch.Tensor | None:
        m = self.ese_dim
        if m is None or self.align_weight == 0 or m >= e1.shape[-1]:
            return None
        both = torch.cat([e1, e2], dim=0)  # every sentence of the batch shapes the target
        return self.align_weight * alignment_loss(both[:, :m], ese_pca(both, m), self.kl_temperature)

    def _stack(self, e1: torch.Tensor, e2: torch.Tensor, gold: torch.Tensor, tag: str,
               full_weight: float) -> torch.Tensor:
        """Full + prefix + alignment terms for one pair of embedding batches."""
        total = full_weight * self.base_loss(_cos(e1, e2), gold)
        self.last_terms[f"{tag}/full"] = float(total.detach())
        for k in self._dims_for(e1.shape[-1]):
            term = self.base_loss(_cos(e1[:, :k], e2[:, :k]), gold)
            self.last_terms[f"{tag}/{k}"] = float(term.detach())
            total = total + term
        align = self._align(e1, e2)
        if align is not None:
            self.last_terms[f"{tag}/align"] = float(align.detach())
            total = total + align
        return total

    def forward(self, emb1: torch.Tensor, emb2: torch.Tensor, gold: torch.Tensor,
                layers1: Mapping[int, torch.Tensor] | None = None,
                layers2: Mapping[int, torch.Tensor] | None = None) -> torch.Tensor:
        """Loss for a batch of pairs: ``emb1``, ``emb2`` (B, d) final embeddings, ``gold`` (B,);
        ``layers1`` / ``layers2``: ``{layer i (1-based): (B, d_i)}`` embeddings from earlier layers
        (same keys in both), or None for Matryoshka on the final layer only."""
        if emb1.shape != emb2.shape or emb1.dim() != 2:
            raise ValueError(f"emb1 {tuple(emb1.shape)} and emb2 {tuple(emb2.shape)} must both be (B, d)")
        self.last_terms = {}
        total = self._stack(emb1, emb2, gold, "final", self.full_weight)
        if layers1:
            if layers2 is None or set(layers1) != set(layers2):
                raise ValueError("layers1 and layers2 must hold the same layer indices")
            chosen = sorted(layers1) if self.layer_mode == "all" else [self._rng.choice(sorted(layers1))]
            layer_total = torch.zeros((), device=emb1.device)
            for i in chosen:
                w = layer_weight(i)
                layer_total = layer_total + w * self._stack(layers1[i], layers2[i], gold, f"layer{i}", 1.0)
            total = total + layer_total / len(chosen)
        self.last_terms["total"] = float(total.detach())
        return total
