"""The sentence-transformers side of a model directory: the module files that make every ``bi`` checkpoint
(and every compressed variant of one) a folder ``SentenceTransformer(DIR)`` loads.

A ``bi`` checkpoint (format 2, :mod:`mixsp_core.models.checkpoint`) holds each weight once::

    config.json                        mixsp's own: mixsp_kind, format_version, model, training, ...
    modules.json                       0 Transformer -> encoder/, 1 Pooling, 2 MixSPHead, 3 Normalize
    config_sentence_transformers.json  model type, cosine similarity
    encoder/                           a plain HF folder: config.json, model.safetensors (the encoder's
                                       weights under their HF names), tokenizer files, sentence_bert_config.json
    1_Pooling/config.json              the pooling the projectors see (mean or cls)
    2_MixSPHead/                       config.json + model.safetensors: router, projectors, output layer
    3_Normalize/config.json            (when the model L2-normalises, the default)

A compressed variant adds, after those, one ``Dense`` module per affine step of its transform (PCA,
whitening, truncation: ``y = W x + b``), ``Normalize`` for an ``l2`` step, and a final ``Normalize`` when
its vectors are float32. Int8 / binary variants stop before the quantiser: sentence-transformers quantises
at encode time (``precision=``), with the variant's calibrated ranges from ``quantization.json``.

Only JSON and safetensors are written here, and nothing imports sentence-transformers: saving a checkpoint
during training does not need it. The head's module class lives in :mod:`mixsp_core.models.st_modules`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from mixsp_core.errors import CheckpointError
from mixsp_core.io import write_json_atomic, write_text_atomic

ENCODER_DIR = "encoder"
POOLING_DIR = "1_Pooling"
HEAD_DIR = "2_MixSPHead"
MODULES_FILE = "modules.json"
ST_CONFIG_FILE = "config_sentence_transformers.json"
ST_ENCODER_CONFIG = "sentence_bert_config.json"
QUANTIZATION_FILE = "quantization.json"
README_FILE = "README.md"
MODULE_WEIGHTS = "model.safetensors"

HEAD_CLASS = "mixsp_core.models.st_modules.MixSPHead"
TRANSFORMER_CLASS = "sentence_transformers.base.modules.transformer.Transformer"
POOLING_CLASS = "sentence_transformers.sentence_transformer.modules.pooling.Pooling"
DENSE_CLASS = "sentence_transformers.base.modules.dense.Dense"
NORMALIZE_CLASS = "sentence_transformers.base.modules.normalize.Normalize"
IDENTITY_ACTIVATION = "torch.nn.modules.linear.Identity"
# what sentence-transformers passes to encode(precision=...) for each quantised vector type
ST_PRECISION = {"int8": "int8", "binary": "ubinary"}


def head_config(model_config: Any, hidden_dim: int) -> dict[str, Any]:
    """The MixSPHead constructor settings of a ``bi`` model (``model_config``: its ModelConfig)."""
    return {"hidden_dim": int(hidden_dim), "num_projectors": model_config.num_projectors,
            "routing": model_config.routing, "projector_mult": model_config.projector_mult,
            "projector_residual": model_config.projector_residual, "output_dim": model_config.output_dim,
            "output_bias": model_config.output_bias, "output_activation": model_config.output_activation}


def _module(idx: int, path: str, type_: str) -> dict[str, Any]:
    return {"idx": idx, "name": str(idx), "path": path, "type": type_}


def write_bi_modules(directory: Path, model_config: Any, hidden_dim: int) -> None:
    """Write the sentence-transformers files of a ``bi`` checkpoint into ``directory`` (being written, so
    plain writes): modules.json, the model config, the Transformer's config in ``encoder/``, Pooling, the
    head's config and Normalize. The weights are the caller's (``encoder/`` and ``2_MixSPHead/``)."""
    modules = [_module(0, ENCODER_DIR, TRANSFORMER_CLASS), _module(1, POOLING_DIR, POOLING_CLASS),
               _module(2, HEAD_DIR, HEAD_CLASS)]
    # unpad_inputs off: the head reads the first token of each padded row
    write_json_atomic(directory / ENCODER_DIR / ST_ENCODER_CONFIG,
                      {"max_seq_length": int(model_config.max_length), "do_lower_case": False,
                       "unpad_inputs": False})
    write_json_atomic(directory / POOLING_DIR / "config.json",
                      {"embedding_dimension": int(hidden_dim), "pooling_mode": model_config.pooling,
                       "include_prompt": True})
    write_json_atomic(directory / HEAD_DIR / "config.json", head_config(model_config, hidden_dim))
    if model_config.normalize:
        modules.append(_normalize(directory, 3))
    write_json_atomic(directory / MODULES_FILE, modules)
    write_json_atomic(directory / ST_CONFIG_FILE, _st_model_config())


def _st_model_config() -> dict[str, Any]:
    from importlib import metadata

    versions = {}
    for dist, key in (("sentence-transformers", "sentence_transformers"), ("transformers", "transformers"),
                      ("torch", "pytorch")):
        try:
            versions[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return {"__version__": versions, "model_type": "SentenceTransformer", "prompts": {},
            "default_prompt_name": None, "similarity_fn_name": "cosine"}


def _normalize(directory: Path, idx: int) -> dict[str, Any]:
    path = f"{idx}_Normalize"
    write_json_atomic(directory / path / "config.json",
                      {"module_input_name": "sentence_embedding", "module_output_name": "sentence_embedding"})
    return _module(idx, path, NORMALIZE_CLASS)


def _dense(directory: Path, idx: int, weight: np.ndarray, bias: np.ndarray) -> dict[str, Any]:
    """A bias-carrying, activation-free ``Dense`` module computing ``weight @ x + bias``."""
    import torch
    from safetensors.torch import save_file

    path = f"{idx}_Dense"
    out_features, in_features = weight.shape
    write_json_atomic(directory / path / "config.json",
                      {"in_features": int(in_features), "out_features": int(out_features), "bias": True,
                       "activation_function": IDENTITY_ACTIVATION, "module_input_name": "sentence_embedding",
                       "module_output_name": "sentence_embedding"})
    tensors = {"linear.weight": torch.from_numpy(np.ascontiguousarray(weight, dtype=np.float32)),
               "linear.bias": torch.from_numpy(np.ascontiguousarray(bias, dtype=np.float32))}
    save_file(tensors, str(directory / path / MODULE_WEIGHTS), metadata={"format": "pt"})
    return _module(idx, path, DENSE_CLASS)


def read_modules(directory: Path) -> list[dict[str, Any]] | None:
    """modules.json of ``directory`` (None when there is none); CheckpointError when it is not a JSON list."""
    path = directory / MODULES_FILE
    if not path.is_file():
        return None
    try:
        modules = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable JSON: {err}") from err
    if not isinstance(modules, list) or not all(isinstance(m, dict) and "path" in m for m in modules):
        raise CheckpointError(f"{path}: expected a list of modules with 'path' and 'type'")
    return modules


def append_transform_modules(directory: Path, chain: Any) -> None:
    """Extend the modules.json of ``directory`` (a copy of a model being written) with the modules that
    compute ``chain`` (a fitted :class:`~mixsp_core.compress.TransformChain`) in sentence-transformers.

    Affine steps become ``Dense`` modules, ``l2`` steps ``Normalize``; a float32 chain ends in ``Normalize``
    (cosine unchanged, unit vectors as sentence-transformers users expect). A quantising last step adds no
    module: ``quantization.json`` and README.md say what to pass to sentence-transformers instead. A folder
    without modules.json (a bare HF encoder) is left as it is."""
    modules = read_modules(directory)
    if modules is None:
        return
    steps = list(chain.steps)
    quantizer = steps.pop() if chain.vector_type != "float32" else None
    for step in steps:
        affine = step.affine()
        if affine is not None:
            modules.append(_dense(directory, len(modules), *affine))
        elif step.kind == "l2":
            modules.append(_normalize(directory, len(modules)))
        else:
            raise CheckpointError(f"{directory}: transform step {step.kind!r} has no sentence-transformers module")
    if quantizer is not None:
        threshold = getattr(quantizer, "threshold", None)
        if threshold is not None and np.any(threshold != 0):
            # sentence-transformers' binary precision compares with 0: shift by the fitted threshold first
            modules.append(_dense(directory, len(modules), np.eye(len(threshold), dtype=np.float32), -threshold))
        write_quantization_note(directory, quantizer)
    elif modules[-1]["type"] != NORMALIZE_CLASS:
        modules.append(_normalize(directory, len(modules)))
    write_json_atomic(directory / MODULES_FILE, modules)


def quantization_record(quantizer: Any) -> dict[str, Any]:
    """What sentence-transformers needs to reproduce the variant's stored vectors: the ``precision`` to
    pass and, for int8, the calibrated per-dimension ``ranges`` ``[[min...], [max...]]``."""
    record: dict[str, Any] = {"vector_type": quantizer.vector_type, "precision": ST_PRECISION[quantizer.vector_type]}
    if quantizer.vector_type == "int8":
        low = np.asarray(quantizer.low, dtype=np.float32)
        high = (low.astype(np.float64) + 255.0 * np.asarray(quantizer.step, dtype=np.float64)).astype(np.float32)
        record["ranges"] = [low.tolist(), high.tolist()]
    return record


def write_quantization_note(directory: Path, quantizer: Any) -> None:
    """``quantization.json`` (:func:`quantization_record`) and a README.md that says how to get the
    variant's int8 codes or packed bits from sentence-transformers."""
    record = quantization_record(quantizer)
    write_json_atomic(directory / QUANTIZATION_FILE, record)
    write_text_atomic(directory / README_FILE, quantization_readme(record))


