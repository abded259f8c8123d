"""Typed sections of params.yaml for the stages after the teacher: train, compress, merge, evaluate, promote.

``pipeline_config.Params`` keeps these sections raw (``params.extra``); :func:`stage_params` builds them
here with the training config's checker, so an unknown key or a wrongly typed value raises ConfigError
naming the dotted field (``merge.p``) and the params file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mixsp_core.config import build_dataclass
from mixsp_core.errors import ConfigError

MERGE_METHODS = ("uniform", "greedy", "fusion")


@dataclass
class TrainParams:
    """``train``: which training config the pipeline's student runs, plus ``KEY=VALUE`` overrides."""

    config: str = "configs/default.yaml"
    overrides: list[str] = field(default_factory=list)

    def validate(self) -> None:
        if not self.config.strip():
            raise ConfigError("train.config", "must name a training config file (configs/*.yaml)")


@dataclass
class CompressParams:
    """``compress``: post-hoc variants of the student (``make_step`` specs, one step each, or ``+``-joined)."""

    variants: list[str] = field(default_factory=lambda: ["pca:64", "pca:128", "int8"])
    fit_sentences: int = 5000  # corpus sentences the PCA / int8 ranges are fitted on
    batch_size: int = 64

    def validate(self) -> None:
        if not self.variants:
            raise ConfigError("compress.variants", "list at least one variant, e.g. pca:128")
        if self.fit_sentences < 2 or self.batch_size < 1:
            raise ConfigError("compress.fit_sentences", "needs >= 2 sentences and batch_size >= 1")


@dataclass
class MergeParams:
    """``merge``: methods tried on the training run's snapshots; the best on dev is kept."""

    methods: list[str] = field(default_factory=lambda: list(MERGE_METHODS))
    p: float = 1.0  # delta-guided fusion exponent
    batch_size: int = 64

    def validate(self) -> None:
        bad = [m for m in self.methods if m not in MERGE_METHODS]
        if bad or not self.methods:
            raise ConfigError("merge.methods", f"must be a non-empty subset of {MERGE_METHODS}, got {self.methods}")
        if self.p < 0:
            raise ConfigError("merge.p", f"must be >= 0, got {self.p}")


@dataclass
class EvaluateParams:
    """``evaluate``: every variant on the dev sets, the grid on the best full-precision model, the floor."""

    batch_size: int = 64
    min_dev_spearman: float = 60.0  # model checks fail below this dev primary metric (Spearman x100)
    grid_layers: list[int] = field(default_factory=list)  # empty: full depth only
    grid_dims: list[int] = field(default_factory=lambda: [32, 64, 128])
    grid_vector_types: list[str] = field(default_factory=lambda: ["float32", "int8", "binary"])
    grid_fit_sentences: int = 2000

    def validate(self) -> None:
        if self.batch_size < 1 or self.grid_fit_sentences < 2:
            raise ConfigError("evaluate.batch_size", "batch_size must be >= 1 and grid_fit_sentences >= 2")


@dataclass
class PromoteParams:
    """``promote``: the MLflow registry model and alias; the champion moves only on a strictly better dev."""

    registered_model: str = "mixsp-student"
    alias: str = "champion"
    experiment: str = "mixsp"

    def validate(self) -> None:
        if not self.registered_model.strip() or not self.alias.strip():
            raise ConfigError("promote.registered_model", "registered_model and alias must not be empty")


@dataclass
class StageParams:
    train: TrainParams
    compress: CompressParams
    merge: MergeParams
    evaluate: EvaluateParams
    promote: PromoteParams


_SECTIONS = {"train": TrainParams, "compress": CompressParams, "merge": MergeParams,
             "evaluate": EvaluateParams, "promote": PromoteParams}


def stage_params(extra: dict[str, Any], source: str | Path = "params.yaml") -> StageParams:
    """Build every later-stage section from ``Params.extra``; errors name the field and ``source``."""
    built = {}
    for name, cls in _SECTIONS.items():
        try:
            value = build_dataclass(cls, extra.get(name), name)
            value.validate()
        except ConfigError as err:
            raise ConfigError(err.field, f"{str(err).split(': ', 1)[-1]} (in {source})") from err
        built[name] = value
    return StageParams(**built)
