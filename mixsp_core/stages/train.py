"""Train stage: the pipeline's student (params.yaml ``student``, into ``models/student/``), a training config
file of configs/ (`mixsp train --config configs/X.yaml`) and the teacher's fine-tuning
(`mixsp finetune-teacher`): every training run goes through :func:`mixsp_core.training.loop.run_training`.
"""

from __future__ import annotations

import contextlib
import copy
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from mixsp_core.data.corpus import read_corpus
from mixsp_core.io import claim_output
from mixsp_core.params import Params
from mixsp_core.paths import PipelinePaths
from mixsp_core.stages.prepare import read_corpus_file, read_pairs
from mixsp_core.stages.teacher import encode_with_teacher
from mixsp_core.tracking.tracker import TRAINING_RUN_FILE, RunTarget, Tracker, tracker_for_run, write_training_run
from mixsp_core.training.config import RunConfig, apply_overrides, config_from_dict, load_config, run_configs
from mixsp_core.training.distributed import is_main_process
from mixsp_core.training.loop import TrainResult, run_training
from mixsp_core.training.resume import can_resume


def training_inputs(config: RunConfig, paths: PipelinePaths) -> tuple[pd.DataFrame, list[str] | None, np.ndarray | None]:
    """Pairs, corpus and teacher embeddings for one training run.

    ``data.spec: auto`` reads the data stage's validated pairs table; any other spec is loaded and validated
    here. The corpus and the teacher rows are read only when the config needs them (:attr:`RunConfig.needs_teacher`:
    it distils, initialises its output layer from the teacher or trains on silver pairs); teacher rows come
    from the cache (full width, as the teacher encodes), only sentences missing from it are encoded.
    """
    from mixsp_core.stages.prepare import check_pairs

    if config.data.spec == "auto":
        pairs = read_pairs(paths)
    else:
        pairs, report = check_pairs(config.data.spec)
        report.raise_for_failures()
    runs = run_configs(config)  # a multi-stage run's inputs serve every stage
    if not any(run.needs_corpus for run in runs):
        return pairs, None, None
    corpus = read_corpus_file(paths) if config.data.corpus == "auto" else read_corpus(Path(config.data.corpus))
    if not any(run.needs_teacher for run in runs):  # SimCSE reads the corpus sentences alone
        return pairs, corpus, None
    teacher, _ = encode_with_teacher(corpus, paths, config.data.teacher)
    return pairs, corpus, teacher


def student_config(params: Params, overrides: list[str] | None = None, config_file: str | Path | None = None) -> RunConfig:
    """A copy of params.yaml's ``student`` (the stage sets its resume flag), or of the training config
    ``config_file`` (a configs/*.yaml recipe trained as the pipeline's student), with ``KEY=VALUE`` overrides
    (the Dagster launchpad's) re-validated. The run directory and the teacher stay the pipeline's."""
    base = load_config(Path(config_file)) if config_file else params.student
    if not overrides and not config_file:
        return copy.deepcopy(base)
    config = config_from_dict(apply_overrides(base.to_dict(), overrides or []))
    config.output_dir, config.data.teacher = params.student.output_dir, params.student.data.teacher
    return config


@contextlib.contextmanager
def _claim_run(root: Path, what: str) -> Iterator[None]:
    """Hold the output lock of the run directory ``root`` from before anything is removed or an MLflow run
    is opened until its last record is written, and clear the run's leftovers under it. Under torchrun
    only rank 0 takes it: the ranks of one run share the directory (the loop does the same)."""
    if not is_main_process():
        yield
        return
    with claim_output(root, what):  # a checkpoint swap cut short is put back here, before can_resume looks at last/
        yield


