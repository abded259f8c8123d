"""Checkpoint directories: save, load, and ``load_embedder`` for anything the CLI is pointed at.

Layout of one checkpoint directory::

    config.json          {"mixsp_kind": "bi" | "cross", "format_version": 1, "model": {...}, ...}
    model.safetensors    every weight (encoder.*, routed.*, output.* / head.*)
    encoder/             the base encoder's HF config.json and its tokenizer files (no weights)
    trainer_state.json   (resumable checkpoints only) step, best metric, history, optimizer groups, ...
    optimizer.safetensors (resumable checkpoints only) AdamW moments and the RNG states, as tensors

No pickle anywhere: weights and optimizer tensors are safetensors, everything else JSON.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from mixsp_core.errors import CheckpointError, ConfigError
from mixsp_core.io import write_json_atomic, writing_dir
from mixsp_core.paths import OPTIMIZER_FILE, WEIGHTS_FILE
from mixsp_core.paths import TRAINER_STATE_FILE as STATE_FILE
from mixsp_core.training.config import ModelConfig, build_dataclass

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
ENCODER_DIR = "encoder"
KINDS = ("bi", "cross")


def build_model(config: ModelConfig) -> nn.Module:
    """A fresh model of ``config.kind`` on the pretrained base encoder."""
    if config.kind == "bi":
        from mixsp_core.models.student import BiStudent

        return BiStudent.from_config(config)
    if config.kind == "cross":
        from mixsp_core.models.cross import CrossScorer

        return CrossScorer.from_config(config)
    raise ConfigError("model.kind", f"cannot build a trainable model of kind {config.kind!r}")


def is_checkpoint(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a directory whose config.json carries ``"mixsp_kind"``."""
    cfg = Path(path) / CONFIG_FILE
    if not cfg.is_file():
        return False
    try:
        return "mixsp_kind" in json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False


def save_checkpoint(model: nn.Module, directory: str | os.PathLike[str], extra: dict[str, Any] | None = None,
                    trainer_state: dict[str, Any] | None = None,
                    optimizer: torch.optim.Optimizer | None = None) -> Path:
    """Write ``model`` (a BiStudent or CrossScorer) as one checkpoint directory, atomically.

    ``extra`` is stored under ``"training"`` in config.json (metrics, step, run config).
    ``trainer_state`` (JSON-able) and ``optimizer`` make the checkpoint resumable. The directory is
    written beside the target and renamed over it, so a crash never leaves a half checkpoint.
    """
    target = Path(directory)
    with writing_dir(target) as work:
        meta = {
            "mixsp_kind": model.kind,
            "format_version": FORMAT_VERSION,
            "model": asdict(model.model_config),
            "embedding_dim": getattr(model, "dim", None),
            "encoder_dir": ENCODER_DIR,
            "training": extra or {},
        }
        write_json_atomic(work / CONFIG_FILE, meta, default=str)
        save_model(model, str(work / WEIGHTS_FILE), metadata={"format": "pt", "mixsp_kind": model.kind})
        model.encoder.config.save_pretrained(work / ENCODER_DIR)
        model.tokenizer.save_pretrained(work / ENCODER_DIR)
        if trainer_state is not None:
            state = dict(trainer_state)
            if optimizer is not None:
                tensors, state["optimizer"] = _flatten_optimizer(optimizer.state_dict())
                tensors["rng.torch"] = torch.get_rng_state()
                if torch.cuda.is_available():
                    for i, s in enumerate(torch.cuda.get_rng_state_all()):
                        tensors[f"rng.cuda.{i}"] = s
                save_file(tensors, str(work / OPTIMIZER_FILE))
            write_json_atomic(work / STATE_FILE, state, default=str)
    return target


