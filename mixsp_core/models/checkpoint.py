"""Checkpoint directories: save, load, and ``load_embedder`` for anything the CLI is pointed at.

Layout of one checkpoint directory (format 2; each weight stored once)::

    config.json          {"mixsp_kind": "bi" | "cross", "format_version": 2, "model": {...}, "encoder_dir",
                         "head_dir", "training": {...}}: mixsp's own config, what load_checkpoint reads
    encoder/             the base encoder as a plain HF folder: config.json, model.safetensors (its weights
                         under their HF names), tokenizer files; ``AutoModel.from_pretrained(DIR/encoder)``
    2_MixSPHead/         (bi) the router, projectors and output layer: config.json + model.safetensors
    head/                (cross) the same for the pair scorer's heads (model.safetensors)
    modules.json ...     (bi) the sentence-transformers files (:mod:`mixsp_core.models.st_layout`), so
                         ``SentenceTransformer(DIR, trust_remote_code=True)`` loads the same embedder
    trainer_state.json   (resumable checkpoints only) step, best metric, history, optimizer groups, ...
    optimizer.safetensors (resumable checkpoints only) AdamW moments and the RNG states, as tensors

The model's state dict is the encoder's weights under ``encoder.`` plus the head's (:func:`read_weights`,
what merging averages). Format 1 (every weight in one root ``model.safetensors``, ``encoder/`` without
weights) is still read; everything is written as format 2. No pickle anywhere: weights and optimizer
tensors are safetensors, everything else JSON.
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
from mixsp_core.models.integrity import (WEIGHTS_DIGEST_KEY, check_tokenizer_files, check_tokenizer_fits,
                                         non_finite_tensors, verify_weight_digests, weight_digests)
from mixsp_core.models.st_layout import ENCODER_DIR, HEAD_DIR, write_bi_modules
from mixsp_core.paths import OPTIMIZER_FILE, WEIGHTS_FILE
from mixsp_core.paths import TRAINER_STATE_FILE as STATE_FILE
from mixsp_core.training.config import ModelConfig, build_dataclass

FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)
CONFIG_FILE = "config.json"
CROSS_HEAD_DIR = "head"
KINDS = ("bi", "cross")
ENCODER_PREFIX = "encoder."
StateDict = dict[str, torch.Tensor]


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


def head_dir_of(kind: str) -> str:
    """The folder of a model kind's non-encoder weights: the sentence-transformers head module for ``bi``."""
    return HEAD_DIR if kind == "bi" else CROSS_HEAD_DIR


def save_checkpoint(model: nn.Module, directory: str | os.PathLike[str], extra: dict[str, Any] | None = None,
                    trainer_state: dict[str, Any] | None = None,
                    optimizer: torch.optim.Optimizer | None = None) -> Path:
    """Write ``model`` (a BiStudent or CrossScorer) as one checkpoint directory (format 2), atomically.

    ``extra`` is stored under ``"training"`` in config.json (metrics, step, run config).
    ``trainer_state`` (JSON-able) and ``optimizer`` make the checkpoint resumable. The directory is
    written beside the target and renamed over it, so a crash never leaves a half checkpoint. config.json
    records the sha256 of each weights file (``weights_sha256``), which loading verifies.
    """
    target = Path(directory)
    head_dir = head_dir_of(model.kind)
    with writing_dir(target) as work:
        meta = {
            "mixsp_kind": model.kind,
            "format_version": FORMAT_VERSION,
            "model": asdict(model.model_config),
            "embedding_dim": getattr(model, "dim", None),
            "encoder_dir": ENCODER_DIR,
            "head_dir": head_dir,
            "training": extra or {},
        }
        (work / ENCODER_DIR).mkdir()
        # the encoder as an ordinary HF folder: its own weight names, config and tokenizer
        save_model(model.encoder, str(work / ENCODER_DIR / WEIGHTS_FILE), metadata={"format": "pt"})
        model.encoder.config.save_pretrained(work / ENCODER_DIR)
        model.tokenizer.save_pretrained(work / ENCODER_DIR)
        head = _head_state(model.state_dict())
        if head:
            (work / head_dir).mkdir(exist_ok=True)
            save_file(head, str(work / head_dir / WEIGHTS_FILE), metadata={"format": "pt", "mixsp_kind": model.kind})
        # the weights' sha256, verified at load: a bit flip or a replaced file is refused, not encoded
        meta[WEIGHTS_DIGEST_KEY] = weight_digests(work, weight_files(work, meta).values())
        write_json_atomic(work / CONFIG_FILE, meta, default=str)
        if model.kind == "bi":
            write_bi_modules(work, model.model_config, model.hidden_dim)
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


def _head_state(state: StateDict) -> StateDict:
    """The non-encoder tensors of a model's state dict, detached CPU copies ready for safetensors."""
    return {k: v.detach().cpu().contiguous() for k, v in state.items() if not k.startswith(ENCODER_PREFIX)}


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
    if meta.get("format_version") not in READABLE_FORMATS:
        raise CheckpointError(f"{path}: format_version {meta.get('format_version')!r}, expected one of "
                              f"{READABLE_FORMATS}")
    return meta


