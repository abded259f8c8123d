"""Multi-stage runs: a config with ``stages`` trains each stage as one run of the same loop
(:func:`~mixsp_core.training.loop.run_training`, which passes itself in as ``train``), in order, each from the previous stage's checkpoint.

A stage's config is the run's own config with the stage's ``overrides`` applied (dotted keys or nested
sections), and is validated as a run of its own; errors name ``stages[i].overrides.<field>``. Stages may
not change what the chain shares: the architecture (``model.*``: the weights carry over), the inputs read
once for every stage (``data.spec``, ``data.corpus``, ``data.teacher``), the tracking run (``tracking.*``),
``train.resume``, ``name`` and ``output_dir``; a later stage may not set ``train.init_checkpoint`` (the chain
sets it), the first stage inherits the run's (a chain may start from an earlier run's checkpoint).

Layout: stage NAME trains in ``output_dir/stages/NAME/`` (a full :class:`~mixsp_core.paths.RunDir`) and
starts (``train.init_checkpoint``) from the previous stage's ``best/`` by default: the stage's dev-selected
model, so a stage that only hurt dev (e.g. SimCSE on a model already trained for similarity) hands on its
step-0 model when ``train.eval_at_start`` is on, rather than its drifted last weights. ``init: last`` takes
the previous stage's ``last/`` instead (for a stage whose objective is not meant to be selected on the dev
sets; it needs that stage's ``train.save_last``). The final stage's best becomes the run's result, so what
reads a run is unchanged: ``best/`` (its seen pairs: those of every stage), ``metrics.json`` (plus
``stages``: each stage's best metrics), ``history.json`` (every stage's evaluations, with ``stage``),
``plots/`` and ``run_config.yaml`` (the whole config, stages included) at the top level.

Resume: a stage that finished (its ``stage_result.json`` records the same stage config) is skipped; an
interrupted one resumes from its own ``last/`` (the loop's resume rules, per stage); ``train.resume: false``
trains every stage again (and clears each stage's old ``snapshots/`` and ``start/``). :func:`mixsp_core.training.resume.can_resume_stages`
is the pipeline's "an interrupted run of this config?" for a staged run.

Tracking: one tracker for the whole run; each stage's params, metrics, tags and artifacts carry the prefix
``NAME/`` (``simcse/dev/mean``, ``simcse/train.lr``); the run's result is logged unprefixed at the end.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from mixsp_core.evaluate.contamination import read_seen_pairs, write_seen_pairs
from mixsp_core.io import write_json_atomic, writing_dir
from mixsp_core.paths import RunDir
from mixsp_core.tracking.metrics import dev_metrics as named_dev_metrics
from mixsp_core.tracking.tracker import Tracker
from mixsp_core.paths import STAGES_DIR, stage_dir
from mixsp_core.training.config import RunConfig, dump_config, flatten, stage_configs
from mixsp_core.training.report import TrainResult
from mixsp_core.training.resume import STAGE_RESULT_FILE, finished_stage, result_to_json

if TYPE_CHECKING:  # annotations only
    from mixsp_core.training.distributed import DistContext

class StageTracker:
    """``tracker`` seen by one stage: params, metrics and tags named ``<prefix>key``, artifacts under
    ``stages/<stage>/``; a stage finishing normally does not end the run (a failed one does)."""

    def __init__(self, tracker: Tracker, stage: str):
        self.inner, self.stage, self.prefix = tracker, stage, f"{stage}/"

    @property
    def run_id(self) -> str | None:
        return self.inner.run_id

    def log_params(self, params: dict[str, Any]) -> None:
        self.inner.log_params({self.prefix + k: v for k, v in params.items()})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.inner.log_metrics({self.prefix + k: v for k, v in metrics.items()}, step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        folder = f"{STAGES_DIR}/{self.stage}"
        if Path(path).is_dir():  # a directory's artifacts go to artifact_path (default: its own name)
            self.inner.log_artifact(path, f"{folder}/{artifact_path or Path(path).name}")
        else:  # a file goes into the directory artifact_path
            self.inner.log_artifact(path, f"{folder}/{artifact_path}" if artifact_path else folder)

    def set_tags(self, tags: dict[str, str]) -> None:
        self.inner.set_tags({self.prefix + k: v for k, v in tags.items()})

    def finish(self, status: str = "FINISHED") -> None:
        if status != "FINISHED":
            self.inner.finish(status)


def run_stages(config: RunConfig, pairs: pd.DataFrame, corpus: Sequence[str] | None,
               teacher_targets: np.ndarray | None, run: RunDir, tracker: Tracker, triplets: pd.DataFrame | None,
               show_progress: bool, ctx: DistContext, train: Callable[..., TrainResult]) -> TrainResult:
    """Train every stage of ``config`` in order (see the module doc): the body of ``run_training`` for a config
    with stages, on one process (rank ``ctx.rank``; under torchrun every stage uses the group joined there),
    holding the run directory's lock."""
    if ctx.is_main:
        run.root.mkdir(parents=True, exist_ok=True)
        dump_config(config, run.config)
    tracker.set_tags({"mixsp_kind": config.model.kind, "config_name": config.name,
                      "mixsp.stages": ",".join(s.name for s in config.stages)})
    results: list[TrainResult] = []
    for stage, stage_config in zip(config.stages, stage_configs(config, run.root)):
        stage_run = RunDir(stage_dir(run.root, stage.name))
        done = finished_stage(stage_config, stage_run) if stage_config.train.resume else None
        if done is None:
            ctx.barrier()  # every rank has looked for the record before rank 0 removes it
            if ctx.is_main:
                (stage_run.root / STAGE_RESULT_FILE).unlink(missing_ok=True)
                if not stage_config.train.resume:  # an older run's merge inputs are not this run's
                    shutil.rmtree(stage_run.snapshots, ignore_errors=True)
                    shutil.rmtree(stage_run.start, ignore_errors=True)
            done = train(stage_config, pairs, corpus, teacher_targets, stage_run.root,
                                StageTracker(tracker, stage.name), triplets, show_progress)
            if ctx.is_main:
                write_json_atomic(stage_run.root / STAGE_RESULT_FILE,
                                  {"config": stage_config.to_dict(), "result": result_to_json(done)})
        results.append(done)
    if not ctx.is_main:
        ctx.barrier()  # rank 0 writes the run's result
        return results[-1]
    result = _finish(config, run, results, tracker)
    ctx.barrier()
    return result


