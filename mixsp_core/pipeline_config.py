"""Pipeline parameters (params.yaml): typed, validated, with `auto` values resolved in one place."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from mixsp_core.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[1]
HUB_DEFAULT_SPEC = "hf:mteb/stsbenchmark-sts,hf:mteb/sickr-sts"


def shared_dir() -> Path:
    """The shared folder beside the repository (overridable with MIXSP_SHARED_DIR)."""
    return Path(os.environ.get("MIXSP_SHARED_DIR", REPO_ROOT.parent / "shared"))


@dataclass(frozen=True)
class DataParams:
    spec: str = "auto"
    corpus_files: str | list[str] = "auto"
    max_corpus_sentences: int = 20000
    seed: int = 0
    root: str = "data"

    def __post_init__(self) -> None:
        if self.max_corpus_sentences < 1:
            raise ConfigError("data.max_corpus_sentences", f"must be >= 1, got {self.max_corpus_sentences}")
        if not str(self.spec).strip():
            raise ConfigError("data.spec", "must not be empty")

    @property
    def senteval_dir(self) -> Path:
        return shared_dir() / "data" / "senteval"

    def resolved_spec(self) -> str:
        if self.spec != "auto":
            return self.spec
        if self.senteval_dir.is_dir():
            return f"senteval:{self.senteval_dir}"
        return HUB_DEFAULT_SPEC

    def resolved_corpus_files(self) -> list[Path]:
        if self.corpus_files != "auto":
            return [Path(p) for p in self.corpus_files]
        from mixsp_core.data.corpus import default_corpus_files

        return default_corpus_files(self.senteval_dir) if self.senteval_dir.is_dir() else []

    def root_path(self) -> Path:
        root = Path(self.root)
        return root if root.is_absolute() else REPO_ROOT / root


@dataclass(frozen=True)
class TeacherParams:
    model: str = "sentence-transformers/all-mpnet-base-v2"
    batch_size: int = 64
    device: str = "auto"
    # Shards of the sentences missing from the cache, encoded side by side (mixsp_core/teacher_shards.py).
    shards: int = 2

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError("teacher.batch_size", f"must be >= 1, got {self.batch_size}")
        if not isinstance(self.shards, int) or self.shards < 1:
            raise ConfigError("teacher.shards", f"must be an integer >= 1, got {self.shards!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError("teacher.device", f"must be auto, cpu or cuda[:N], got {self.device!r}")

    def resolved_device(self) -> str | None:
        return None if self.device == "auto" else self.device


@dataclass(frozen=True)
class Params:
    data: DataParams = field(default_factory=DataParams)
    teacher: TeacherParams = field(default_factory=TeacherParams)
    # Sections owned by later stages (train, compress, merge, evaluate) stay raw here and are parsed by
    # their own config classes, so this file need not know every field.
    extra: dict[str, Any] = field(default_factory=dict)


def _build(cls: type, section: str, raw: Any) -> Any:
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        raise ConfigError(section, f"must be a mapping, got {type(raw).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{section}.{unknown[0]}", f"unknown field (known: {', '.join(sorted(known))})")
    try:
        return cls(**raw)
    except TypeError as err:
        raise ConfigError(section, str(err)) from err


def _apply_override(raw: dict[str, Any], dotted: str, value: Any) -> None:
    section, _, key = dotted.partition(".")
    raw.setdefault(section, {})[key] = value


def load_params(path: Path | str = REPO_ROOT / "params.yaml", overrides: dict[str, Any] | None = None) -> Params:
    """Read params.yaml; ``overrides`` maps dotted keys (``data.spec``) to values."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(str(path), "parameter file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(str(path), f"not valid YAML: {err}") from err
    for dotted, value in (overrides or {}).items():
        _apply_override(raw, dotted, value)
    return Params(
        data=_build(DataParams, "data", raw.pop("data", None)),
        teacher=_build(TeacherParams, "teacher", raw.pop("teacher", None)),
        extra=raw,
    )
