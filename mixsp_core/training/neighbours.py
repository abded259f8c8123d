"""Nearest neighbours by cosine, in chunks: shared by the distillation batches (anchors with their
neighbours) and the silver pairs (anchors with a neighbour at a drawn rank)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from mixsp_core.errors import ConfigError


def nearest_neighbours(vectors: np.ndarray, k: int, chunk: int = 1024, rows: np.ndarray | None = None) -> np.ndarray:
    """The ``k`` rows of highest cosine to each row (itself excluded), nearest first, shape ``(n, k)``;
    with ``rows``, to those rows only (shape ``(len(rows), k)``: silver pairs need their anchors' alone)."""
    if not 1 <= k < len(vectors):
        raise ConfigError("train.distill_neighbours", f"must be between 1 and {len(vectors) - 1} (the "
                          f"distillation sentences less one), got {k}")
    unit = F.normalize(torch.as_tensor(np.asarray(vectors, dtype=np.float32)), dim=1)
    queries = torch.arange(len(unit)) if rows is None else torch.as_tensor(np.asarray(rows, dtype=np.int64))
    out = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), chunk):
        part = queries[start:start + chunk]
        sims = unit[part] @ unit.T
        sims[torch.arange(len(part)), part] = -2.0  # not itself
        out[start:start + chunk] = sims.topk(k, dim=1).indices.numpy()
    return out
