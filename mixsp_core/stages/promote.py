"""Promote stage: the evaluated best becomes a new version of the MLflow registry model
(``promote.registered_model``); the alias (``promote.alias``) and ``models/champion/`` move only when it
beats the current champion on the dev mean, else the version is tagged ``challenger``. A best model below
``evaluate.min_dev_spearman`` is refused, as the Dagster model check refuses it.

The version's model is logged as an MLflow model of the *training run* the best descends from (the student's
run, recorded in ``models/student/mlflow_run.json``; a compressed or merged variant is made from that run's
weights), so the registry's source run is the run that trained it. Without that record (tracking was off
for the training, or it went to another store) the model is logged in the promote run instead."""

from __future__ import annotations

from pathlib import Path

from mixsp_core.errors import MixSPError
from mixsp_core.io import claim_output, write_json_atomic
from mixsp_core.params import Params
from mixsp_core.paths import PipelinePaths
from mixsp_core.stages.evaluate import read_evaluation
from mixsp_core.tracking.metrics import variant_dev_metrics
from mixsp_core.tracking.registry import TRAINING_RUN_TAG, Promotion, register_and_promote
from mixsp_core.tracking.tracker import RunTarget, read_training_run


class ModelGateError(MixSPError):
    """A model below the configured dev floor was offered for promotion."""

    exit_code = 1  # the CLI's "the check ran and said no" (the gate), not a user error


def run_promote(params: Params, target: RunTarget | None = None, floor: float | None = None) -> Promotion:
    """Register the evaluated best (its model logged in its training run) from an MLflow run ``promote``
    nested in the pipeline run; writes ``reports/champion.json`` and, when the alias moves, the champion's
    model card (logged to the promote run with its plot). Refused at once
    (:class:`~mixsp_core.errors.OutputBusyError`) while another process writes ``models/champion``."""
    with claim_output(params.paths.champion, "promote stage"):
        return _promote(params, target, floor)


def _promote(params: Params, target: RunTarget | None, floor: float | None) -> Promotion:
    """The body of :func:`run_promote`, under the champion's lock."""
    sp, paths = params.promote, params.paths
    report = read_evaluation(paths)
    floor = params.evaluate.min_dev_spearman if floor is None else floor
    if report["best_dev"] < floor:
        raise ModelGateError(f"{paths.evaluation}: best model {report['best']} has dev {report['best_dev']:.2f}, "
                             f"below evaluate.min_dev_spearman {floor:.2f}; not registered, champion unchanged")
    target = target or RunTarget()
    tracker = target.tracker(sp.experiment, "promote", {"mixsp.stage": "promote", "mixsp.model": report["best"]},
                             lineage=paths.student.root)
    try:
        dev = variant_dev_metrics(report["variants"][report["best"]], report["dev_sets"])
        tracker.log_metrics(dev, 0)
        owner = training_run_id(tracker.client, paths) or tracker.run_id
        tracker.set_tags({TRAINING_RUN_TAG: owner})
        promotion = register_and_promote(tracker.client, sp.registered_model, owner, Path(report["best_path"]),
                                         float(report["best_dev"]), paths.champion, alias=sp.alias,
                                         model_name=report["best"], promote_run_id=str(tracker.run_id))
        tracker.log_metrics({"promoted": float(promotion.promoted), "champion/dev/mean": promotion.champion_dev}, 0)
        tracker.set_tags({"mixsp.registered_version": promotion.version,
                          "mixsp.champion_version": promotion.champion_version})
        tracker.log_parent_metrics(dev)  # the pipeline run's result: the dev figures of the model it registered
        write_json_atomic(paths.reports / "champion.json", promotion.to_dict())
        if promotion.promoted:  # a challenger leaves the champion and its card as they were
            from mixsp_core.tracking.model_card import DIMS_PLOT, write_card

            card = write_card(paths.champion, report, promotion.to_dict(), paths.student.root)
            for made in (card, paths.champion / DIMS_PLOT):
                if made.is_file():
                    tracker.log_artifact(made, "model_card")
    except BaseException:
        tracker.finish("FAILED")
        raise
    tracker.finish()
    return promotion


def training_run_id(client, paths: PipelinePaths) -> str | None:
    """The MLflow run that trained the pipeline's student (``models/student/mlflow_run.json``), when it is
    a live run of ``client``'s store; else None."""
    from mlflow.exceptions import MlflowException

    run_id = read_training_run(paths.student.root).get("run_id")
    if not run_id:
        return None
    try:
        run = client.get_run(str(run_id))
    except MlflowException:
        return None  # recorded in another store
    return run.info.run_id if run.info.lifecycle_stage == "active" else None