def weight_files(directory: str | os.PathLike[str], meta: dict[str, Any] | None = None) -> dict[str, Path]:
    """The safetensors files of a checkpoint by part: ``{"all": root file}`` (format 1) or
    ``{"encoder": encoder/model.safetensors, "head": <head_dir>/model.safetensors}`` (format 2; the head
    file may be absent when the model has no head weights)."""
    directory = Path(directory)
    meta = meta if meta is not None else read_checkpoint_config(directory)
    if meta["format_version"] == 1:
        return {"all": directory / WEIGHTS_FILE}
    head_dir = meta.get("head_dir") or head_dir_of(meta["mixsp_kind"])
    return {"encoder": directory / (meta.get("encoder_dir") or ENCODER_DIR) / WEIGHTS_FILE,
            "head": directory / head_dir / WEIGHTS_FILE}


def has_weights(directory: str | os.PathLike[str]) -> bool:
    """True when ``directory`` is a checkpoint whose encoder (or format-1) weights file exists, or an HF
    folder with a root ``model.safetensors``."""
    directory = Path(directory)
    if not is_checkpoint(directory):
        return (directory / WEIGHTS_FILE).is_file()
    try:
        files = weight_files(directory)
    except CheckpointError:
        return False
    return files.get("all", files.get("encoder")).is_file()


def _load_file(path: Path) -> StateDict:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path}: unreadable safetensors: {err}") from err
    _check_finite(path, state.items())
    return state


def _check_finite(path: Path, tensors) -> None:
    """Refuse NaN / inf in the ``(name, tensor)`` pairs read from the weights file ``path``."""
    bad = non_finite_tensors(tensors)
    if bad:
        raise CheckpointError(f"{path}: tensor {bad[0]} holds NaN or infinite values"
                              f"{f' (and {len(bad) - 1} more)' if len(bad) > 1 else ''}: the file is corrupt")


def verify_weights(directory: str | os.PathLike[str], meta: dict[str, Any] | None = None) -> None:
    """Check the weights files of a checkpoint against the sha256 its config.json records (a checkpoint
    saved before they were recorded passes); CheckpointError naming the file that changed."""
    directory = Path(directory)
    meta = meta if meta is not None else read_checkpoint_config(directory)
    verify_weight_digests(directory, meta.get(WEIGHTS_DIGEST_KEY), directory / CONFIG_FILE)


def read_weights(directory: str | os.PathLike[str]) -> StateDict:
    """Every tensor of a checkpoint on CPU, keyed as the model's state dict: the encoder's under
    ``encoder.``, the heads' as they are (the same keys for format 1 and 2). The files are verified against
    their recorded sha256 and every tensor must be finite (CheckpointError naming the file otherwise)."""
    meta = read_checkpoint_config(directory)
    verify_weights(directory, meta)
    files = weight_files(directory, meta)
    if "all" in files:
        return _load_file(files["all"])
    state = {ENCODER_PREFIX + k: v for k, v in _load_file(files["encoder"]).items()}
    if files["head"].is_file():
        state.update(_load_file(files["head"]))
    return state


def write_weights(directory: str | os.PathLike[str], state: StateDict, meta: dict[str, Any] | None = None) -> None:
    """Write ``state`` (keys as :func:`read_weights` gives them) into the weight files of the checkpoint
    ``directory`` (its config.json says the format), replacing them. For merging: the rest of the
    directory is the caller's, except the weights' sha256 in its config.json, which is updated. Raises
    CheckpointError when format-2 keys lack the ``encoder.`` prefix."""
    files = weight_files(directory, meta)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    if "all" in files:
        save_file(tensors, str(files["all"]), metadata={"format": "pt"})
        _record_digests(Path(directory), files)
        return
    encoder = {k[len(ENCODER_PREFIX):]: v for k, v in tensors.items() if k.startswith(ENCODER_PREFIX)}
    if not encoder:
        raise CheckpointError(f"{directory}: the state to write has no '{ENCODER_PREFIX}*' tensors")
    files["encoder"].parent.mkdir(parents=True, exist_ok=True)
    save_file(encoder, str(files["encoder"]), metadata={"format": "pt"})
    head = _head_state(tensors)
    if head:
        files["head"].parent.mkdir(parents=True, exist_ok=True)
        save_file(head, str(files["head"]), metadata={"format": "pt"})
    elif files["head"].is_file():
        files["head"].unlink()
    _record_digests(Path(directory), files)


def _record_digests(directory: Path, files: dict[str, Path]) -> None:
    """Set config.json's ``weights_sha256`` to the sha256 of the weights files now in ``directory``."""
    cfg = directory / CONFIG_FILE
    meta = json.loads(cfg.read_text(encoding="utf-8"))
    meta[WEIGHTS_DIGEST_KEY] = weight_digests(directory, files.values())
    write_json_atomic(cfg, meta, default=str)


