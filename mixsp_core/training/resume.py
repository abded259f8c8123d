"""When a run directory may be continued, decided in one place for the trainer and the pipeline.

A run's ``last/trainer_state.json`` records the config it was written with. "The same config" means:
equal in every field except the resume-free ones (:data:`RESUME_FREE`: how the run is executed, not
what it trains) and ``tracking.*``; a field missing from the saved config (one added to
:class:`RunConfig` after that run) compares as its default, so adding a config field with a default
keeps old runs resumable; a field the saved config has and this version no longer knows compares
against None (it differs unless it was None).

Two questions, one definition of "same config":

* :func:`can_resume` (the pipeline's train stage, before it decides to keep or clear old snapshots):
  is ``last/`` an *interrupted* run (step < total_steps) of this same config? A finished run, another
  config or an unreadable state all say no: a retrain must train again.
* :func:`resume_state` (the loop, when ``train.resume`` is on): the saved state to continue from. A
  finished run of the same config is returned too (the loop then trains no step and reports its best
  model again); another config raises, so a run directory is never silently overwritten by a
  different run.
"""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch

from mixsp_core.errors import CheckpointError
from mixsp_core.models.checkpoint import read_trainer_state
from mixsp_core.paths import RunDir, stage_dir
from mixsp_core.training.config import RunConfig, config_from_dict, flatten, stage_configs
from mixsp_core.training.report import TrainResult

# settings that may change between an interrupted run and its resumption without changing the run
RESUME_FREE = frozenset({"train.resume", "train.device", "train.eval_batch_size", "train.log_every", "output_dir",
                         "train.num_threads", "train.snapshot_every"})


def config_difference(saved: dict[str, Any], config: RunConfig) -> tuple[str, Any, Any] | None:
    """The first field (by name) in which ``saved`` (a run's ``config.to_dict()``, as stored in its
    trainer state) and ``config`` differ as runs: ``(field, saved value, current value)``; None if the same."""
    saved_flat, current = flatten(saved), flatten(config.to_dict())
    defaults = flatten(config_from_dict({}).to_dict())  # fields newer than the saved run read as their default
    for key in sorted(set(saved_flat) | set(current)):
        if key in RESUME_FREE or key.startswith("tracking."):
            continue
        if saved_flat.get(key, defaults.get(key)) != current.get(key):
            return key, saved_flat.get(key), current.get(key)
    return None


def can_resume(config: RunConfig, run: RunDir) -> bool:
    """True when ``run.last`` holds an interrupted run (step < total_steps) of this same config."""
    if config.stages:  # a multi-stage run: interrupted in or between its stages (training.multistage)
        return can_resume_stages(config, run)
    run.repair()  # a last/ (best/) that a kill mid-swap left as .last.old still resumes
    try:
        state = json.loads(run.trainer_state.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # missing or unreadable: nothing to resume
        return False
    if config_difference(state.get("config", {}), config) is not None:
        return False
    return int(state.get("step", 0)) < int(state.get("total_steps", 0))


def resume_state(config: RunConfig, run: RunDir) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
    """The trainer state of ``run.last`` and its optimizer/RNG tensors (as
    :func:`~mixsp_core.models.checkpoint.read_trainer_state` reads them), or None when ``run.last`` holds
    no trainer state. Raises :class:`CheckpointError` when the state is unreadable or was written by
    another config."""
    run.repair()
    if not run.trainer_state.is_file():
        return None
    state, tensors = read_trainer_state(run.last)
    difference = config_difference(state.get("config", {}), config)
    if difference is not None:
        key, saved, current = difference
        raise CheckpointError(
            f"{run.trainer_state}: was written by a run with {key}={saved!r}, this config "
            f"has {current!r}; use another output directory or set train.resume: false")
    return state, tensors


STAGE_RESULT_FILE = "stage_result.json"  # written when a stage finished: its config and its TrainResult


def result_to_json(result: TrainResult) -> dict[str, Any]:
    return json.loads(json.dumps(asdict(result), default=str))


def _result_from_json(data: dict[str, Any]) -> TrainResult:
    known = {f.name for f in fields(TrainResult)}
    values = {k: v for k, v in data.items() if k in known}
    values["output_dir"] = Path(values["output_dir"])
    values["best_checkpoint"] = Path(values["best_checkpoint"]) if values.get("best_checkpoint") else None
    return TrainResult(**values)


def finished_stage(config: RunConfig, run: RunDir) -> TrainResult | None:
    """The recorded result of the stage in ``run`` when it finished with this same config (else None)."""
    path = run.root / STAGE_RESULT_FILE
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not run.best.is_dir():
        return None
    if config_difference(record.get("config", {}), config) is not None:
        return None
    return _result_from_json(record.get("result", {}))


def can_resume_stages(config: RunConfig, run: RunDir) -> bool:
    """:func:`can_resume` for a multi-stage run: a stage of this same config
    finished or interrupted, and the final stage not finished."""
    chain = [(c, RunDir(stage_dir(run.root, s.name))) for s, c in zip(config.stages, stage_configs(config, run.root))]
    if finished_stage(*chain[-1]) is not None:
        return False
    return any(finished_stage(c, r) is not None or can_resume(c, r) for c, r in chain)
