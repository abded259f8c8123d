"""Model checks (blocking ``@asset_check``s): weights finite, embedding shape as configured, dev
Spearman not below the configured floor (params.yaml ``evaluate.min_dev_spearman``). A failure stops
everything downstream, so a broken or weak model never reaches the registry or data/models/champion/."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import numpy as np

from pipelines.defs.assets.evaluate import evaluation_report
from pipelines.defs.assets.merge import merged_model
from pipelines.defs.assets.promote import champion
from pipelines.defs.assets.train import student
from pipelines.defs.resources import ModelGateResource, PathsResource

PROBE = ["A man is playing a guitar.", "Two dogs run through a field.", "The stock market fell sharply today."]


def finite_weights_result(checkpoint: Path) -> dg.AssetCheckResult:
    """Pass when every floating tensor of the checkpoint's safetensors file is finite."""
    from mixsp_core.merging import read_state

    state = read_state(checkpoint)
    bad = [key for key, tensor in state.items() if tensor.is_floating_point() and not bool(tensor.isfinite().all())]
    return dg.AssetCheckResult(passed=not bad, metadata={
        "tensors": len(state), "non_finite_tensors": len(bad), "examples": ", ".join(bad[:5]) or "none",
        "checkpoint": dg.MetadataValue.path(str(checkpoint))})


def floor_result(dev: float, floor: float, what: str) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(passed=bool(dev >= floor), metadata={
        "dev_primary": float(dev), "floor": float(floor), "model": what})


@dg.asset_check(asset=student, blocking=True, description="Every weight of the best checkpoint is finite.")
def student_weights_finite(paths: PathsResource) -> dg.AssetCheckResult:
    return finite_weights_result(paths.pipeline_paths().student.best)


@dg.asset_check(asset=student, blocking=True,
                description="The best checkpoint embeds to (n, model.output_dim) finite, unit-norm vectors.")
def student_embedding_shape(paths: PathsResource) -> dg.AssetCheckResult:
    from mixsp_core.models.checkpoint import load_embedder
    from mixsp_core.training.config import load_config

    run = paths.pipeline_paths().student
    config = load_config(run.config)
    embedder = load_embedder(run.best, device="cpu")
    expected = config.model.output_dim or int(embedder.hidden_dim)
    vectors = np.asarray(embedder.encode(PROBE, batch_size=8, show_progress=False))
    ok = vectors.shape == (len(PROBE), expected) and bool(np.isfinite(vectors).all())
    return dg.AssetCheckResult(passed=ok, metadata={
        "shape": str(tuple(vectors.shape)), "expected": str((len(PROBE), expected)),
        "finite": bool(np.isfinite(vectors).all())})


@dg.asset_check(asset=student, blocking=True, description="Dev primary metric not below the configured floor.")
def student_dev_floor(paths: PathsResource, model_gate: ModelGateResource) -> dg.AssetCheckResult:
    metrics = json.loads(paths.pipeline_paths().student.metrics.read_text())["best"]
    return floor_result(metrics["primary"], model_gate.min_dev_spearman, "student")


@dg.asset_check(asset=merged_model, blocking=True, description="Every weight of the merged model is finite.")
def merged_weights_finite(paths: PathsResource) -> dg.AssetCheckResult:
    return finite_weights_result(paths.pipeline_paths().merged_model)


@dg.asset_check(asset=evaluation_report, blocking=True,
                description="The best variant's dev primary metric is not below the configured floor.")
def best_dev_floor(paths: PathsResource, model_gate: ModelGateResource) -> dg.AssetCheckResult:
    report = json.loads(paths.pipeline_paths().evaluation.read_text())
    return floor_result(report["best_dev"], model_gate.min_dev_spearman, report["best"])


@dg.asset_check(asset=champion, blocking=True,
                description="data/models/champion/ loads the way `mixsp encode` loads it and embeds finitely.")
def champion_loads(paths: PathsResource) -> dg.AssetCheckResult:
    from mixsp_core.models.checkpoint import load_embedder

    folder = paths.pipeline_paths().champion
    vectors = np.asarray(load_embedder(folder, device="cpu").encode(PROBE, batch_size=8))
    record = json.loads((folder / "champion.json").read_text())
    return dg.AssetCheckResult(passed=bool(np.isfinite(vectors).all()) and vectors.shape[0] == len(PROBE), metadata={
        "shape": str(tuple(vectors.shape)), "version": str(record["champion_version"]),
        "dev_primary": float(record["champion_dev"])})
