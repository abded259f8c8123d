"""Model merging: uniform soup, greedy soup and delta-guided fusion of checkpoints from one start.

Works on state dicts read with safetensors (a project checkpoint's weight files, or ``model.safetensors``
of a plain HF folder). A merged model is written as an ordinary checkpoint: a copy of the first checkpoint's
directory (configs, tokenizer, sentence-transformers modules) with the merged weights in its weight files,
and a ``"merge"`` record (method, start model, inputs, settings, scores) in its config.json and in
``merge.json``.

Delta-guided fusion (METHODS.md section 5; CoDiEmb publishes no formula, this is the project's): for each
weight element, checkpoint c gets w_c = |θ_c - θ_0|^p / Σ_c' |θ_c' - θ_0|^p, and the merge is
θ_0 + Σ_c w_c (θ_c - θ_0). p = 0 gives the uniform soup, large p picks the checkpoint that moved most.
An element no checkpoint moved stays θ_0.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from mixsp_core.errors import CheckpointError, ConfigError
from mixsp_core.io import write_json_atomic, writing_dir
from mixsp_core.paths import OPTIMIZER_FILE, TRAINER_STATE_FILE, WEIGHTS_FILE

StateDict = dict[str, torch.Tensor]
MERGE_FILE = "merge.json"
METHODS = ("uniform", "greedy", "fusion")
# Files of a source checkpoint that do not describe the merged model.
_NOT_COPIED = {WEIGHTS_FILE, TRAINER_STATE_FILE, OPTIMIZER_FILE, MERGE_FILE, "transform"}
# The project's BiStudent / CrossScorer keep the HF encoder under this prefix.
_ENCODER_PREFIX = "encoder."


def weights_path(path: str | os.PathLike[str]) -> Path:
    """Where the weights of ``path`` live: a project checkpoint directory itself (its weights are split
    over ``encoder/`` and the head's folder, see :func:`mixsp_core.models.checkpoint.read_weights`), else
    the safetensors file: the file itself, ``DIR/model.safetensors``, or a Hub id's folder's."""
    from mixsp_core.models.checkpoint import is_checkpoint

    p = Path(os.fspath(path)).expanduser()
    if p.is_file():
        return p
    if p.is_dir():
        if is_checkpoint(p):
            return p
        if (p / WEIGHTS_FILE).is_file():
            return p / WEIGHTS_FILE
        raise CheckpointError(f"{p / WEIGHTS_FILE}: missing")
    from mixsp_core.models.resolve import resolve_model

    resolved = Path(resolve_model(os.fspath(path)))
    if not (resolved / WEIGHTS_FILE).is_file():
        raise CheckpointError(f"{resolved / WEIGHTS_FILE}: missing (resolved from {path})")
    return resolved / WEIGHTS_FILE


def read_state(path: str | os.PathLike[str]) -> StateDict:
    """All tensors of a checkpoint on CPU (see :func:`weights_path`): a project checkpoint's keyed as its
    model's state dict (the encoder's under ``encoder.``), a plain safetensors file's as they are."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from mixsp_core.models.checkpoint import read_weights

    file = weights_path(path)
    if file.is_dir():
        return read_weights(file)
    try:
        return load_file(str(file), device="cpu")
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{file}: unreadable safetensors: {err}") from err


def check_compatible(states: Sequence[StateDict], names: Sequence[str] | None = None) -> None:
    """Raise CheckpointError unless every state has the keys, shapes and dtypes of the first."""
    if not states:
        raise ValueError("no checkpoints to merge")
    names = list(names) if names is not None else [f"checkpoint {i}" for i in range(len(states))]
    ref = states[0]
    for state, name in zip(states[1:], names[1:]):
        missing, extra = sorted(set(ref) - set(state)), sorted(set(state) - set(ref))
        if missing or extra:
            raise CheckpointError(f"{name}: keys differ from {names[0]}: missing {missing[:5]}, extra {extra[:5]}")
        for key, tensor in ref.items():
            other = state[key]
            if other.shape != tensor.shape or other.dtype != tensor.dtype:
                raise CheckpointError(f"{name}: tensor {key!r} is {tuple(other.shape)} {other.dtype}, "
                                      f"{names[0]} has {tuple(tensor.shape)} {tensor.dtype}")


def _integer_tensor(states: Sequence[StateDict], key: str, names: Sequence[str] | None) -> torch.Tensor:
    """Non-float tensors (position ids and the like) cannot be averaged: they must agree."""
    first = states[0][key]
    for i, state in enumerate(states[1:], start=1):
        if not torch.equal(state[key], first):
            who = names[i] if names else f"checkpoint {i}"
            raise CheckpointError(f"{who}: non-float tensor {key!r} differs from the first checkpoint")
    return first.clone()