def read_checkpoint_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """config.json of a checkpoint, checked; raises CheckpointError naming the file."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (not a checkpoint directory)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable JSON: {err}") from err
    if meta.get("mixsp_kind") not in KINDS:
        raise CheckpointError(f"{path}: 'mixsp_kind' must be one of {KINDS}, got {meta.get('mixsp_kind')!r}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {meta.get('format_version')!r}, expected {FORMAT_VERSION}")
    return meta


def load_checkpoint(directory: str | os.PathLike[str], device: str | torch.device | None = None) -> nn.Module:
    """Rebuild the model saved in ``directory`` (no base model download: config + weights only)."""
    directory = Path(directory)
    meta = read_checkpoint_config(directory)
    try:
        config = build_dataclass(ModelConfig, meta.get("model"), "model")
        config.validate()
    except ConfigError as err:
        raise CheckpointError(f"{directory / CONFIG_FILE}: {err}") from err
    if config.kind != meta["mixsp_kind"]:
        raise CheckpointError(f"{directory / CONFIG_FILE}: model.kind {config.kind!r} != mixsp_kind")
    encoder_dir = directory / ENCODER_DIR
    if not (encoder_dir / "config.json").is_file():
        raise CheckpointError(f"{encoder_dir / 'config.json'}: missing (the encoder's HF config)")
    from mixsp_core.models.student import empty_encoder

    try:
        encoder, tokenizer = empty_encoder(encoder_dir)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{encoder_dir}: cannot rebuild the encoder or tokenizer: {err}") from err
    if config.kind == "bi":
        from mixsp_core.models.student import BiStudent

        model: nn.Module = BiStudent(config, encoder, tokenizer)
    else:
        from mixsp_core.models.cross import CrossScorer

        model = CrossScorer(config, encoder, tokenizer)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{weights}: missing")
    try:
        load_model(model, str(weights), strict=True)
    except (SafetensorError, RuntimeError, OSError, ValueError) as err:
        raise CheckpointError(f"{weights}: corrupt or does not match config.json: {err}") from err
    if device is not None:
        model.to(device)
    return model.eval()


def read_trainer_state(directory: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """trainer_state.json and the optimizer/RNG tensors of a resumable checkpoint."""
    directory = Path(directory)
    state_path, opt_path = directory / STATE_FILE, directory / OPTIMIZER_FILE
    if not state_path.is_file():
        raise CheckpointError(f"{state_path}: missing (not a resumable checkpoint)")
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{state_path}: unreadable JSON: {err}") from err
    tensors: dict[str, torch.Tensor] = {}
    if "optimizer" in state:
        if not opt_path.is_file():
            raise CheckpointError(f"{opt_path}: missing (trainer_state.json lists optimizer state)")
        try:
            tensors = load_file(str(opt_path))
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{opt_path}: corrupt: {err}") from err
    return state, tensors


def restore_optimizer(optimizer: torch.optim.Optimizer, state: dict[str, Any],
                      tensors: dict[str, torch.Tensor], where: str | Path = "") -> None:
    """Load the optimizer state saved by :func:`save_checkpoint`, and the RNG states."""
    try:
        optimizer.load_state_dict(_unflatten_optimizer(state["optimizer"], tensors))
    except (KeyError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{where}: optimizer state does not match this model: {err}") from err
    if "rng.torch" in tensors:
        torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(t for t in tensors if t.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def _flatten_optimizer(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, slots in sd["state"].items():
        for key, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"opt.{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("opt."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value
    for idx, slots in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(slots)
    return {"state": state, "param_groups": meta["param_groups"]}


class TruncatedEncoder:
    """A plain Encoder whose outputs keep the first ``dims`` dimensions, re-normalised."""

    def __init__(self, encoder, dims: int):
        self.encoder, self.dims = encoder, dims

    def encode(self, sentences, batch_size: int = 64, show_progress: bool = True):
        import numpy as np

        vec = self.encoder.encode(sentences, batch_size=batch_size, show_progress=show_progress)[:, : self.dims]
        return (vec / np.maximum(np.linalg.norm(vec, axis=1, keepdims=True), 1e-12)).astype(np.float32)

    def __getattr__(self, name: str):
        return getattr(self.encoder, name)


def load_embedder(name_or_path: str | os.PathLike[str], device: str | None = None, dims: int | None = None,
                  max_length: int = 256, precision: str = "auto", quantize: str | None = None,
                  token_budget: int | str | None = "auto"):
    """Whatever the CLI's ``--model`` names, ready to use:

    * a directory this project saved (config.json with ``"mixsp_kind"``): a :class:`BiStudent`
      (``.encode``) or a :class:`CrossScorer` (``.predict`` only);
    * a Hub id or a plain HF folder: a :class:`mixsp_core.models.encoder.Encoder`.

    ``dims`` keeps the first k output dimensions (re-normalised). A directory with a ``transform/``
    folder (a compressed model, :mod:`mixsp_core.compress`) comes wrapped in its fitted transform. A
    directory with a broken or missing checkpoint file raises CheckpointError naming the file.
    ``precision`` / ``quantize`` / ``token_budget``: how an embedder encodes (fast path; see
    :class:`~mixsp_core.models.encoder.Encoder`); a cross model takes only the defaults.
    """
    from mixsp_core.compress import TRANSFORM_SUBDIR, transform_dir, wrap_if_transformed

    path = Path(os.fspath(name_or_path)).expanduser()
    cfg = path / CONFIG_FILE
    if dims is not None and transform_dir(path / TRANSFORM_SUBDIR) is not None:
        raise ValueError(f"{path / TRANSFORM_SUBDIR}: this model's saved transform sets its output width; "
                         "--dims does not apply to it")
    looks_saved = path.is_dir() and ((path / WEIGHTS_FILE).is_file() or (path / ENCODER_DIR).is_dir())
    if path.is_dir() and (is_checkpoint(path) or (looks_saved and not cfg.is_file())):
        model = load_checkpoint(path, device=device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if model.kind == "bi":
            model.configure_inference(precision, quantize, token_budget)
        elif (precision, quantize, token_budget) != ("auto", None, "auto"):
            raise ValueError(f"{path}: precision / quantize / token budget apply to embedders; "
                             "a cross model scores pairs")
        if dims is not None:
            if model.kind != "bi":
                raise ValueError(f"{path}: --dims applies to embedders; a cross model scores pairs")
            if not 1 <= dims <= model.dim:
                raise ValueError(f"dims must lie in 1..{model.dim}, got {dims}")
            model.dims = dims
        return wrap_if_transformed(model, path)
    if path.is_dir() and cfg.is_file():
        try:
            json.loads(cfg.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise CheckpointError(f"{cfg}: unreadable JSON: {err}") from err
    from mixsp_core.models.encoder import Encoder

    encoder = Encoder(name_or_path, device=device, max_length=max_length, precision=precision, quantize=quantize,
                      token_budget=token_budget)
    if dims is not None:
        if not 1 <= dims <= encoder.dim:
            raise ValueError(f"dims must lie in 1..{encoder.dim}, got {dims}")
        encoder = TruncatedEncoder(encoder, dims)
    return wrap_if_transformed(encoder, path) if path.is_dir() else encoder
