"""Whitening: ``y = (x - mean) @ W.T`` with ``W Σ W^T = I``, for the five variants of Kessy, Lewis &
Strimmer (2018, "Optimal whitening and decorrelation"):

- ``pca``:      W = Λ^-1/2 U^T                 (Σ = U Λ U^T, eigenvalues descending)
- ``zca``:      W = U Λ^-1/2 U^T = Σ^-1/2
- ``pca-cor``:  W = Θ^-1/2 G^T V^-1/2          (correlation P = G Θ G^T, V = diag(Σ))
- ``zca-cor``:  W = P^-1/2 V^-1/2
- ``cholesky``: W = L^T with L L^T = Σ^-1      (L lower triangular)

``dims < d`` keeps the top-variance output rows; it is allowed only for ``pca`` and ``pca-cor``, whose
outputs are ordered by variance (BERT-whitening's reduction). The other three have no such order, and
inside a k-dim PCA subspace they coincide with PCA whitening up to a rotation (same cosines), so a
reduced ZCA / Cholesky would only repeat it.

Σ is the sample covariance (ddof=1, as ``np.cov``); ``eps`` is added to its eigenvalues (0: exact, and
a singular covariance is an error). Constant ("dead") dims, whose variance is below 1e-10 of the largest,
are left out first (their columns of W are zero): all-MiniLM-L6-v2 has three, and no whitening of them
exists. Without ``dims`` the output therefore has one dim per live input dim.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mixsp_core.compress.transform import Transform, register
from mixsp_core.errors import ConfigError

WHITENING_METHODS = ("pca", "zca", "pca-cor", "zca-cor", "cholesky")
REDUCIBLE = ("pca", "pca-cor")
# Eigenvalues (or per-dim variances) below this fraction of the largest count as zero.
_RANK_TOL = 1e-10


def _eigh_desc(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (descending) and eigenvectors (columns) of a symmetric matrix, with fixed signs."""
    values, vectors = np.linalg.eigh(matrix)
    values, vectors = values[::-1], vectors[:, ::-1]
    # Largest-magnitude entry of each eigenvector positive: the same data gives the same W every time.
    signs = np.sign(vectors[np.abs(vectors).argmax(axis=0), np.arange(vectors.shape[1])])
    return values, vectors * np.where(signs == 0, 1.0, signs)