def load_checkpoint(directory: str | os.PathLike[str], device: str | torch.device | None = None) -> nn.Module:
    """Rebuild the model saved in ``directory`` (no base model download: config + weights only).

    Refused with a CheckpointError naming the folder or file: tokenizer files missing or not fitting the
    encoder's embedding table, a weights file whose sha256 differs from the one config.json records, a
    NaN / inf tensor."""
    directory = Path(directory)
    meta = read_checkpoint_config(directory)
    try:
        config = build_dataclass(ModelConfig, meta.get("model"), "model")
        config.validate()
    except ConfigError as err:
        raise CheckpointError(f"{directory / CONFIG_FILE}: {err}") from err
    if config.kind != meta["mixsp_kind"]:
        raise CheckpointError(f"{directory / CONFIG_FILE}: model.kind {config.kind!r} != mixsp_kind")
    encoder_dir = directory / (meta.get("encoder_dir") or ENCODER_DIR)
    if not (encoder_dir / "config.json").is_file():
        raise CheckpointError(f"{encoder_dir / 'config.json'}: missing (the encoder's HF config)")
    check_tokenizer_files(encoder_dir)
    files = weight_files(directory, meta)
    verify_weights(directory, meta)
    from mixsp_core.models.student import empty_encoder

    try:
        encoder, tokenizer = empty_encoder(encoder_dir)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{encoder_dir}: cannot rebuild the encoder or tokenizer: {err}") from err
    check_tokenizer_fits(tokenizer, encoder, encoder_dir)
    if config.kind == "bi":
        from mixsp_core.models.student import BiStudent

        model: nn.Module = BiStudent(config, encoder, tokenizer)
    else:
        from mixsp_core.models.cross import CrossScorer

        model = CrossScorer(config, encoder, tokenizer)
    _load_weights(model, files)
    _check_loaded_finite(model, files)
    if device is not None:
        model.to(device)
    return model.eval()


def _load_weights(model: nn.Module, files: dict[str, Path]) -> None:
    """Fill ``model`` from its weight files (strict: every tensor present, none extra, shapes equal)."""
    for path in ([files["all"]] if "all" in files else [files["encoder"]]):
        if not path.is_file():
            raise CheckpointError(f"{path}: missing")
    try:
        if "all" in files:
            load_model(model, str(files["all"]), strict=True)
            return
        load_model(model.encoder, str(files["encoder"]), strict=True)
    except (SafetensorError, RuntimeError, OSError, ValueError) as err:
        raise CheckpointError(f"{files.get('all', files.get('encoder'))}: corrupt or does not match "
                              f"config.json: {err}") from err
    expected = {k for k in model.state_dict() if not k.startswith(ENCODER_PREFIX)}
    head = _load_file(files["head"]) if expected or files["head"].is_file() else {}
    if set(head) != expected:
        raise CheckpointError(f"{files['head']}: does not match config.json: missing "
                              f"{sorted(expected - set(head))[:5]}, unexpected {sorted(set(head) - expected)[:5]}")
    try:
        model.load_state_dict(head, strict=False)
    except RuntimeError as err:
        raise CheckpointError(f"{files['head']}: does not match config.json: {err}") from err


def _check_loaded_finite(model: nn.Module, files: dict[str, Path]) -> None:
    """Refuse NaN / inf in ``model``'s tensors just loaded from ``files``, naming the file each came from."""
    if "all" in files:
        _check_finite(files["all"], model.state_dict().items())
        return
    state = model.state_dict()
    _check_finite(files["encoder"], ((k[len(ENCODER_PREFIX):], v) for k, v in state.items()
                                     if k.startswith(ENCODER_PREFIX)))
    _check_finite(files["head"], ((k, v) for k, v in state.items() if not k.startswith(ENCODER_PREFIX)))


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
                  token_budget: int | str | None = "auto", backend: str = "torch"):
    """Whatever the CLI's ``--model`` names, ready to use:

    * a directory this project saved (config.json with ``"mixsp_kind"``): a :class:`BiStudent`
      (``.encode``) or a :class:`CrossScorer` (``.predict`` only);
    * a Hub id or a plain HF folder: a :class:`mixsp_core.models.encoder.Encoder`.

    ``dims`` keeps the first k output dimensions (re-normalised). A directory with a ``transform/``
    folder (a compressed model, :mod:`mixsp_core.compress`) comes wrapped in its fitted transform. A
    directory with a broken or missing checkpoint file raises CheckpointError naming the file.
    ``precision`` / ``quantize`` / ``token_budget`` / ``backend``: how an embedder encodes (fast path; see
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
            model.configure_inference(precision, quantize, token_budget, backend=backend)
        elif (precision, quantize, token_budget, backend) != ("auto", None, "auto", "torch"):
            raise ValueError(f"{path}: precision / quantize / token budget / backend apply to embedders; "
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
                      token_budget=token_budget, backend=backend)
    if dims is not None:
        if not 1 <= dims <= encoder.dim:
            raise ValueError(f"dims must lie in 1..{encoder.dim}, got {dims}")
        encoder = TruncatedEncoder(encoder, dims)
    return wrap_if_transformed(encoder, path) if path.is_dir() else encoder
