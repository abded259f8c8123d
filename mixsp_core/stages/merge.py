"""Merge stage: model soups and delta-guided fusion (:mod:`mixsp_core.merging`) of the training run's
snapshots, the best on dev kept as ``models/merged/model/`` (every method's score in ``merge.json``); and
`mixsp soup`, the same over the ``best/`` of several runs of one seed."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from mixsp_core.errors import CheckpointError, ConfigError
from mixsp_core.io import claim_output, replace_dir, write_json_atomic
from mixsp_core.params import Params
from mixsp_core.paths import PipelinePaths, RunDir
from mixsp_core.progress import stage_progress
from mixsp_core.stages.evaluate import evaluate_dir
from mixsp_core.stages.prepare import dev_pairs


@dataclass
class MergeStageResult:
    path: Path
    best_method: str
    methods: dict[str, float]  # method -> dev mean
    inputs: dict[str, float]  # checkpoint -> dev mean
    start: str
    record: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        rows = [f"  {Path(k).name if 'step-' in k else k}: {v:.2f}" for k, v in self.inputs.items()]
        rows += [f"  {m}{' (kept)' if m == self.best_method else ''}: {v:.2f}" for m, v in self.methods.items()]
        return f"merged {len(self.inputs)} checkpoints from {self.start} -> {self.path}\n" + "\n".join(rows)


def merge_inputs(run: RunDir) -> tuple[list[Path], str, str]:
    """The checkpoints to merge (snapshots after step 0, else best/ and last/ of the run), the start model
    they were trained from (``start/`` or ``snapshots/step-0``, else the run config's base encoder) and
    how it was found."""
    from mixsp_core.models.checkpoint import has_weights  # torch: not when the module is imported
    from mixsp_core.training.config import load_config

    run.repair()  # best/, last/, start/ that a kill mid-swap left as .<name>.old
    snaps = run.snapshot_dirs()
    checkpoints = [p for step, p in snaps if step > 0]
    starts = [p for p in [run.start] if has_weights(p)]
    starts += [p for step, p in snaps if step == 0]
    if len(checkpoints) < 2:
        checkpoints = [p for p in (run.best, run.last) if has_weights(p)]
    if not checkpoints:
        raise CheckpointError(f"{run.root}: no checkpoints to merge (snapshots/step-N, best/ or last/)")
    if starts:
        return checkpoints, str(starts[0]), f"step-0 checkpoint {starts[0].name}/"
    # Without a step-0 snapshot the heads have no recorded start: fusion merges them uniformly.
    return checkpoints, load_config(run.config).model.encoder, "base encoder (no step-0 snapshot)"


def merge_keep_best(checkpoints: list, start: str | None, methods: list[str], p: float, pairs: pd.DataFrame,
                    batch_size: int, target: Path) -> dict[str, Any]:
    """Each merge method over ``checkpoints`` (fine-tuned from ``start``); the best on ``pairs`` (dev) is
    swapped in atomically at ``target``. Returns the report: best method, each method's and input's dev."""
    from mixsp_core.merging import merge_checkpoints

    def score(path: Path) -> float:
        return float(evaluate_dir(Path(path), pairs, batch_size)["dev"])

    inputs = {str(c): score(c) for c in checkpoints}
    target.parent.mkdir(parents=True, exist_ok=True)
    # .partial: what a killed merge leaves here is cleared by the next one (io.sweep_leftovers)
    scratch = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.candidates.", suffix=".partial"))
    try:
        scores: dict[str, float] = {}
        records: dict[str, dict[str, Any]] = {}
        for method in methods:
            merged = merge_checkpoints(checkpoints, scratch / method, method, start=start, p=p,
                                       score_dir=score, scores=list(inputs.values()))
            # greedy already scored its final soup on dev; the others are scored here
            scores[method] = (float(merged.record["greedy"]["final_score"]) if method == "greedy"
                              else score(merged.path))
            records[method] = merged.record
        best = max(scores, key=lambda m: scores[m])
        replace_dir(scratch / best, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {"best_method": best, "methods": scores, "inputs": inputs, "start": start, "records": records}


@stage_progress("merge")  # one progress bar for the stage's encode calls
def run_merge(params: Params) -> MergeStageResult:
    """Each ``merge.methods`` over the student run's snapshots; the best on dev kept. Refused at once
    (:class:`~mixsp_core.errors.OutputBusyError`) while another process writes ``models/merged``."""
    sp, paths = params.merge, params.paths
    with claim_output(paths.merged, "merge stage"):
        checkpoints, start, start_kind = merge_inputs(paths.student)
        report = merge_keep_best(checkpoints, start, list(sp.methods), sp.p, dev_pairs(paths), sp.batch_size,
                                 paths.merged_model)
        report["start_kind"] = start_kind
        write_json_atomic(paths.merged / "merge.json", report, default=str)
    return MergeStageResult(paths.merged_model, report["best_method"], report["methods"], report["inputs"],
                            start, report)


def run_soup(runs: list[Path], out: Path, paths: PipelinePaths, methods: list[str], p: float = 1.0,
             batch_size: int = 64) -> MergeStageResult:
    """`mixsp soup`: the ``best/`` of several training runs merged by each method, the best on the pipeline's
    dev pairs kept at ``out``, the report in ``out/soup.json``. The runs must share their start (same config
    seed: the heads are initialised alike); the first run's ``start/`` is the fusion start."""
    from mixsp_core.models.checkpoint import has_weights

    if len(runs) < 2:
        raise ConfigError("soup.runs", f"list at least two training runs, got {len(runs)}")
    checkpoints = []
    for run in map(RunDir, runs):
        if not has_weights(run.best):
            raise CheckpointError(f"{run.root}: no best/ checkpoint with weights; is it a training run directory?")
        checkpoints.append(run.best)
    start = RunDir(runs[0]).start
    with claim_output(out, "mixsp soup"):
        report = merge_keep_best(checkpoints, str(start) if has_weights(start) else None,
                                 methods, p, dev_pairs(paths), batch_size, out)
        write_json_atomic(out / "soup.json", report, default=str)
    return MergeStageResult(out, report["best_method"], report["methods"], report["inputs"], str(report["start"]),
                            report)
