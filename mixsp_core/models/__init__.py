"""Models: name resolution (offline copies), pooling and the sentence ``Encoder``.

The fast encoding path is split by subject: ``batching`` (bulk tokenisation, unpadded batch plans),
``encode_loop`` (running a pooled forward over the plans on CPU / CUDA), ``inference`` (precision,
int8 weight quantisation, token budget) and ``malloc_tuning`` (glibc allocator settings for CPU).

Names are imported lazily so ``import mixsp_core.models`` does not pull in torch/transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "resolve_model": "mixsp_core.models.resolve",
    "ModelNotAvailableError": "mixsp_core.models.resolve",
    "mean_pool": "mixsp_core.models.pooling",
    "cls_pool": "mixsp_core.models.pooling",
    "Encoder": "mixsp_core.models.encoder",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mixsp_core.models' has no attribute {name!r}")