def uniform_soup(states: Sequence[StateDict], names: Sequence[str] | None = None) -> StateDict:
    """Element-wise mean of the states (computed in float64, cast back to each tensor's dtype)."""
    check_compatible(states, names)
    merged: StateDict = {}
    for key, ref in states[0].items():
        if not ref.is_floating_point():
            merged[key] = _integer_tensor(states, key, names)
            continue
        total = torch.zeros(ref.shape, dtype=torch.float64)
        for state in states:
            total += state[key].to(torch.float64)
        merged[key] = (total / len(states)).to(ref.dtype)
    return merged


@dataclass
class FusionInfo:
    """What delta-guided fusion did: ``p``, and the keys with no start value (merged uniformly)."""

    p: float
    keys_without_start: list[str] = field(default_factory=list)
    mean_weights: list[float] = field(default_factory=list)  # average w_c over all fused elements


def start_value(start: StateDict, key: str) -> torch.Tensor | None:
    """θ_0 for ``key``: the same key, or the key without ``encoder.`` (start given as the base HF encoder)."""
    if key in start:
        return start[key]
    if key.startswith(_ENCODER_PREFIX) and key[len(_ENCODER_PREFIX):] in start:
        return start[key[len(_ENCODER_PREFIX):]]
    return None


def delta_fusion(start: StateDict, states: Sequence[StateDict], p: float = 1.0,
                 names: Sequence[str] | None = None) -> tuple[StateDict, FusionInfo]:
    """Delta-guided fusion of ``states`` fine-tuned from ``start`` (see the module docstring).

    ``start`` may be the same layout or the base HF encoder (keys without ``encoder.``). Keys the start
    lacks (for example heads initialised per seed) fall back to the uniform mean and are listed in the
    returned :class:`FusionInfo`. ``p`` must be >= 0.
    """
    if p < 0 or p != p:
        raise ConfigError("merge.p", f"must be >= 0, got {p}")
    check_compatible(states, names)
    info = FusionInfo(p=float(p))
    merged: StateDict = {}
    weight_sums = torch.zeros(len(states), dtype=torch.float64)
    fused_elements = 0
    for key, ref in states[0].items():
        if not ref.is_floating_point():
            merged[key] = _integer_tensor(states, key, names)
            continue
        theta0 = start_value(start, key)
        if theta0 is None or theta0.shape != ref.shape:
            info.keys_without_start.append(key)
            merged[key] = uniform_soup([{key: s[key]} for s in states])[key]
            continue
        base = theta0.to(torch.float64)
        deltas = torch.stack([s[key].to(torch.float64) - base for s in states])  # (C, ...)
        magnitude = deltas.abs()
        # Scale by the largest |delta| per element before the power: same weights, no under/overflow.
        peak = magnitude.amax(dim=0, keepdim=True)
        moved = peak > 0
        ratio = torch.where(moved, magnitude / torch.where(moved, peak, torch.ones_like(peak)), 0.0)
        powered = ratio.pow(p) if p > 0 else torch.ones_like(ratio)
        total = powered.sum(dim=0, keepdim=True)
        # Elements no checkpoint moved (total 0 when p > 0) get zero weights: they stay θ_0.
        weights = powered / torch.where(total > 0, total, torch.ones_like(total))
        merged[key] = (base + (weights * deltas).sum(dim=0)).to(ref.dtype)
        weight_sums += weights.reshape(len(states), -1).sum(dim=1)
        fused_elements += ref.numel()
    if fused_elements:
        info.mean_weights = (weight_sums / fused_elements).tolist()
    return merged, info


@dataclass
class GreedyReport:
    """Greedy soup: ``order`` (indices, best dev first), their ``scores``, the indices kept, and the
    soup's score after each try."""

    order: list[int]
    scores: list[float]
    kept: list[int]
    trajectory: list[dict[str, Any]]
    final_score: float


def greedy_soup(states: Sequence[StateDict], score: Callable[[StateDict], float],
                scores: Sequence[float] | None = None,
                names: Sequence[str] | None = None) -> tuple[StateDict, GreedyReport]:
    """Greedy soup (Wortsman et al., 2022): sort the checkpoints by dev score, start from the best, and
    add each next one when the uniform soup of the kept set plus it scores at least as well on dev.

    ``score(state) -> float`` evaluates a state on dev (higher is better); ``scores`` are the
    individual checkpoints' dev scores when already known (otherwise computed with ``score``).
    """
    check_compatible(states, names)
    individual = list(scores) if scores is not None else [float(score(s)) for s in states]
    if len(individual) != len(states):
        raise ValueError(f"{len(individual)} scores for {len(states)} checkpoints")
    order = sorted(range(len(states)), key=lambda i: -individual[i])
    kept = [order[0]]
    best = individual[order[0]]
    soup = {k: v.clone() for k, v in states[order[0]].items()}
    trajectory: list[dict[str, Any]] = [{"added": order[0], "score": best, "kept": True}]
    for idx in order[1:]:
        candidate = uniform_soup([states[i] for i in [*kept, idx]])
        value = float(score(candidate))
        accept = value >= best
        trajectory.append({"added": idx, "score": value, "kept": accept})
        if accept:
            kept.append(idx)
            best, soup = value, candidate
    return soup, GreedyReport(order=order, scores=individual, kept=kept, trajectory=trajectory, final_score=best)


