"""Inference-only settings of the fast encoding path: precision, weight quantisation, token budget.

:func:`resolve_inference` checks them and resolves their ``"auto"`` values for a device;
:class:`InferenceCopy` keeps the cast / weight-quantised copy of a model that the fast path runs.
"Int8" here always means dynamic int8 *weight* quantisation of ``nn.Linear`` layers (the
``quantize="int8"`` option); int8 *vectors* (compressed embeddings) belong to :mod:`mixsp_core.compress`.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import torch

from mixsp_core.models.batching import TokenizedChunk

PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# The values of the ``quantize`` option (CLI ``--quantize int8``); None keeps the float weights.
WEIGHT_QUANTIZATIONS = (None, "int8")
# What runs the transformer (CLI ``--backend``): torch, or OpenVINO on the CPU (mixsp_core.models.openvino_backend)
BACKENDS = ("torch", "openvino")
CUDA_TOKEN_BUDGET = 65536  # tokens per batch on CUDA ("auto"): few, large batches keep the GPU busy


def resolve_inference(precision: str, quantize: str | None, token_budget: int | str | None,
                      device: torch.device, backend: str = "torch") -> tuple[str, str | None, int | None]:
    """Check the inference-only options for ``device`` and resolve their ``"auto"`` values.

    ``precision``: ``"auto"`` (bf16 on CUDA, fp32 on CPU) or a key of :data:`PRECISIONS`;
    ``quantize``: None or ``"int8"`` (CPU, fp32 only: dynamic int8 weights on torch, static int8 on
    OpenVINO); ``token_budget``: a positive int, None or ``"auto"`` (:data:`CUDA_TOKEN_BUDGET` on CUDA,
    None on CPU); ``backend``: one of :data:`BACKENDS` (``"openvino"``: CPU, fp32 or bf16). Returns
    ``(precision, quantize, token_budget)``; raises ValueError naming the bad option.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "openvino" and device.type != "cpu":
        raise ValueError("backend='openvino' runs on the CPU; on CUDA use backend='torch'")
    if backend == "openvino" and precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"backend='openvino' runs precision fp32 or bf16, got {precision!r}")
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    elif precision not in PRECISIONS:
        raise ValueError(f"precision must be 'auto' or one of {tuple(PRECISIONS)}, got {precision!r}")
    if quantize not in WEIGHT_QUANTIZATIONS:
        raise ValueError(f"quantize must be one of {WEIGHT_QUANTIZATIONS}, got {quantize!r}")
    if quantize == "int8" and (device.type != "cpu" or precision != "fp32"):
        raise ValueError("quantize='int8' (dynamic int8) runs on CPU in fp32 only")
    if token_budget == "auto":
        token_budget = CUDA_TOKEN_BUDGET if device.type == "cuda" else None
    if token_budget is not None and (isinstance(token_budget, bool) or not isinstance(token_budget, int)
                                     or token_budget < 1):
        raise ValueError(f"token_budget must be a positive int, None or 'auto', got {token_budget!r}")
    return precision, quantize, token_budget


class InferenceCopy:
    """The module a fast path runs: the model itself in fp32, else a cast / int8-weight copy, cached until
    the model's weights change (in place, as training does, or moved to another device)."""

    def __init__(self) -> None:
        self._cache: tuple[tuple, torch.nn.Module] | None = None

    def get(self, model: torch.nn.Module, precision: str, quantize: str | None, backend: str = "torch",
            calibration: Callable[[], TokenizedChunk] | None = None, streams: int = 1):
        """``model`` when ``precision == "fp32"`` and ``quantize`` is None on torch, else its (cached) copy;
        ``backend="openvino"``: the compiled OpenVINO model (:func:`~mixsp_core.models.openvino_backend.
        compile_encoder`, ``streams`` batches at once), int8 calibrated on ``calibration()`` when first built."""
        if backend == "torch" and precision == "fp32" and quantize is None:
            return model
        weights = tuple((id(p), p.data_ptr(), p._version) for p in model.parameters())
        key = (id(model), weights, precision, quantize, backend, streams)
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        self._cache = None  # free the old copy before making the new one
        if backend == "openvino":
            from mixsp_core.models.openvino_backend import compile_encoder

            tokens = calibration() if quantize is not None and calibration is not None else None
            compiled = compile_encoder(model, precision, quantize, tokens, threads=torch.get_num_threads(),
                                       streams=streams)
            self._cache = (key, compiled)
            return compiled
        copy_ = copy.deepcopy(model).eval()
        if precision != "fp32":
            copy_.to(PRECISIONS[precision])
        if quantize == "int8":
            copy_ = quantize_linear_weights_int8(copy_)
        for p in copy_.parameters():
            p.requires_grad_(False)
        self._cache = (key, copy_)
        return copy_


# --------------------------------------------------------------------------- weight quantisation


def quantize_linear_weights_int8(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` whose ``nn.Linear`` layers run as dynamic int8 (weights per output channel,
    activations quantised per batch; CPU only, fbgemm). The original is left untouched.

    Per-channel weights cost about half as much dev Spearman as per-tensor ones on all-MiniLM-L6-v2
    (-0.6 vs -1.05 points, STS-B dev + SICK trial) at the same speed.
    """
    from torch import nn
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():
        # torch 2.13 marks torch.ao eager quantisation as deprecated (moving to torchao); the kernels
        # still ship and work, and torchao is not a dependency of this project.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message="(?s).*(quantize_per|migrat|torchao)", category=UserWarning)
        warnings.filterwarnings("ignore", message="(?s).*(quantize_per|migrat|torchao)", category=FutureWarning)
        return quantize_dynamic(model, {nn.Linear: per_channel_dynamic_qconfig}, inplace=False)
