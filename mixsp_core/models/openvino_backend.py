"""OpenVINO inference for the fast path on CPU (``backend="openvino"``; issue 18).

The transformer of an :class:`~mixsp_core.models.encoder.Encoder` or a student is converted once with
``openvino.convert_model`` (traced from the torch module, dynamic batch and length) and compiled for the
CPU; pooling, router and projectors stay in torch. Options, as ``mixsp encode --backend openvino``:

* ``precision="fp32"``: OpenVINO's ``INFERENCE_PRECISION_HINT`` forced to f32, so the vectors equal the torch
  path's (1e-5). OpenVINO's own default on a CPU with AVX512-BF16 or AMX is bf16, which is what
  sentence-transformers' ``backend="openvino"`` runs there; ``precision="bf16"`` asks for that.
* ``quantize="int8"``: static int8 (weights and activations) by NNCF post-training quantisation, the
  ``transformer`` model type, as optimum-intel's ``OVQuantizationConfig`` does for sentence-transformers;
  calibrated on the token ids of the first :data:`CALIBRATION_SENTENCES` sentences the encoder is given
  (or ``Encoder.calibration``); the ops left in float run in f32. (At OpenVINO's default, bf16 on such a
  CPU, as the sentence-transformers peer runs them, MiniLM encoded 1,690 against 1,502 sentences/s on the
  2-core dev machine but lost 0.054 dev points to fp32 against 0.019 in f32.)

Converted (and quantised) models are cached as OpenVINO IR (XML + weights, no pickle) under
``<mixsp cache>/openvino/<key>``, the key hashing the weights, the options, the calibration ids and the
OpenVINO / NNCF versions; a cache entry that cannot be read is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from mixsp_core.io import writing_dir
from mixsp_core.models.batching import TokenizedChunk
from mixsp_core.models.resolve import cache_dir

log = logging.getLogger(__name__)

CALIBRATION_SENTENCES = 300  # as optimum-intel's OVQuantizationConfig (num_samples)
OV_PRECISIONS = {"fp32": "f32", "bf16": "bf16"}
_XML = "model.xml"


class _LastHidden(torch.nn.Module):
    """The traced graph: ids and mask in, the last hidden states out (no ModelOutput, no extras)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


class OpenVINOEncoder:
    """A compiled OpenVINO transformer called like the HF model on the fast path:
    ``encoder(input_ids=(B, T) int64, attention_mask=(B, T) or None).last_hidden_state`` -> (B, T, H)
    float32 torch tensor. Thread-safe: each calling thread gets its own infer request (the CPU loop
    runs batches side by side; one OpenVINO stream per thread)."""

    def __init__(self, compiled, precision: str, quantize: str | None, path: Path):
        self.compiled = compiled
        self.precision, self.quantize, self.path = precision, quantize, path
        self._local = threading.local()

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 output_hidden_states: bool = False) -> SimpleNamespace:
        if output_hidden_states:
            raise ValueError("the OpenVINO backend returns the last layer only (encode_layers: use backend='torch')")
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        ids = input_ids.numpy().astype(np.int64, copy=False)
        mask = np.ones_like(ids) if attention_mask is None else attention_mask.numpy().astype(np.int64, copy=False)
        hidden = request.infer({"input_ids": ids, "attention_mask": mask})[0]
        return SimpleNamespace(last_hidden_state=torch.from_numpy(np.asarray(hidden, dtype=np.float32)))

    def __repr__(self) -> str:
        return f"OpenVINOEncoder({str(self.path)!r}, precision={self.precision!r}, quantize={self.quantize!r})"


def _versions() -> dict[str, str]:
    import openvino

    out = {"openvino": openvino.__version__}
    try:
        import nncf

        out["nncf"] = nncf.__version__
    except ImportError:
        out["nncf"] = "absent"
    return out


def cache_key(model: torch.nn.Module, precision: str, quantize: str | None,
              calibration: TokenizedChunk | None) -> str:
    """Hex digest naming one converted model: weights and buffers, config, options, calibration ids, versions."""
    h = hashlib.sha256()
    h.update(type(model).__qualname__.encode())
    config = getattr(model, "config", None)
    if config is not None:
        h.update(config.to_json_string(use_diff=False).encode())
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    h.update(json.dumps({"precision": precision, "quantize": quantize, **_versions()}, sort_keys=True).encode())
    if quantize is not None and calibration is not None:
        h.update(calibration.lengths.tobytes())
        h.update(calibration.ids.tobytes())
    return h.hexdigest()[:24]


