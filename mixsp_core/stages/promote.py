"""Promote stage: the evaluated best becomes a new version of the MLflow registry model
(``promote.registered_model``); the alias (``promote.alias``) and ``models/champion/`` move only when it
beats the current champion on the dev mean, else the version is tagged ``challenger``. A best model below
``evaluate.min_dev_spearman`` is refused, as the Dagster model check refuses it."""

from __future__ import annotations

from pathlib import Path

from mixsp_core.errors import MixSPError
from mixsp_core.io import write_json_atomic
from mixsp_core.params import Params
from mixsp_core.stages.evaluate import read_evaluation
from mixsp_core.tracking.registry import Promotion, register_and_promote
from mixsp_core.tracking.tracker import RunTarget


class ModelGateError(MixSPError):
    """A model below the configured dev floor was offered for promotion."""


def run_promote(params: Params, target: RunTarget | None = None, floor: float | None = None) -> Promotion:
    """Register the evaluated best in its own MLflow run ``promote``; writes ``reports/champion.json`` and,
    when the alias moves, the champion's model card."""
    sp, paths = params.promote, params.paths
    report = read_evaluation(paths)
    floor = params.evaluate.min_dev_spearman if floor is None else floor
    if report["best_dev"] < floor:
        raise ModelGateError(f"{paths.evaluation}: best model {report['best']} has dev {report['best_dev']:.2f}, "
                             f"below evaluate.min_dev_spearman {floor:.2f}; not registered, champion unchanged")
    target = target or RunTarget()
    tracker = target.tracker(sp.experiment, "promote", {"mixsp.stage": "promote", "mixsp.model": report["best"]})
    try:
        tracker.log_metrics({"dev_primary": float(report["best_dev"])}, 0)
        promotion = register_and_promote(tracker.client, sp.registered_model, tracker.run_id, Path(report["best_path"]),
                                         float(report["best_dev"]), paths.champion, alias=sp.alias,
                                         model_name=report["best"])
        tracker.log_metrics({"promoted": float(promotion.promoted)}, 0)
    except BaseException:
        tracker.finish("FAILED")
        raise
    tracker.finish()
    write_json_atomic(paths.reports / "champion.json", promotion.to_dict())
    if promotion.promoted:  # a challenger leaves the champion and its card as they were
        from mixsp_core.tracking.model_card import write_card

        write_card(paths.champion, report, promotion.to_dict(), paths.student.root)
    return promotion
