"""Prefix truncation: keep the first k dims (Matryoshka-trained vectors, or the "Redundancy" baseline)."""

from __future__ import annotations

from typing import Any

import numpy as np

from mixsp_core.compress.transform import Transform, register
from mixsp_core.errors import ConfigError


@register
class TruncateTransform(Transform):
    """``y = x[:, :dims]``; fitting only records (and checks) the input width."""

    kind = "truncate"

    def __init__(self, dims: int):
        super().__init__()
        if isinstance(dims, bool) or not isinstance(dims, int) or dims < 1:
            raise ConfigError("truncate.dims", f"must be a positive integer, got {dims!r}")
        self.dims = dims

    def get_config(self) -> dict[str, Any]:
        return {"dims": self.dims}

    def _fit(self, x: np.ndarray) -> None:
        if self.dims > x.shape[1]:
            raise ConfigError("truncate.dims", f"{self.dims} exceeds the embedding width {x.shape[1]}")

    def load_state(self, tensors: dict[str, np.ndarray], input_dim: int) -> None:
        if self.dims > input_dim:
            raise ValueError(f"truncate to {self.dims} dims of {input_dim}-dim vectors")
        super().load_state(tensors, input_dim)

    def _apply(self, x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x[:, : self.dims])

    def _output_dim(self, input_dim: int) -> int:
        return self.dims

    def affine(self) -> tuple[np.ndarray, np.ndarray]:
        """The first ``dims`` rows of the identity, no bias."""
        if self.input_dim is None:
            raise RuntimeError("truncate: not fitted")
        return np.eye(self.dims, self.input_dim, dtype=np.float32), np.zeros(self.dims, dtype=np.float32)
