"""PCA to k dims as a bias-free linear layer (plus the mean when centring), and L2 normalisation.

Centred PCA uses scikit-learn's ``PCA``; the uncentred variant (HPD's published teacher projection:
no mean-centring, bias-free) takes the top right-singular vectors of the raw matrix (scipy).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mixsp_core.compress.transform import Transform, register
from mixsp_core.errors import ConfigError


def _check_dims(dims: int, field: str) -> int:
    if isinstance(dims, bool) or not isinstance(dims, int) or dims < 1:
        raise ConfigError(field, f"must be a positive integer, got {dims!r}")
    return dims


@register
class PCATransform(Transform):
    """Project onto the top ``dims`` principal directions: ``y = (x - mean) @ weight.T``.

    ``center=False`` drops the mean (uncentred, bias-free projection). ``seed`` fixes sklearn's
    randomised solver where it is chosen. Fit needs at least ``dims`` rows and ``dims <= d``.
    """

    kind = "pca"

    def __init__(self, dims: int, center: bool = True, seed: int = 0):
        super().__init__()
        self.dims = _check_dims(dims, "pca.dims")
        self.center = bool(center)
        self.seed = int(seed)
        self.weight: np.ndarray | None = None  # (dims, d): rows are principal directions
        self.mean: np.ndarray | None = None  # (d,) when centring
        self.explained_variance_ratio: np.ndarray | None = None

    def get_config(self) -> dict[str, Any]:
        return {"dims": self.dims, "center": self.center, "seed": self.seed}

    def _fit(self, x: np.ndarray) -> None:
        n, d = x.shape
        if self.dims > min(n, d):
            raise ConfigError("pca.dims", f"{self.dims} exceeds min(rows={n}, dims={d}) of the fitting data")
        x64 = x.astype(np.float64)
        if self.center:
            from sklearn.decomposition import PCA

            pca = PCA(n_components=self.dims, random_state=self.seed).fit(x64)
            self.weight = pca.components_.astype(np.float32)
            self.mean = pca.mean_.astype(np.float32)
            self.explained_variance_ratio = pca.explained_variance_ratio_.astype(np.float32)
        else:
            from scipy.linalg import svd

            _, s, vt = svd(x64, full_matrices=False)
            # Same sign convention as sklearn (largest |loading| of each direction positive): deterministic.
            signs = np.sign(vt[np.arange(len(vt)), np.abs(vt).argmax(axis=1)])
            vt *= np.where(signs == 0, 1.0, signs)[:, None]
            self.weight = vt[: self.dims].astype(np.float32)
            self.mean = None
            energy = s**2
            self.explained_variance_ratio = (energy[: self.dims] / energy.sum()).astype(np.float32)

    def _apply(self, x: np.ndarray) -> np.ndarray:
        assert self.weight is not None
        if self.mean is not None:
            x = x - self.mean
        return x @ self.weight.T

    def _output_dim(self, input_dim: int) -> int:
        return self.dims

    def state(self) -> dict[str, np.ndarray]:
        assert self.weight is not None
        out = {"weight": self.weight}
        if self.mean is not None:
            out["mean"] = self.mean
        return out

    def load_state(self, tensors: dict[str, np.ndarray], input_dim: int) -> None:
        weight = np.asarray(tensors["weight"], dtype=np.float32)
        if weight.shape != (self.dims, input_dim):
            raise ValueError(f"pca weight has shape {weight.shape}, expected {(self.dims, input_dim)}")
        mean = tensors.get("mean")
        if self.center != (mean is not None):
            raise ValueError("pca: mean present/absent does not match center setting")
        if mean is not None and np.asarray(mean).shape != (input_dim,):
            raise ValueError(f"pca mean has shape {np.asarray(mean).shape}, expected {(input_dim,)}")
        self.weight = weight
        self.mean = None if mean is None else np.asarray(mean, dtype=np.float32)
        super().load_state(tensors, input_dim)

    def affine(self) -> tuple[np.ndarray, np.ndarray]:
        """``y = W x - W mean``: the projection as a weight and a bias."""
        if self.weight is None:
            raise RuntimeError("pca: not fitted")
        bias = np.zeros(self.dims) if self.mean is None else -(self.weight.astype(np.float64) @ self.mean)
        return self.weight.astype(np.float32), bias.astype(np.float32)

    def torch_linear(self):  # -> tuple[torch.nn.Linear, torch.Tensor | None]
        """The projection as a frozen bias-free ``torch.nn.Linear(d, dims)`` and the mean (or None).

        For use inside a model (for example HPD's fixed teacher projection): ``linear(x - mean)``.
        """
        import torch

        if self.weight is None:
            raise RuntimeError("pca: not fitted")
        linear = torch.nn.Linear(self.weight.shape[1], self.dims, bias=False)
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(self.weight))
        linear.requires_grad_(False)
        mean = None if self.mean is None else torch.from_numpy(self.mean.copy())
        return linear, mean


@register
class L2Normalize(Transform):
    """Scale each row to unit length (rows of zeros stay zero), for inner-product indexes."""

    kind = "l2"

    def get_config(self) -> dict[str, Any]:
        return {}

    def _fit(self, x: np.ndarray) -> None:
        return None

    def _apply(self, x: np.ndarray) -> np.ndarray:
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        return x / np.maximum(norms, 1e-12)