def _finish(config: RunConfig, run: RunDir, results: list[TrainResult], tracker: Tracker) -> TrainResult:
    """The final stage's best as the run's result (``best/``, ``metrics.json``, ``history.json``, ``plots/``)."""
    final = results[-1]
    final_run = RunDir(final.output_dir)
    seen: set[str] = set()
    for result in results:
        seen |= read_seen_pairs(RunDir(result.output_dir).best) or set()
    with writing_dir(run.best) as work:
        shutil.copytree(final_run.best, work, dirs_exist_ok=True)
        write_seen_pairs(seen, work)  # the final model has seen what every stage trained or selected on
    if final_run.plots.is_dir():
        with writing_dir(run.plots) as work:
            shutil.copytree(final_run.plots, work, dirs_exist_ok=True)
    names = [stage.name for stage in config.stages]
    history = [{"stage": name, **row} for name, result in zip(names, results) for row in result.history]
    write_json_atomic(run.history, history)
    report = json.loads(final_run.metrics.read_text(encoding="utf-8"))
    report["stages"] = {name: {"best": r.best_metrics, "best_step": r.best_step, "steps": r.steps,
                               "train_seconds": r.train_seconds} for name, r in zip(names, results)}
    write_json_atomic(run.metrics, report)

    seconds = sum(r.train_seconds for r in results)
    tracker.log_params(flatten({k: v for k, v in config.to_dict().items() if k != "stages"}))
    flat = named_dev_metrics(final.best_metrics)
    for name, cm in final.class_metrics.items():
        flat.update({f"class/{name}/{k}": v for k, v in cm.items() if v is not None})
    tracker.log_metrics({**flat, "train_seconds": seconds, "best_step": final.best_step}, 0)
    for path in (run.config, run.history, run.metrics):
        tracker.log_artifact(path)
    if run.plots.is_dir():
        tracker.log_artifact(run.plots, "plots")
    if config.tracking.log_checkpoint:
        tracker.log_artifact(run.best, "best_checkpoint")
    tracker.finish()
    return TrainResult(run.root, run.best, final.best_step, final.best_metrics, final.class_metrics, history,
                       sum(r.steps for r in results), seconds, tracker.run_id,
                       {"plots": str(run.plots), "metrics": str(run.metrics)}, final.weights_digest)
