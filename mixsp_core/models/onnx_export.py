"""ONNX export of a model directory: the whole embedding function as one graph for onnxruntime.

sentence-transformers' ONNX backend exports the Transformer module only and runs the modules after it in
torch, which a custom head cannot leave. Here ``torch.onnx.export`` (the dynamo exporter, onnxscript)
traces everything ``mixsp encode`` computes: encoder, pooling, router + projectors + output layer,
normalisation, and a compressed variant's affine / l2 steps, from ``input_ids`` and ``attention_mask``
(``[batch, tokens]`` int64, both dimensions dynamic) to ``sentence_embedding`` ``[batch, dim]`` float32.

Layout of the export folder::

    model.onnx          the graph, float32 (one file, weights inside)
    model_int8.onnx     (``int8=True``) the same with int8 weights (onnxruntime dynamic quantisation)
    tokenizer files     what the model was trained with; tokenise with truncation to ``max_length``
    mixsp_onnx.json     inputs, output, dim, max_length, normalised, the source, and for an int8 / binary
                        variant its quantisation (the graph stops before the quantiser, as ST does)

:class:`OnnxEmbedder` runs it (tokenizer + onnxruntime, no torch needed by the graph).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mixsp_core.errors import CheckpointError
from mixsp_core.io import write_json_atomic, writing_dir

MODEL_FILE = "model.onnx"
INT8_FILE = "model_int8.onnx"
INFO_FILE = "mixsp_onnx.json"
INPUTS = ("input_ids", "attention_mask")
OUTPUT = "sentence_embedding"
OPSET = 18


class EmbeddingGraph(nn.Module):
    """``(input_ids, attention_mask) -> embeddings`` of a ``bi`` student or a plain encoder, followed by the
    float steps of a transform chain: the function ``mixsp encode`` computes, in traceable form."""

    def __init__(self, embedder: Any, chain: Any | None = None):
        super().__init__()
        from mixsp_core.models.student import BiStudent

        self.student = embedder if isinstance(embedder, BiStudent) else None
        self.encoder = embedder.encoder if self.student is not None else embedder.model
        self.pooling = None if self.student is not None else embedder.pooling
        self.normalize = bool(embedder.model_config.normalize if self.student is not None else embedder.normalize)
        self.dims = getattr(embedder, "dims", None)
        self.steps: list[tuple[str, torch.Tensor | None, torch.Tensor | None]] = []
        for step in [] if chain is None else chain.steps:
            if step.vector_type != "float32":
                break  # the quantiser: applied by the caller, as sentence-transformers does
            affine = step.affine()
            if affine is not None:
                self.steps.append(("affine", torch.from_numpy(affine[0]), torch.from_numpy(affine[1])))
            elif step.kind == "l2":
                self.steps.append(("l2", None, None))
            else:
                raise CheckpointError(f"transform step {step.kind!r} cannot be exported to ONNX")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.student is not None:
            vec = self.student.head(self.student.route(hidden, attention_mask).z)
        else:
            from mixsp_core.models.pooling import pool

            vec = pool(self.pooling, hidden, attention_mask)
        if self.dims:
            vec = vec[:, : self.dims]
        if self.normalize:
            vec = F.normalize(vec, p=2, dim=-1)
        for kind, weight, bias in self.steps:
            vec = vec @ weight.T + bias if kind == "affine" else F.normalize(vec, p=2, dim=-1)
        return vec


def _unwrap(embedder: Any) -> tuple[Any, Any | None]:
    """``(base embedder, transform chain or None)`` of what :func:`load_embedder` returned."""
    from mixsp_core.compress import TransformedEmbedder
    from mixsp_core.models.checkpoint import TruncatedEncoder

    chain = None
    if isinstance(embedder, TransformedEmbedder):
        embedder, chain = embedder.base, embedder.chain
    if isinstance(embedder, TruncatedEncoder):
        raise CheckpointError("a --dims prefix of a plain encoder is not exported; export the full model")
    if not hasattr(embedder, "encode"):
        raise CheckpointError(f"{type(embedder).__name__} scores pairs; only embedders are exported to ONNX")
    return embedder, chain


def export_onnx(model_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], int8: bool = False) -> Path:
    """Export the model at ``model_dir`` (anything ``mixsp encode --model`` takes that embeds sentences)
    to the ONNX folder ``out_dir`` (layout in the module docstring), written beside it and swapped in.

    ``int8`` also writes ``model_int8.onnx`` (dynamically quantised weights; close to, not equal to, the
    float graph). Raises CheckpointError for a model that cannot be exported (a cross scorer)."""
    from mixsp_core.models.checkpoint import load_embedder

    source = Path(os.fspath(model_dir))
    embedder, chain = _unwrap(load_embedder(source, device="cpu", precision="fp32"))
    graph = EmbeddingGraph(embedder, chain).eval()
    tokenizer = embedder.tokenizer
    max_length = int(embedder.model_config.max_length if graph.student is not None else embedder.max_length)
    # two rows of different lengths: the example exercises padding, and no dimension is specialised to 1
    example = tokenizer(["An example sentence for the export.", "Short."], padding=True, truncation=True,
                        max_length=max_length, return_tensors="pt")
    args = (example["input_ids"], example["attention_mask"])
    dynamic = {name: {0: torch.export.Dim.DYNAMIC, 1: torch.export.Dim.DYNAMIC} for name in INPUTS}
    with writing_dir(Path(os.fspath(out_dir))) as work:
        torch.onnx.export(graph, args, str(work / MODEL_FILE), dynamo=True, input_names=list(INPUTS),
                          output_names=[OUTPUT], dynamic_shapes=dynamic, opset_version=OPSET,
                          external_data=False, verbose=False)
        files = {"float32": MODEL_FILE}
        if int8:
            quantize_int8(work / MODEL_FILE, work / INT8_FILE)
            files["int8_weights"] = INT8_FILE
        tokenizer.save_pretrained(work)
        dim = int(graph(*args).shape[1])
        write_json_atomic(work / INFO_FILE, {
            "format": 1, "source": str(source), "files": files, "inputs": list(INPUTS), "output": OUTPUT,
            "dim": dim, "max_length": max_length, "opset": OPSET,
            "normalized": graph.steps[-1][0] == "l2" if graph.steps else graph.normalize,
            "quantization": _quantization(chain)})
    return Path(os.fspath(out_dir))


def quantize_int8(model_path: Path, out_path: Path) -> None:
    """``out_path``: the graph at ``model_path`` with int8 weights (onnxruntime's dynamic quantisation of the
    MatMul weights, per output channel; activations quantised on the fly)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(model_path))
    # The exporter's intermediate shape annotations trip the quantiser's own shape inference; it infers
    # them again without them.
    del model.graph.value_info[:]
    plain = out_path.with_name(f".{out_path.name}.input.onnx")
    onnx.save(model, str(plain))
    try:
        # per channel: on MiniLM min cosine to float 0.987, against 0.938 per tensor
        quantize_dynamic(str(plain), str(out_path), weight_type=QuantType.QInt8, per_channel=True)
    finally:
        plain.unlink(missing_ok=True)


