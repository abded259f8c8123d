"""Cut a Hugging Face encoder to its first L transformer layers.

A model cut to L layers computes exactly the full model's hidden state after layer L (the layers above
never feed back), so a shallow model trained with 2DMSE / ESE can run, and be saved, with only the layers
it keeps: :func:`save_truncated_encoder` writes an ordinary HF folder (config with the new layer count,
safetensors weights, tokenizer).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mixsp_core.errors import ConfigError
from mixsp_core.io import write_json_atomic

# Where encoder families keep their layer stack, and the config field that counts it.
_LAYER_PATHS = ("encoder.layer", "transformer.layer", "encoder.layers", "layers")
_COUNT_FIELDS = ("num_hidden_layers", "n_layers")
# Files sentence-transformers reads besides the HF ones: copied so the cut folder loads there too.
_SBERT_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json",
                "1_Pooling/config.json")
PROVENANCE_FILE = "mixsp_layers.json"


def find_layer_stack(model: nn.Module) -> tuple[nn.Module, str]:
    """The module holding the transformer layer list and that list's attribute name.

    Knows BERT / RoBERTa / MPNet / ELECTRA (``encoder.layer``), DistilBERT (``transformer.layer``) and
    ``layers``-style stacks; raises ConfigError for anything else.
    """
    for path in _LAYER_PATHS:
        *parents, attr = path.split(".")
        owner: Any = model
        for name in parents:
            owner = getattr(owner, name, None)
            if owner is None:
                break
        if owner is not None and isinstance(getattr(owner, attr, None), nn.ModuleList):
            return owner, attr
    raise ConfigError("layers", f"cannot find the layer stack of {type(model).__name__} (looked for {_LAYER_PATHS})")


def num_layers(model: nn.Module) -> int:
    owner, attr = find_layer_stack(model)
    return len(getattr(owner, attr))


def _set_layer_count(config: Any, count: int) -> None:
    for name in _COUNT_FIELDS:
        if hasattr(config, name):
            setattr(config, name, count)
    # Newer configs list a type per layer (sliding / full attention): keep it the same length.
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) > count:
        config.layer_types = layer_types[:count]


def _check_count(keep: int, total: int) -> None:
    if isinstance(keep, bool) or not isinstance(keep, int) or not 1 <= keep <= total:
        raise ConfigError("layers", f"must be an integer in 1..{total} (the model has {total} layers), got {keep!r}")


def cut_layers(model: nn.Module, keep: int) -> nn.Module:
    """Drop every layer above the first ``keep``, in place, and update the model's config; returns it."""
    owner, attr = find_layer_stack(model)
    stack = getattr(owner, attr)
    _check_count(keep, len(stack))
    setattr(owner, attr, nn.ModuleList(list(stack)[:keep]))
    if hasattr(model, "config"):
        _set_layer_count(model.config, keep)
    return model


def find_hf_model(obj: Any) -> nn.Module:
    """The transformer inside an embedder: ``obj`` itself, ``obj.model``, ``obj.encoder(.model)``, or the
    first sub-module of a torch module that has a layer stack."""
    for candidate in (obj, getattr(obj, "model", None), getattr(obj, "encoder", None),
                      getattr(getattr(obj, "encoder", None), "model", None)):
        if isinstance(candidate, nn.Module):
            with contextlib.suppress(ConfigError):
                find_layer_stack(candidate)
                return candidate
    if isinstance(obj, nn.Module):
        for module in obj.modules():
            if hasattr(module, "config"):
                with contextlib.suppress(ConfigError):
                    find_layer_stack(module)
                    return module
    raise ConfigError("layers", f"no transformer with a layer stack found in {type(obj).__name__}")


@contextlib.contextmanager
def limited_layers(embedder: Any, keep: int) -> Iterator[Any]:
    """Run ``embedder`` with only its first ``keep`` layers inside the ``with`` block, then restore them.

    Cheap (no copy): for the evaluation grid's layer cells. Not for concurrent use of the same embedder.
    """
    model = find_hf_model(embedder)
    owner, attr = find_layer_stack(model)
    full = getattr(owner, attr)
    _check_count(keep, len(full))
    config = getattr(model, "config", None)
    saved = {name: getattr(config, name) for name in (*_COUNT_FIELDS, "layer_types") if hasattr(config, name)}
    saved_count = getattr(embedder, "num_layers", None)
    setattr(owner, attr, nn.ModuleList(list(full)[:keep]))
    if config is not None:
        _set_layer_count(config, keep)
    if isinstance(saved_count, int):
        embedder.num_layers = keep
    try:
        yield embedder
    finally:
        setattr(owner, attr, full)
        for name, value in saved.items():
            setattr(config, name, value)
        if isinstance(saved_count, int):
            embedder.num_layers = saved_count


def truncate_model_dir(source: str | os.PathLike[str], output_dir: str | os.PathLike[str], keep: int) -> Path:
    """Save the model at ``source`` with only its first ``keep`` layers at ``output_dir``.

    A project checkpoint (config.json with ``"mixsp_kind"``) is loaded, its encoder cut and saved again
    as a checkpoint (heads unchanged, ``"layers"`` recorded under ``training``); anything else is treated
    as an HF encoder folder or Hub id (:func:`save_truncated_encoder`).
    """
    from mixsp_core.models.checkpoint import is_checkpoint, load_checkpoint, read_checkpoint_config, save_checkpoint

    if not is_checkpoint(source):
        return save_truncated_encoder(source, output_dir, keep)
    meta = read_checkpoint_config(source)
    model = load_checkpoint(source, device="cpu")
    total = num_layers(model.encoder)
    cut_layers(model.encoder, keep)
    record = {"source": os.fspath(source), "kept_layers": keep, "original_layers": total}
    out = save_checkpoint(model, output_dir, extra={**meta.get("training", {}), "layers": record})
    write_json_atomic(out / PROVENANCE_FILE, record)
    return out


def save_truncated_encoder(source: str | os.PathLike[str], output_dir: str | os.PathLike[str], keep: int) -> Path:
    """Load the HF encoder at ``source`` (folder or Hub id, safetensors only), keep its first ``keep``
    layers and save it, with its tokenizer, as an HF folder at ``output_dir``. Returns ``output_dir``."""
    from transformers import AutoModel, AutoTokenizer

    from mixsp_core.models.resolve import resolve_model

    resolved = resolve_model(os.fspath(source))
    model = AutoModel.from_pretrained(resolved, use_safetensors=True, trust_remote_code=False,
                                      dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(resolved, trust_remote_code=False)
    total = num_layers(model)
    cut_layers(model, keep)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    if Path(resolved).is_dir():
        for rel in _SBERT_FILES:
            src = Path(resolved) / rel
            if src.is_file():
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, out / rel)
    record = {"source": os.fspath(source), "resolved": os.fspath(resolved), "kept_layers": keep,
              "original_layers": total}
    write_json_atomic(out / PROVENANCE_FILE, record)
    return out