def run_train(params: Params, overrides: list[str] | None = None, target: RunTarget | None = None,
              show_progress: bool = True, config_file: str | Path | None = None) -> TrainResult:
    """The pipeline's student: one run into ``models/student/`` of params.yaml's ``student`` (or of
    ``config_file``, see :func:`student_config`). An interrupted run of the same config resumes (and
    continues its MLflow run); anything else starts fresh, without the old run's snapshots.
    Refused at once (:class:`~mixsp_core.errors.OutputBusyError`) while another process writes the run."""
    config = student_config(params, overrides, config_file)
    run = params.paths.student
    with _claim_run(run.root, "train stage"):
        return _train_student(params, config, target, show_progress,
                              str(config_file) if config_file else "params.yaml:student")


def _train_student(params: Params, config: RunConfig, target: RunTarget | None, show_progress: bool,
                   config_source: str = "params.yaml:student") -> TrainResult:
    """The body of :func:`run_train`, under the run's lock."""
    run = params.paths.student
    config.train.resume = can_resume(config, run)
    if not config.train.resume and is_main_process():  # rank 0 alone changes the shared run directory
        # Snapshots (and the start) of an older run must not be merged with this run's.
        shutil.rmtree(run.snapshots, ignore_errors=True)
        shutil.rmtree(run.start, ignore_errors=True)
        (run.root / TRAINING_RUN_FILE).unlink(missing_ok=True)  # the older run's MLflow run is not this one's
    # The promote stage logs the model it registers (this student or a variant made from it) into this run as
    # its MLflow model; uploading best/ here as well would store the weights twice. (tracking.* is not part of
    # the resume check, and nothing trains differently.)
    config.tracking.log_checkpoint = False
    tracker = _tracker(config, run.root, target, {"mixsp.stage": "train", "mixsp.config": config_source,
                                                  "mixsp.data_spec": params.data.resolved_spec()})
    pairs, corpus, teacher = training_inputs(config, params.paths)
    result = run_training(config, pairs, corpus, teacher, run.root, tracker, show_progress=show_progress)
    write_training_run(run.root, tracker)
    return result


def run_train_config(config_path: Path, params: Params, output: Path | None = None,
                     target: RunTarget | None = None) -> TrainResult:
    """`mixsp train --config configs/X.yaml`: one run of a training config file (into ``output`` or the
    config's ``output_dir``), on the data stage's outputs under ``params``' data root."""
    config = load_config(config_path)
    out = Path(output) if output else config.resolved_output_dir()
    with _claim_run(out, "mixsp train"):
        tracker = _tracker(config, out, target, {"mixsp.stage": "train", "mixsp.config": str(config_path)})
        pairs, corpus, teacher = training_inputs(config, params.paths)
        result = run_training(config, pairs, corpus, teacher, out, tracker)
        write_training_run(out, tracker)
    return result


def run_finetune_teacher(config_path: Path, output: Path, params: Params, target: RunTarget | None = None,
                         show_progress: bool = True):
    """`mixsp finetune-teacher --config FILE --out DIR`: fine-tune the teacher of FILE (e.g.
    configs/teacher_finetune.yaml) on the pipeline's training pairs, into DIR/run/ and DIR/teacher/."""
    from mixsp_core.teacher.finetune import RUN_DIR, check_teacher_config, finetune_teacher

    config = load_config(config_path)
    check_teacher_config(config)  # before the pairs are read and an MLflow run is opened
    with _claim_run(Path(output), "mixsp finetune-teacher"):
        pairs, _, _ = training_inputs(config, params.paths)
        tracker = _tracker(config, Path(output) / RUN_DIR, target, {"mixsp.stage": "finetune-teacher"})
        return finetune_teacher(config, pairs, output, tracker, show_progress=show_progress)


def _tracker(config: RunConfig, out: Path, target: RunTarget | None, tags: dict[str, str]) -> Tracker:
    """The run's MLflow tracker (a resumed run continues its own MLflow run)."""
    if not config.tracking.enabled:
        return tracker_for_run(config, out)  # a NullTracker: no MLflow import on machines without it
    return tracker_for_run(config, out, tags=tags, target=target or RunTarget())
