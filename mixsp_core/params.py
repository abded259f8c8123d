"""params.yaml, typed once: the one configuration that the Dagster assets, the `mixsp` CLI and the DVC
stages all read, through :func:`load_params`.

Sections: ``data`` (pairs spec, corpus), ``teacher``, ``student`` (the training config of the pipeline's
student: the same :class:`~mixsp_core.training.config.RunConfig` as a ``configs/*.yaml`` file, written inline
so that DVC declares every value as a param and ``dvc params diff`` shows a changed ``student.train.epochs``),
``compress``, ``merge``, ``evaluate``, ``promote``. ``auto`` values are resolved here, once. A bad value
(wrong type, NaN or an infinity, out of range) raises ConfigError naming the dotted field and the file.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mixsp_core.errors import ConfigError
from mixsp_core.paths import REPO_ROOT, PipelinePaths, in_repo, shared_dir
from mixsp_core.training.config import (
    MAX_SEED,
    RunConfig,
    apply_overrides,
    build_dataclass,
    check_finite,
    read_yaml,
)

PARAMS_FILE = REPO_ROOT / "params.yaml"
# `data.spec: auto` without the shared SentEval folder: the same two tasks from the Hub
HUB_DEFAULT_SPEC = "hf:mteb/stsbenchmark-sts,hf:mteb/sickr-sts"
MERGE_METHODS = ("uniform", "greedy", "fusion")


@dataclass(frozen=True)
class DataParams:
    """``data``: where the pairs and the unlabeled corpus come from, and where artifacts go."""

    # senteval:DIR | hf:ID | hf-disk:DIR | file:PATH, comma-joined; auto: the shared SentEval folder when
    # present, else the Hub datasets
    spec: str = "auto"
    corpus_files: str | list[str] = "auto"  # auto: the shared SentEval classification corpora
    max_corpus_sentences: int = 20000
    seed: int = 0
    root: str = "data"

    def validate(self) -> None:
        if self.max_corpus_sentences < 1:
            raise ConfigError("data.max_corpus_sentences", f"must be >= 1, got {self.max_corpus_sentences}")
        if not self.spec.strip():
            raise ConfigError("data.spec", "must not be empty")
        if not 0 <= self.seed <= MAX_SEED:
            raise ConfigError("data.seed", f"must be an integer in 0..{MAX_SEED}, got {self.seed}")
        if not self.root.strip():
            raise ConfigError("data.root", "must name a folder, e.g. data")

    @property
    def senteval_dir(self) -> Path:
        return shared_dir() / "data" / "senteval"

    def resolved_spec(self) -> str:
        """The pairs source this run reads (``auto`` resolved)."""
        if self.spec != "auto":
            return self.spec
        return f"senteval:{self.senteval_dir}" if self.senteval_dir.is_dir() else HUB_DEFAULT_SPEC

    def resolved_corpus_files(self) -> list:
        """Paths, or the SentEval corpora with their line formats (``auto``)."""
        if self.corpus_files != "auto":
            return [Path(p) for p in self.corpus_files]
        from mixsp_core.data.corpus import default_corpus_files

        return default_corpus_files(self.senteval_dir) if self.senteval_dir.is_dir() else []


@dataclass(frozen=True)
class TeacherParams:
    """``teacher``: the model that encodes the corpus for distillation (cached by sentence hash)."""

    model: str = "sentence-transformers/all-mpnet-base-v2"
    batch_size: int = 64
    device: str = "auto"  # auto | cpu | cuda[:N]
    # The sentences missing from the cache are split into this many shards (by sentence hash), encoded in
    # parallel steps and merged (mixsp_core/teacher/shards.py).
    shards: int = 2

    def validate(self) -> None:
        if self.batch_size < 1:
            raise ConfigError("teacher.batch_size", f"must be >= 1, got {self.batch_size}")
        if self.shards < 1:
            raise ConfigError("teacher.shards", f"must be an integer >= 1, got {self.shards!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError("teacher.device", f"must be auto, cpu or cuda[:N], got {self.device!r}")

    def resolved_device(self) -> str | None:
        """None lets the library pick (CUDA when available)."""
        return None if self.device == "auto" else self.device


@dataclass(frozen=True)
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


@dataclass(frozen=True)
class MergeParams:
    """``merge``: methods tried on the training run's snapshots; the best on dev is kept."""

    methods: list[str] = field(default_factory=lambda: list(MERGE_METHODS))
    p: float = 1.0  # delta-guided fusion exponent
    batch_size: int = 64

    def validate(self) -> None:
        bad = [m for m in self.methods if m not in MERGE_METHODS]
        if bad or not self.methods:
            raise ConfigError("merge.methods", f"must be a non-empty subset of {MERGE_METHODS}, got {self.methods}")
        if not 0 <= self.p < math.inf:  # NaN fails the comparison too
            raise ConfigError("merge.p", f"must be a finite number >= 0, got {self.p}")