def quantization_readme(record: dict[str, Any]) -> str:
    """The README text of a quantised variant (``record``: :func:`quantization_record`)."""
    lines = ["# MixSP compressed variant: " + record["vector_type"] + " vectors", ""]
    if record["vector_type"] == "int8":
        lines += [
            ("sentence-transformers returns the float32 vectors this variant quantises. For its int8 codes use the "
             "ranges it was calibrated on (`quantization.json`):"),
            "",
            "```python",
            "import json, numpy as np",
            "from sentence_transformers import SentenceTransformer, quantize_embeddings",
            "model = SentenceTransformer(DIR, trust_remote_code=True)  # imports mixsp_core's head class",
            "ranges = np.array(json.load(open(f\"{DIR}/quantization.json\"))[\"ranges\"], dtype=np.float32)",
            "codes = quantize_embeddings(model.encode(sentences), precision=\"int8\", ranges=ranges)",
            "```",
            "",
            ("`model.encode(sentences, precision=\"int8\")` also works but calibrates on the batch itself. "
             "sentence-transformers floors where mixsp rounds, so a code may differ from `mixsp encode`'s by "
             "one step."),
        ]
    else:
        lines += [
            ("sentence-transformers returns the float32 vectors this variant binarises. "
             "`model.encode(sentences, precision=\"ubinary\")` gives its packed bits (`precision=\"binary\"`: the "
             "same bytes as int8, minus 128)."),
        ]
    return "\n".join(lines) + "\n"
