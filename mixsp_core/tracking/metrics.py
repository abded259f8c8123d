"""The one MLflow metric vocabulary of every run that scores a model (train, evaluate, promote, parent).

``dev/STSBenchmark`` (STS-B dev Spearman x100), ``dev/SICK`` (SICK trial), ``dev/mean`` (their mean: the
selection metric, :func:`mixsp_core.evaluate.sts.mean_dev_spearman`); another dev set ``X-dev`` is
``dev/X``. A run's latest ``dev/mean`` is the dev mean of the model it produced or chose: a training run
logs its curve under these names and, last, its best checkpoint's figures; the evaluate run logs the chosen
variant under them and every variant under ``variant/<name>/dev/...``. The files on disk keep their own
keys (``primary``, ``best_dev``); only the MLflow names are these.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

DEV_MEAN = "dev/mean"
MEAN_KEYS = ("primary", "mean")  # what the trainer and the reports call the dev mean
_DEV_SET_NAMES = {"STSBenchmark-dev": "dev/STSBenchmark", "SICK-trial": "dev/SICK"}
VARIANT_PREFIX = "variant"


def dev_metric_name(dev_set: str) -> str:
    """The MLflow name of a dev set's Spearman (``STSBenchmark-dev`` -> ``dev/STSBenchmark``) or of the
    mean (``primary`` -> ``dev/mean``)."""
    if dev_set in MEAN_KEYS:
        return DEV_MEAN
    return _DEV_SET_NAMES.get(dev_set) or f"dev/{dev_set.removesuffix('-dev')}"


def dev_metrics(spearman: Mapping[str, float | None], prefix: str = "") -> dict[str, float]:
    """``{dev set or 'primary': Spearman}`` (the trainer's metrics) as MLflow names, ``prefix`` before each
    (e.g. ``variant/merged/``); None values left out."""
    return {f"{prefix}{dev_metric_name(name)}": float(value) for name, value in spearman.items() if value is not None}


def variant_dev_metrics(variant: Mapping[str, Any], dev_sets: Iterable[str], prefix: str = "") -> dict[str, float]:
    """The MLflow dev metrics of one variant of the evaluation report (its ``tasks`` Spearman of each of
    ``dev_sets`` present and its ``dev`` mean)."""
    tasks = variant.get("tasks", {})
    spearman = {name: tasks[name]["spearman"] for name in dev_sets if name in tasks}
    return dev_metrics({**spearman, "primary": variant.get("dev")}, prefix)


def variant_prefix(name: str) -> str:
    """``variant/<name>/`` with the name's slashes as dots (``compressed/pca128`` -> ``compressed.pca128``),
    so a variant's metrics group under one prefix."""
    return f"{VARIANT_PREFIX}/{name.replace('/', '.')}/"