# -- checkpoint directories ----------------------------------------------------------------------

def write_merged(template: str | os.PathLike[str], state: StateDict, output_dir: str | os.PathLike[str],
                 record: dict[str, Any] | None = None) -> Path:
    """Write ``state`` as a checkpoint shaped like ``template`` (a checkpoint or HF folder) at
    ``output_dir``, atomically. ``record`` goes to ``merge.json`` and, for project checkpoints, under
    ``"merge"`` in config.json."""
    from safetensors.torch import save_file

    from mixsp_core.models.checkpoint import is_checkpoint, weight_files, write_weights

    template = Path(os.fspath(template))
    if not template.is_dir():
        raise CheckpointError(f"{template}: a merged model needs a checkpoint directory as template")
    project = is_checkpoint(template)
    # the template's own weights are replaced, not copied
    skip = {template / name for name in _NOT_COPIED} | (set(weight_files(template).values()) if project else set())
    target = Path(os.fspath(output_dir))
    with writing_dir(target) as work:
        shutil.copytree(template, work, dirs_exist_ok=True,
                        ignore=lambda folder, names: [n for n in names if Path(folder) / n in skip])
        if project:
            write_weights(work, state)
        else:
            tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
            save_file(tensors, str(work / WEIGHTS_FILE), metadata={"format": "pt"})
        if record is not None:
            write_json_atomic(work / MERGE_FILE, record, default=str)
            if project:
                cfg = work / "config.json"
                meta = json.loads(cfg.read_text(encoding="utf-8"))
                # Training metrics of the template do not describe the merge.
                meta["training"] = {}
                meta["merge"] = record
                write_json_atomic(cfg, meta, default=str)
    return target


@dataclass
class MergeResult:
    """The merged checkpoint's directory and the record written beside it."""

    path: Path
    record: dict[str, Any]


def merge_checkpoints(checkpoints: Sequence[str | os.PathLike[str]], output_dir: str | os.PathLike[str],
                      method: str, start: str | os.PathLike[str] | None = None, p: float = 1.0,
                      score_dir: Callable[[Path], float] | None = None,
                      scores: Sequence[float] | None = None) -> MergeResult:
    """Merge checkpoint directories fine-tuned from ``start`` into ``output_dir``.

    ``method``: ``uniform``, ``greedy`` (needs ``score_dir(path) -> dev score`` for candidate soups,
    which are written to a temporary checkpoint; ``scores`` are the inputs' own dev scores if known) or
    ``fusion`` (needs ``start``: a checkpoint of the same layout, or the base model's HF folder / Hub id;
    ``p``: the exponent). ``start`` is recorded for every method.
    """
    if method not in METHODS:
        raise ConfigError("merge.method", f"must be one of {METHODS}, got {method!r}")
    if not checkpoints:
        raise ConfigError("merge.checkpoints", "list at least one checkpoint")
    names = [os.fspath(c) for c in checkpoints]
    states = [read_state(c) for c in checkpoints]
    check_compatible(states, names)
    record: dict[str, Any] = {"method": method, "start": None if start is None else os.fspath(start),
                              "checkpoints": names}
    template = Path(names[0])
    if method == "uniform":
        merged = uniform_soup(states, names)
    elif method == "fusion":
        if start is None:
            raise ConfigError("merge.start", "delta-guided fusion needs the start model the checkpoints "
                                              "were trained from")
        merged, info = delta_fusion(read_state(start), states, p=p, names=names)
        record["fusion"] = asdict(info)
        record["start_weights"] = str(weights_path(start))
    else:
        if score_dir is None:
            raise ConfigError("merge.method", "greedy soup needs a dev scoring function")
        scratch = Path(tempfile.mkdtemp(prefix="greedy-soup-"))
        try:
            def score_state(state: StateDict) -> float:
                return float(score_dir(write_merged(template, state, scratch / "candidate")))

            if scores is None:
                scores = [float(score_dir(Path(n))) for n in names]
            merged, report = greedy_soup(states, score_state, scores=scores, names=names)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        record["greedy"] = asdict(report)
        record["kept_checkpoints"] = [names[i] for i in report.kept]
    path = write_merged(template, merged, output_dir, record)
    return MergeResult(path=path, record=record)