@register
class WhiteningTransform(Transform):
    """Whiten (decorrelate, unit variance) with ``method`` from :data:`WHITENING_METHODS`.

    ``dims``: keep the first ``dims`` outputs (``pca`` / ``pca-cor`` only; None keeps all ``d``).
    ``eps``: ridge added to the eigenvalues. Fitting needs more rows than dims (a full-rank covariance
    over the live dims, or over the top ``dims`` directions).
    """

    kind = "whitening"

    def __init__(self, method: str = "pca", dims: int | None = None, eps: float = 0.0):
        super().__init__()
        if method not in WHITENING_METHODS:
            raise ConfigError("whitening.method", f"must be one of {WHITENING_METHODS}, got {method!r}")
        if dims is not None:
            if isinstance(dims, bool) or not isinstance(dims, int) or dims < 1:
                raise ConfigError("whitening.dims", f"must be a positive integer or null, got {dims!r}")
            if method not in REDUCIBLE:
                raise ConfigError("whitening.dims", f"reducing dims is defined for {REDUCIBLE} only, not {method!r} "
                                  "(its outputs carry no variance order)")
        if eps < 0:
            raise ConfigError("whitening.eps", f"must be >= 0, got {eps}")
        self.method = method
        self.dims = dims
        self.eps = float(eps)
        self.weight: np.ndarray | None = None  # (k, d)
        self.mean: np.ndarray | None = None  # (d,)

    def get_config(self) -> dict[str, Any]:
        return {"method": self.method, "dims": self.dims, "eps": self.eps}

    def _fit(self, x: np.ndarray) -> None:
        n, d = x.shape
        k = d if self.dims is None else self.dims
        if k > d:
            raise ConfigError("whitening.dims", f"{k} exceeds the embedding width {d}")
        if n < 2:
            raise ValueError("whitening.fit: needs at least 2 rows")
        x64 = x.astype(np.float64)
        mean = x64.mean(axis=0)
        sigma = np.cov(x64, rowvar=False)
        var = np.diag(sigma)
        live = np.flatnonzero(var > _RANK_TOL * max(var.max(), 1e-300))
        if self.dims is None:
            k = len(live)
        elif k > len(live):
            raise ConfigError("whitening.dims", f"{k} exceeds the {len(live)} non-constant dims of the fitting data")
        weight = np.zeros((k, d))
        weight[:, live] = self._matrix(sigma[np.ix_(live, live)], k, n)
        self.weight = weight.astype(np.float32)
        self.mean = mean.astype(np.float32)

    def _matrix(self, sigma: np.ndarray, k: int, n: int) -> np.ndarray:
        if self.method in ("pca-cor", "zca-cor"):
            var = np.diag(sigma)
            inv_sd = 1.0 / np.sqrt(var)
            corr = sigma * inv_sd[:, None] * inv_sd[None, :]
            theta, g = _eigh_desc(corr)
            theta = self._checked(theta, k, n)
            if self.method == "pca-cor":
                return (g[:, :k] / np.sqrt(theta[:k])).T * inv_sd[None, :]
            return ((g / np.sqrt(theta)) @ g.T) * inv_sd[None, :]
        lam, u = _eigh_desc(sigma)
        lam = self._checked(lam, k, n)
        if self.method == "pca":
            return (u[:, :k] / np.sqrt(lam[:k])).T
        if self.method == "zca":
            return (u / np.sqrt(lam)) @ u.T
        # cholesky: Σ^-1 from the eigen-decomposition (stable), then its lower Cholesky factor.
        sigma_inv = (u / lam) @ u.T
        lower = np.linalg.cholesky((sigma_inv + sigma_inv.T) / 2)
        return lower.T

    def _checked(self, values: np.ndarray, k: int, n: int) -> np.ndarray:
        values = values + self.eps
        if values[k - 1] <= _RANK_TOL * max(values[0], 1e-300):
            raise ConfigError("whitening.eps", f"{self.method}: the covariance is singular over the {k} "
                              f"directions kept (fitted on {n} rows); fit on more rows, keep fewer dims or set eps > 0")
        return values

    def _apply(self, x: np.ndarray) -> np.ndarray:
        assert self.weight is not None and self.mean is not None
        return (x - self.mean) @ self.weight.T

    def _output_dim(self, input_dim: int) -> int:
        assert self.weight is not None
        return int(self.weight.shape[0])

    def state(self) -> dict[str, np.ndarray]:
        assert self.weight is not None and self.mean is not None
        return {"weight": self.weight, "mean": self.mean}

    def affine(self) -> tuple[np.ndarray, np.ndarray]:
        """``y = W x - W mean``: the whitening as a weight and a bias."""
        assert self.weight is not None and self.mean is not None
        return self.weight.astype(np.float32), (-(self.weight.astype(np.float64) @ self.mean)).astype(np.float32)

    def load_state(self, tensors: dict[str, np.ndarray], input_dim: int) -> None:
        weight = np.asarray(tensors["weight"], dtype=np.float32)
        mean = np.asarray(tensors["mean"], dtype=np.float32)
        k = weight.shape[0] if self.dims is None else self.dims
        if weight.ndim != 2 or weight.shape != (k, input_dim) or mean.shape != (input_dim,) or k > input_dim:
            raise ValueError(f"whitening weight {weight.shape} / mean {mean.shape} do not fit "
                             f"{input_dim} -> {k} dims")
        self.weight, self.mean = weight, mean
        super().load_state(tensors, input_dim)


def whitening_from_spec(spec: str, field: str = "whitening") -> WhiteningTransform:
    """An unfitted whitening from ``METHOD`` or ``METHOD:K`` (``pca:128``); a bad one is a ConfigError
    naming ``field``."""
    method, _, dims = spec.strip().partition(":")
    try:
        return WhiteningTransform(method, int(dims) if dims else None)
    except (ConfigError, ValueError) as err:
        raise ConfigError(field, f"bad whitening {spec!r}: {err}") from err
