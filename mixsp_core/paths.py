"""Every path the pipeline reads or writes, named once.

``PipelinePaths``: the stage outputs under one data root (``data/`` in the repository), which DVC
versions. ``RunDir``: the layout of one training run directory (the student, a teacher fine-tune, a
sweep run), which the trainer writes and the merge, soup and registry stages read.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from mixsp_core.io import repair_swap

REPO_ROOT = Path(__file__).resolve().parents[1]

WEIGHTS_FILE = "model.safetensors"
TRAINER_STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
_STEP = re.compile(r"^step-(\d+)$")


def shared_dir() -> Path:
    """The shared folder beside the repository (``$MIXSP_SHARED_DIR`` overrides it)."""
    return Path(os.environ.get("MIXSP_SHARED_DIR", REPO_ROOT.parent / "shared"))


def in_repo(path: str | os.PathLike[str]) -> Path:
    """``path`` as given when absolute, else relative to the repository root (params.yaml's paths are)."""
    path = Path(path)
    return path if path.is_absolute() else REPO_ROOT / path


@dataclass(frozen=True)
class RunDir:
    """One training run directory::

        best/              the checkpoint with the best dev metric (what later stages read)
        last/              the latest resumable checkpoint (weights, optimizer state, trainer_state.json)
        start/             the step-0 model (with train.snapshot_every): the merge start theta_0
        snapshots/step-N/  weights-only snapshots (with train.snapshot_every): what the merge stage soups
        run_config.yaml  history.json  metrics.json  plots/
    """

    root: Path

    def __fspath__(self) -> str:
        return str(self.root)

    @property
    def best(self) -> Path:
        return self.root / "best"

    @property
    def last(self) -> Path:
        return self.root / "last"

    @property
    def start(self) -> Path:
        return self.root / "start"

    @property
    def snapshots(self) -> Path:
        return self.root / "snapshots"

    def snapshot(self, step: int) -> Path:
        return self.snapshots / f"step-{step}"

    def repair(self) -> list[Path]:
        """Put back ``best/``, ``last/`` and ``start/`` where a kill between the two renames of a checkpoint
        swap left only their ``.<name>.old`` (:func:`mixsp_core.io.repair_swap`), before they are read or
        resumed; returns those put back."""
        return [folder for folder in (self.best, self.last, self.start) if repair_swap(folder)]

    def snapshot_dirs(self) -> list[tuple[int, Path]]:
        """``(step, dir)`` of the saved snapshots, by step."""
        if not self.snapshots.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.snapshots.iterdir()
                 if p.is_dir() and (m := _STEP.match(p.name))]
        return sorted(found)

    @property
    def trainer_state(self) -> Path:
        """The resumable state of ``last/``."""
        return self.last / TRAINER_STATE_FILE

    @property
    def config(self) -> Path:
        return self.root / "run_config.yaml"

    @property
    def history(self) -> Path:
        return self.root / "history.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"

    @property
    def plots(self) -> Path:
        return self.root / "plots"


@dataclass(frozen=True)
class PipelinePaths:
    """Where each stage writes, relative to one data root (``data/`` in the repository)."""

    root: Path

    @property
    def pairs(self) -> Path:
        return self.root / "pairs" / "pairs.parquet"

    @property
    def corpus(self) -> Path:
        return self.root / "corpus" / "corpus.txt"

    @property
    def teacher(self) -> Path:
        return self.root / "teacher"

    def teacher_cache(self, identity: str) -> Path:
        """The cache folder of one teacher (``identity`` from :func:`mixsp_core.teacher.cache.teacher_identity`):
        ``teacher/`` for a Hub id or plain folder, ``teacher/finetuned-<sha16>/`` for a fine-tuned teacher,
        so its cache sits beside the released teacher's (both under the one DVC output)."""
        _, sep, digest = identity.partition("+finetuned@sha256:")
        return self.teacher / f"finetuned-{digest[:16]}" if sep else self.teacher

    @property
    def teacher_shards(self) -> Path:
        """Shard directories (shard-K-of-N/) of sharded teacher encoding, merged into ``teacher``."""
        return self.root / "teacher_shards"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def student(self) -> RunDir:
        """The pipeline's training run."""
        return RunDir(self.models / "student")

    @property
    def compressed(self) -> Path:
        return self.models / "compressed"

    @property
    def merged(self) -> Path:
        return self.models / "merged"

    @property
    def merged_model(self) -> Path:
        return self.merged / "model"

    @property
    def champion(self) -> Path:
        return self.models / "champion"

    @property
    def evaluation(self) -> Path:
        return self.reports / "evaluation.json"


STAGES_DIR = "stages"  # a multi-stage run keeps stage NAME in <run>/stages/NAME/ (training.multistage)


def stage_dir(root: str | Path, name: str) -> Path:
    return Path(root) / STAGES_DIR / name


def latest_stage_state(config, out_dir: str | Path) -> Path | None:
    """The resumable trainer state of the latest stage of ``out_dir`` that has one (what a resumed
    multi-stage run continues its MLflow run from), or None."""
    for stage in reversed(config.stages):
        state = RunDir(stage_dir(out_dir, stage.name)).trainer_state
        if state.is_file():
            return state
    return None