@dataclass(frozen=True)
class EvaluateParams:
    """``evaluate``: every variant on the dev sets, the grid on the best full-precision model, the floor."""

    batch_size: int = 64
    min_dev_spearman: float = 60.0  # model checks fail (and block promotion) below this dev mean (x100)
    grid_layers: list[int] = field(default_factory=list)  # empty: full depth only
    grid_dims: list[int] = field(default_factory=lambda: [32, 64, 128])
    grid_vector_types: list[str] = field(default_factory=lambda: ["float32", "int8", "binary"])
    grid_fit_sentences: int = 2000
    # analyses of the best variant (mixsp_core/evaluate/analyses.py): prefixes, geometry, whitening x transfer
    analyses: bool = True
    analyses_sentences: int = 5000  # corpus sample: geometry measured and whitenings fitted on it
    transfer_tasks: list[str] = field(default_factory=lambda: ["MR", "CR", "SUBJ", "MPQA", "SST2", "TREC"])
    transfer_max_sentences: int = 2000  # per task (per split), a fixed random sample
    transfer_whitenings: list[str] = field(default_factory=lambda: ["pca", "zca", "pca-cor", "zca-cor", "cholesky"])
    transfer_dir: str = "auto"  # a SentEval folder; auto: the shared one (data.senteval_dir)

    def validate(self) -> None:
        if self.batch_size < 1 or self.grid_fit_sentences < 2:
            raise ConfigError("evaluate.batch_size", "batch_size must be >= 1 and grid_fit_sentences >= 2")
        from mixsp_core.compress.whitening import whitening_from_spec
        from mixsp_core.evaluate.transfer import check_task_names

        if self.analyses_sentences < 3:
            raise ConfigError("evaluate.analyses_sentences", f"must be >= 3, got {self.analyses_sentences}")
        if self.transfer_max_sentences < 10:
            raise ConfigError("evaluate.transfer_max_sentences", f"must be >= 10, got {self.transfer_max_sentences}")
        check_task_names(self.transfer_tasks)
        for spec in self.transfer_whitenings:
            whitening_from_spec(spec, "evaluate.transfer_whitenings")


@dataclass(frozen=True)
class PromoteParams:
    """``promote``: the MLflow registry model and alias; the champion moves only on a strictly better dev."""

    registered_model: str = "mixsp-student"
    alias: str = "champion"
    experiment: str = "mixsp"

    def validate(self) -> None:
        if not self.registered_model.strip() or not self.alias.strip():
            raise ConfigError("promote.registered_model", "registered_model and alias must not be empty")


@dataclass(frozen=True)
class Params:
    """Every section of params.yaml, typed and validated; ``source`` is the file it was read from."""

    data: DataParams = field(default_factory=DataParams)
    teacher: TeacherParams = field(default_factory=TeacherParams)
    student: RunConfig = field(default_factory=RunConfig)
    compress: CompressParams = field(default_factory=CompressParams)
    merge: MergeParams = field(default_factory=MergeParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    promote: PromoteParams = field(default_factory=PromoteParams)
    source: Path = PARAMS_FILE

    @property
    def paths(self) -> PipelinePaths:
        """The stage outputs under ``data.root`` (relative to the repository root)."""
        return PipelinePaths(in_repo(self.data.root))

    def with_data_root(self, root: str | Path) -> Params:
        """The same params writing under another data root (the Dagster paths resource, tests)."""
        params = replace(self, data=replace(self.data, root=str(root)))
        return replace(params, student=_pipeline_student(params.student, params))


_SECTIONS = {"data": DataParams, "teacher": TeacherParams, "compress": CompressParams, "merge": MergeParams,
             "evaluate": EvaluateParams, "promote": PromoteParams}


def _pipeline_student(config: RunConfig, params: Params) -> RunConfig:
    """The student config as the pipeline runs it: into ``models/student/``, distilling ``teacher.model``."""
    config = copy.deepcopy(config)
    config.output_dir = str(params.paths.student.root)
    config.data.teacher = params.teacher.model
    return config


def load_params(path: str | Path = PARAMS_FILE, overrides: dict[str, Any] | list[str] | None = None) -> Params:
    """Read and validate params.yaml. ``overrides``: dotted keys over the file's values, as a mapping
    (``{"data.spec": "file:x.csv"}``) or ``KEY=VALUE`` strings (``["student.train.epochs=1"]``)."""
    path = Path(path)
    raw = read_yaml(path, "parameter file")
    if not isinstance(raw, dict):
        raise ConfigError(str(path), f"must be a mapping of sections, got {type(raw).__name__}")
    if overrides:
        raw = apply_overrides(raw, overrides)
    unknown = sorted(set(raw) - {*_SECTIONS, "student"})
    if unknown:
        raise ConfigError(unknown[0], f"unknown section in {path} (known: data, teacher, student, "
                                      f"{', '.join(list(_SECTIONS)[2:])})")
    try:
        sections = {name: build_dataclass(cls, raw.get(name), name) for name, cls in _SECTIONS.items()}
        for name, section in sections.items():
            check_finite(section, name)
            section.validate()
        student = _student_config(raw.get("student"))
    except ConfigError as err:
        raise ConfigError(err.field, f"{str(err).split(': ', 1)[-1]} (in {path})") from err
    params = Params(**sections, student=RunConfig(), source=path)
    return replace(params, student=_pipeline_student(student, params))


def _student_config(raw: Any) -> RunConfig:
    """The ``student`` section as a validated RunConfig; errors name ``student.<field>``."""
    if not isinstance(raw, dict):
        raise ConfigError("student", "must be a training config mapping (name, seed, model, loss, train, data)")
    try:
        return build_dataclass(RunConfig, copy.deepcopy(raw), "").validate()
    except ConfigError as err:
        raise ConfigError(f"student.{err.field}", str(err).split(": ", 1)[-1]) from err