def _quantization(chain: Any | None) -> dict[str, Any] | None:
    if chain is None or chain.vector_type == "float32":
        return None
    from mixsp_core.models.st_layout import quantization_record

    return quantization_record(chain.steps[-1])


class OnnxEmbedder:
    """Sentence embeddings from an export folder with onnxruntime: ``encode(sentences) -> (n, dim)`` float32.

    ``int8``: run ``model_int8.onnx`` (CheckpointError when the export has none). Tokenises as the model
    was trained (truncation to the recorded ``max_length``), pads each batch."""

    def __init__(self, export_dir: str | os.PathLike[str], int8: bool = False, threads: int | None = None):
        import onnxruntime as ort
        from transformers import AutoTokenizer

        self.path = Path(os.fspath(export_dir))
        info_path = self.path / INFO_FILE
        try:
            self.info = json.loads(info_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise CheckpointError(f"{info_path}: missing or unreadable (not an ONNX export of mixsp): {err}") from err
        name = self.info["files"].get("int8_weights" if int8 else "float32")
        if name is None or not (self.path / name).is_file():
            raise CheckpointError(f"{self.path / (name or INT8_FILE)}: missing (export with --int8)")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(self.path / name), options, providers=["CPUExecutionProvider"])
        self.tokenizer = AutoTokenizer.from_pretrained(self.path, trust_remote_code=False)
        self.max_length = int(self.info["max_length"])
        self.dim = int(self.info["dim"])

    def encode(self, sentences: Sequence[str], batch_size: int = 64, **_: Any) -> np.ndarray:
        sentences = list(sentences)
        out = np.empty((len(sentences), self.dim), dtype=np.float32)
        for start in range(0, len(sentences), batch_size):
            batch = self.tokenizer(sentences[start:start + batch_size], padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="np")
            feeds = {name: batch[name].astype(np.int64) for name in INPUTS}
            out[start:start + len(feeds["input_ids"])] = self.session.run([OUTPUT], feeds)[0]
        return out