def _convert(model: torch.nn.Module):
    import openvino as ov

    # a padded example, so the traced graph keeps the attention mask's path
    ids = torch.tensor([[101, 2023, 2003, 102, 0, 0], [101, 2023, 2003, 1037, 3231, 102]], dtype=torch.int64)
    mask = (torch.arange(6)[None, :] < torch.tensor([[4], [6]])).long()
    with torch.inference_mode(), warnings.catch_warnings():
        # transformers' mask code compares shapes in Python while tracing; the comparisons it bakes in
        # (mask as long as the keys, not causal) hold for every input here, and the tests check padded and
        # unpadded batches of other shapes against torch
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        return ov.convert_model(_LastHidden(model).eval(), example_input={"input_ids": ids, "attention_mask": mask},
                                input=[("input_ids", [-1, -1], ov.Type.i64),
                                       ("attention_mask", [-1, -1], ov.Type.i64)])


def calibration_items(tokens: TokenizedChunk) -> list[dict[str, np.ndarray]]:
    """One unpadded (1, length) sample per sentence, as NNCF's dataset reads them."""
    items, start = [], 0
    for n in tokens.lengths.tolist():
        ids = tokens.ids[start:start + n].astype(np.int64)[None, :]
        items.append({"input_ids": ids, "attention_mask": np.ones_like(ids)})
        start += n
    return items


def _quantize(ov_model, tokens: TokenizedChunk):
    import nncf

    items = calibration_items(tokens)
    return nncf.quantize(ov_model, nncf.Dataset(items), model_type=nncf.ModelType.TRANSFORMER,
                         subset_size=len(items))


def compile_encoder(model: torch.nn.Module, precision: str = "fp32", quantize: str | None = None,
                    calibration: TokenizedChunk | None = None, threads: int | None = None,
                    streams: int = 1, cache_root: Path | None = None) -> OpenVINOEncoder:
    """``model`` (an HF encoder on the CPU) converted, optionally int8-quantised, and compiled for the CPU.

    ``threads``: OpenVINO's CPU threads in all (default torch's count); ``streams``: batches it runs at once
    (the CPU loop's worker threads). ``calibration``: token ids for ``quantize="int8"`` (required then).
    """
    try:
        import openvino as ov
    except ImportError as err:
        raise ImportError("backend 'openvino' needs the openvino and nncf packages: "
                          "pip install 'mixsp-pipeline[openvino]'") from err

    if precision not in OV_PRECISIONS:
        raise ValueError(f"backend 'openvino' runs precision {tuple(OV_PRECISIONS)}, got {precision!r}")
    if quantize not in (None, "int8"):
        raise ValueError(f"quantize must be None or 'int8', got {quantize!r}")
    if quantize == "int8" and (calibration is None or len(calibration.lengths) == 0):
        raise ValueError("quantize='int8' on OpenVINO needs calibration sentences")
    key = cache_key(model, precision, quantize, calibration)
    folder = (cache_root or cache_dir() / "openvino") / key
    core = ov.Core()
    ov_model = None
    if (folder / _XML).is_file():
        try:
            ov_model = core.read_model(folder / _XML)
        except RuntimeError as err:  # a damaged cache entry: rebuilt below
            log.warning("%s: unreadable OpenVINO cache entry (%s); converting again", folder, err)
    if ov_model is None:
        ov_model = _convert(model)
        if quantize == "int8":
            log.info("quantising to int8 (NNCF, %d calibration sentences)", len(calibration.lengths))
            ov_model = _quantize(ov_model, calibration)
        with writing_dir(folder) as work:
            ov.save_model(ov_model, work / _XML, compress_to_fp16=False)
    threads = threads or torch.get_num_threads()
    config = {"INFERENCE_PRECISION_HINT": OV_PRECISIONS[precision], "NUM_STREAMS": str(max(1, streams)),
              "INFERENCE_NUM_THREADS": str(max(1, threads))}
    return OpenVINOEncoder(core.compile_model(ov_model, "CPU", config), precision, quantize, folder)


def first_sentences(sentences: Sequence[str], n: int = CALIBRATION_SENTENCES) -> list[str]:
    """The calibration sentences of an encode: its first ``n``."""
    return list(sentences[:n])
