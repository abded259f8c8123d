"""Post-hoc compression: PCA, whitening, prefix truncation, int8 / binary quantisation, fewer layers.

Each transform is fitted on corpus embeddings, saved (safetensors + JSON) and reloaded with
:func:`load_transform`; stacked on any embedder it gives an embedder (:class:`TransformedEmbedder`).
``make_step`` builds a step from a short spec such as ``"pca:128"`` or ``"whitening:zca"``;
:func:`write_compressed_model` saves a copy of a model with its transform. Cutting an encoder to fewer
layers lives in :mod:`mixsp_core.compress.layers` (it needs torch; this package does not).
"""

from mixsp_core.compress.transform import (  # noqa: I001  (transform first: it holds the registry)
    TRANSFORM_KINDS,
    TRANSFORM_SUBDIR,
    Transform,
    TransformChain,
    TransformedEmbedder,
    bytes_per_vector,
    fit_on_corpus,
    load_transform,
    save_transform,
    transform_dir,
    wrap_if_transformed,
    write_compressed_model,
)
from mixsp_core.compress.pca import L2Normalize, PCATransform
from mixsp_core.compress.quantize import BinaryQuantizer, Int8Quantizer, quantizer
from mixsp_core.compress.truncate import TruncateTransform
from mixsp_core.compress.whitening import WHITENING_METHODS, WhiteningTransform
from mixsp_core.errors import ConfigError


def make_step(spec: str) -> Transform:
    """A fresh, unfitted step from ``KIND[:ARG]``.

    ``pca:K``, ``pca-nocenter:K``, ``truncate:K``, ``whitening:METHOD`` or ``whitening:METHOD:K``,
    ``int8``, ``binary``, ``l2``. Raises ConfigError naming the spec otherwise.
    """
    kind, _, arg = spec.strip().partition(":")
    try:
        if kind == "pca":
            return PCATransform(int(arg))
        if kind == "pca-nocenter":
            return PCATransform(int(arg), center=False)
        if kind == "truncate":
            return TruncateTransform(int(arg))
        if kind == "whitening":
            method, _, dims = arg.partition(":")
            return WhiteningTransform(method or "pca", int(dims) if dims else None)
        if kind == "int8" and not arg:
            return Int8Quantizer()
        if kind == "binary" and not arg:
            return BinaryQuantizer()
        if kind == "l2" and not arg:
            return L2Normalize()
    except ValueError as err:
        raise ConfigError("compress.steps", f"bad step {spec!r}: {err}") from err
    raise ConfigError("compress.steps", f"unknown step {spec!r}; expected pca:K, pca-nocenter:K, truncate:K, "
                      "whitening:METHOD[:K], int8, binary or l2")


__all__ = [
    "TRANSFORM_KINDS", "TRANSFORM_SUBDIR", "WHITENING_METHODS", "BinaryQuantizer", "Int8Quantizer", "L2Normalize",
    "PCATransform", "Transform", "TransformChain", "TransformedEmbedder", "TruncateTransform",
    "WhiteningTransform", "bytes_per_vector", "fit_on_corpus", "load_transform", "make_step", "quantizer",
    "save_transform", "transform_dir", "wrap_if_transformed", "write_compressed_model",
]
