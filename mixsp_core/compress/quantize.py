"""Vector quantisation of the output: int8 (scalar, per-dim ranges calibrated on a corpus) and binary (sign).

int8 follows the scalar quantiser of FAISS (``SQ8``) and sentence-transformers' ``quantize_embeddings``:
each dim's range [lo, hi] is learned from calibration vectors and cut into 256 steps; an index stores the
int8 codes (1 byte per dim) and scores against the decoded values. ``apply`` returns those decoded
float32 vectors, ``store`` the codes.

binary keeps one bit per dim (x > threshold, threshold 0 unless ``center``); an index stores the packed
bits (ceil(d/8) bytes) and ranks by Hamming distance. ``apply`` returns the ±1 vectors, whose cosine is
1 - 2 * hamming / d, so Spearman on cosine equals Spearman on Hamming.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mixsp_core.compress.transform import Transform, register
from mixsp_core.errors import ConfigError


@register
class Int8Quantizer(Transform):
    """Per-dim scalar quantisation to int8.

    ``clip``: quantile cut at each end when calibrating (0 = min/max, as FAISS and sentence-transformers);
    values outside the calibrated range saturate at -128 / 127.
    """

    kind = "int8"
    vector_type = "int8"

    def __init__(self, clip: float = 0.0):
        super().__init__()
        if not 0.0 <= clip < 0.5:
            raise ConfigError("int8.clip", f"must lie in [0, 0.5), got {clip}")
        self.clip = float(clip)
        self.low: np.ndarray | None = None  # (d,)
        self.step: np.ndarray | None = None  # (d,)

    def get_config(self) -> dict[str, Any]:
        return {"clip": self.clip}

    def _fit(self, x: np.ndarray) -> None:
        lo = np.quantile(x, self.clip, axis=0) if self.clip else x.min(axis=0)
        hi = np.quantile(x, 1 - self.clip, axis=0) if self.clip else x.max(axis=0)
        span = (hi - lo).astype(np.float64)
        # A constant dim gets a unit step: every value maps to the same code, decoded exactly to lo.
        self.step = np.where(span > 0, span / 255.0, 1.0).astype(np.float32)
        self.low = lo.astype(np.float32)

    def quantize(self, x: np.ndarray) -> np.ndarray:
        """int8 codes (n, d) of float rows ``x``."""
        x = self._check_input(x)
        assert self.low is not None and self.step is not None
        codes = np.rint((x - self.low) / self.step) - 128.0
        return np.clip(codes, -128, 127).astype(np.int8)

    def dequantize(self, codes: np.ndarray) -> np.ndarray:
        """Float32 values (n, d) the codes stand for."""
        assert self.low is not None and self.step is not None
        return ((codes.astype(np.float32) + 128.0) * self.step + self.low).astype(np.float32)

    def _apply(self, x: np.ndarray) -> np.ndarray:
        return self.dequantize(self.quantize(x))

    def store(self, x: np.ndarray) -> np.ndarray:
        return self.quantize(x)

    def state(self) -> dict[str, np.ndarray]:
        assert self.low is not None and self.step is not None
        return {"low": self.low, "step": self.step}

    def load_state(self, tensors: dict[str, np.ndarray], input_dim: int) -> None:
        low = np.asarray(tensors["low"], dtype=np.float32)
        step = np.asarray(tensors["step"], dtype=np.float32)
        if low.shape != (input_dim,) or step.shape != (input_dim,) or (step <= 0).any():
            raise ValueError(f"int8 low {low.shape} / step {step.shape} invalid for {input_dim} dims")
        self.low, self.step = low, step
        super().load_state(tensors, input_dim)


@register
class BinaryQuantizer(Transform):
    """One bit per dim: ``x > threshold``. ``center=True`` uses the corpus mean per dim as threshold."""

    kind = "binary"
    vector_type = "binary"

    def __init__(self, center: bool = False):
        super().__init__()
        self.center = bool(center)
        self.threshold: np.ndarray | None = None  # (d,)

    def get_config(self) -> dict[str, Any]:
        return {"center": self.center}

    def _fit(self, x: np.ndarray) -> None:
        self.threshold = (x.mean(axis=0) if self.center else np.zeros(x.shape[1])).astype(np.float32)

    def bits(self, x: np.ndarray) -> np.ndarray:
        """Boolean matrix (n, d) of the bits."""
        x = self._check_input(x)
        assert self.threshold is not None
        return x > self.threshold

    def pack(self, x: np.ndarray) -> np.ndarray:
        """Packed bits, uint8 (n, ceil(d/8)), big-endian within a byte (``np.packbits``)."""
        return np.packbits(self.bits(x), axis=1)

    def _apply(self, x: np.ndarray) -> np.ndarray:
        return np.where(self.bits(x), 1.0, -1.0).astype(np.float32)

    def store(self, x: np.ndarray) -> np.ndarray:
        return self.pack(x)

    def state(self) -> dict[str, np.ndarray]:
        assert self.threshold is not None
        return {"threshold": self.threshold}

    def load_state(self, tensors: dict[str, np.ndarray], input_dim: int) -> None:
        threshold = np.asarray(tensors["threshold"], dtype=np.float32)
        if threshold.shape != (input_dim,):
            raise ValueError(f"binary threshold {threshold.shape} invalid for {input_dim} dims")
        self.threshold = threshold
        super().load_state(tensors, input_dim)


def quantizer(vector_type: str) -> Transform | None:
    """A fresh quantiser for ``vector_type`` (``float32`` gives None: nothing to do)."""
    if vector_type == "float32":
        return None
    if vector_type == "int8":
        return Int8Quantizer()
    if vector_type == "binary":
        return BinaryQuantizer()
    raise ConfigError("vector_type", f"must be float32, int8 or binary, got {vector_type!r}")
