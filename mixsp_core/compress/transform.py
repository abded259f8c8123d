"""Post-hoc transforms on embeddings: the base class, chains of steps, saving/loading, and the wrapped embedder.

A transform is a fitted, deterministic map from float32 rows ``(n, d_in)`` to rows ``(n, d_out)``.
A :class:`TransformChain` runs several (for example PCA to 128 dims, then int8 quantisation); stacked on
any embedder (``.encode(sentences, batch_size) -> np.ndarray``) it gives another embedder.

On disk a chain is a folder with ``transform.json`` (kinds, settings, shapes) and
``transform.safetensors`` (the fitted arrays, keys ``step{i}.{name}``): no pickle. Inside a checkpoint
it lives in the sub-folder ``transform/`` (:data:`TRANSFORM_SUBDIR`).
"""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np

from mixsp_core.errors import CheckpointError, ConfigError
from mixsp_core.io import atomic_write, write_json_atomic, writing_dir
from mixsp_core.paths import OPTIMIZER_FILE, TRAINER_STATE_FILE

FORMAT_VERSION = 1
CONFIG_FILE = "transform.json"
WEIGHTS_FILE = "transform.safetensors"
TRANSFORM_SUBDIR = "transform"
VECTOR_TYPES = ("float32", "int8", "binary")


class Embedder(Protocol):
    def encode(self, sentences: list[str], batch_size: int = ...) -> np.ndarray: ...


def as_matrix(x: np.ndarray, name: str = "embeddings") -> np.ndarray:
    """``x`` as a finite float32 matrix (n, d); raises ValueError naming ``name`` otherwise."""
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(f"{name}: expected a matrix (n, d), got shape {arr.shape}")
    arr = arr.astype(np.float32, copy=False)
    if not np.isfinite(arr).all():
        raise ValueError(f"{name}: contains NaN or infinite values")
    return arr


def bytes_per_vector(dim: int, vector_type: str) -> int:
    """Storage of one vector of ``dim`` values: 4 bytes each (float32), 1 (int8) or 1 bit (binary)."""
    if vector_type == "float32":
        return 4 * dim
    if vector_type == "int8":
        return dim
    if vector_type == "binary":
        return math.ceil(dim / 8)
    raise ValueError(f"unknown vector type {vector_type!r}; expected one of {VECTOR_TYPES}")


class Transform(ABC):
    """One step. Subclasses set ``kind`` and implement fit / apply / config / state round trip.

    ``apply`` returns float32 vectors in the space where similarity is computed (for quantisers: the
    decoded values an index scores against); ``store`` returns what an index keeps (int8 codes, packed
    bits); ``vector_type`` names the latter.
    """

    kind: ClassVar[str]
    vector_type: ClassVar[str] = "float32"

    def __init__(self) -> None:
        self.input_dim: int | None = None

    @property
    def fitted(self) -> bool:
        return self.input_dim is not None

    def fit(self, x: np.ndarray) -> Transform:
        """Fit on rows ``x`` (n, d) of embeddings (for example the training corpus); returns self."""
        x = as_matrix(x, f"{self.kind}.fit")
        self._fit(x)
        self.input_dim = int(x.shape[1])
        return self

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Transform rows ``x`` (n, input_dim) to float32 rows (n, output_dim)."""
        return self._apply(self._check_input(x)).astype(np.float32, copy=False)

    def store(self, x: np.ndarray) -> np.ndarray:
        """What an index stores for rows ``x``: float32 vectors unless the step is a quantiser."""
        return self.apply(x)

    @property
    def output_dim(self) -> int:
        if self.input_dim is None:
            raise RuntimeError(f"{self.kind}: not fitted yet")
        return self._output_dim(self.input_dim)

    def _check_input(self, x: np.ndarray) -> np.ndarray:
        if self.input_dim is None:
            raise RuntimeError(f"{self.kind}: call fit() (or load a fitted transform) before apply()")
        x = as_matrix(x, f"{self.kind}.apply")
        if x.shape[1] != self.input_dim:
            raise ValueError(f"{self.kind}: fitted on {self.input_dim}-dim vectors, got {x.shape[1]}-dim")
        return x

    # -- subclass hooks ------------------------------------------------------------------------
    @abstractmethod
    def _fit(self, x: np.ndarray) -> None: ...

    @abstractmethod
    def _apply(self, x: np.ndarray) -> np.ndarray: ...

    def _output_dim(self, input_dim: int) -> int:
        return input_dim

    @abstractmethod
    def get_config(self) -> dict[str, Any]:
        """Constructor settings, JSON-serialisable; ``type(self)(**get_config())`` rebuilds it unfitted."""

    def state(self) -> dict[str, np.ndarray]:
        """The fitted arrays (saved with safetensors); empty for steps that learn nothing."""
        return {}

    def load_state(self, tensors: dict[str, np.ndarray], input_dim: int) -> None:
        """Restore a fitted step from :meth:`state`'s arrays; raises ValueError on a shape mismatch."""
        self.input_dim = input_dim

    def affine(self) -> tuple[np.ndarray, np.ndarray] | None:
        """``(weight (d_out, d_in), bias (d_out,))`` float32 with ``apply(x) == x @ weight.T + bias`` for an
        affine step (what a sentence-transformers ``Dense`` module computes); None for any other step."""
        return None


# Registry of step kinds, filled by the modules that define them (see compress/__init__.py).
TRANSFORM_KINDS: dict[str, type[Transform]] = {}


def register(cls: type[Transform]) -> type[Transform]:
    """Class decorator: make ``cls.kind`` loadable by :func:`load_transform`."""
    TRANSFORM_KINDS[cls.kind] = cls
    return cls


class TransformChain:
    """Steps applied in order; each is fitted on the previous step's output."""

    def __init__(self, steps: Sequence[Transform]):
        steps = list(steps)
        if not steps:
            raise ValueError("a transform chain needs at least one step")
        for i, step in enumerate(steps[:-1]):
            if step.vector_type != "float32":
                raise ValueError(f"step {i} ({step.kind}) quantises; only the last step of a chain may")
        self.steps = steps

    def __repr__(self) -> str:
        return "TransformChain(" + " -> ".join(_describe(s) for s in self.steps) + ")"

    @property
    def name(self) -> str:
        """A short label such as ``pca128+int8``."""
        return "+".join(_describe(s) for s in self.steps)

    @property
    def fitted(self) -> bool:
        return all(s.fitted for s in self.steps)

    @property
    def input_dim(self) -> int:
        dim = self.steps[0].input_dim
        if dim is None:
            raise RuntimeError("transform chain is not fitted")
        return dim

    @property
    def output_dim(self) -> int:
        return self.steps[-1].output_dim

    @property
    def vector_type(self) -> str:
        return self.steps[-1].vector_type

    @property
    def bytes_per_vector(self) -> int:
        return bytes_per_vector(self.output_dim, self.vector_type)

    def fit(self, x: np.ndarray) -> TransformChain:
        """Fit every step in turn on ``x`` (n, d) pushed through the steps before it."""
        x = as_matrix(x, "fit")
        for step in self.steps:
            step.fit(x)
            x = step.apply(x)
        return self

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Float32 vectors in the similarity space (quantisers decode)."""
        for step in self.steps:
            x = step.apply(x)
        return x

    def store(self, x: np.ndarray) -> np.ndarray:
        """What an index keeps: float32, int8 codes or packed bits (uint8, ceil(d/8) per row)."""
        for step in self.steps[:-1]:
            x = step.apply(x)
        return self.steps[-1].store(x)

    def save(self, directory: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """Write ``transform.json`` + ``transform.safetensors`` into ``directory`` (created)."""
        return save_transform(self, directory, extra)


def _describe(step: Transform) -> str:
    cfg = step.get_config()
    label = step.kind
    if step.kind == "whitening":
        label = str(cfg["method"])
    if cfg.get("dims") is not None:
        label += str(cfg["dims"])
    return label


class TransformedEmbedder:
    """An embedder whose vectors go through a fitted :class:`TransformChain`."""

    def __init__(self, base: Embedder, chain: TransformChain):
        if not chain.fitted:
            raise ValueError("TransformedEmbedder needs a fitted transform chain")
        self.base = base
        self.chain = chain

    def __repr__(self) -> str:
        return f"TransformedEmbedder({self.base!r}, {self.chain!r})"

    @property
    def dim(self) -> int:
        return self.chain.output_dim

    def encode(self, sentences: Sequence[str], batch_size: int = 64, **kwargs: Any) -> np.ndarray:
        """The base embedder's vectors for ``sentences``, transformed (float32, similarity space)."""
        return self.chain.apply(self.base.encode(list(sentences), batch_size=batch_size, **kwargs))

    def encode_stored(self, sentences: Sequence[str], batch_size: int = 64, **kwargs: Any) -> np.ndarray:
        """The representation an index keeps (int8 codes / packed bits / float32)."""
        return self.chain.store(self.base.encode(list(sentences), batch_size=batch_size, **kwargs))


def fit_on_corpus(embedder: Embedder, steps: Sequence[Transform], corpus: Sequence[str],
                  batch_size: int = 64) -> TransformChain:
    """Encode ``corpus`` with ``embedder`` and fit a chain of ``steps`` on the vectors."""
    if not corpus:
        raise ValueError("fit_on_corpus: the corpus is empty")
    return TransformChain(steps).fit(embedder.encode(list(corpus), batch_size=batch_size))


# -- persistence ---------------------------------------------------------------------------------

def save_transform(chain: TransformChain, directory: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Save a fitted chain into ``directory``; ``extra`` (JSON) is recorded under ``"info"``."""
    from safetensors.numpy import save_file

    if not chain.fitted:
        raise ValueError("cannot save a transform chain that is not fitted")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, np.ndarray] = {}
    steps = []
    for i, step in enumerate(chain.steps):
        names = []
        for key, value in step.state().items():
            tensors[f"step{i}.{key}"] = np.ascontiguousarray(value)
            names.append(key)
        steps.append({"kind": step.kind, "config": step.get_config(), "input_dim": step.input_dim,
                      "tensors": names})
    config = {
        "mixsp_transform": FORMAT_VERSION,
        "name": chain.name,
        "input_dim": chain.input_dim,
        "output_dim": chain.output_dim,
        "vector_type": chain.vector_type,
        "bytes_per_vector": chain.bytes_per_vector,
        "steps": steps,
        "info": extra or {},
    }
    # safetensors refuses an empty dict on some versions; a marker keeps the file valid and explicit.
    tensors.setdefault("format_version", np.array([FORMAT_VERSION], dtype=np.int64))
    atomic_write(directory / WEIGHTS_FILE, lambda tmp: save_file(tensors, str(tmp)))
    write_json_atomic(directory / CONFIG_FILE, config)
    return directory


def transform_dir(path: str | Path) -> Path | None:
    """The folder holding a saved chain: ``path`` itself or ``path/transform``; None when neither."""
    path = Path(path)
    for candidate in (path, path / TRANSFORM_SUBDIR):
        if (candidate / CONFIG_FILE).is_file():
            return candidate
    return None


def load_transform(path: str | Path) -> TransformChain:
    """Load a chain saved by :func:`save_transform` from ``path`` or ``path/transform``.

    Raises :class:`CheckpointError` naming the file (and JSON line) when it is missing or malformed.
    """
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    directory = transform_dir(path)
    if directory is None:
        raise CheckpointError(f"{Path(path) / CONFIG_FILE}: no saved transform here (nor in {TRANSFORM_SUBDIR}/)")
    config_path = directory / CONFIG_FILE
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{config_path}:{err.lineno}: invalid JSON: {err.msg}") from err
    if not isinstance(config, dict) or config.get("mixsp_transform") != FORMAT_VERSION:
        raise CheckpointError(f"{config_path}: not a mixsp transform (format {FORMAT_VERSION})")
    weights_path = directory / WEIGHTS_FILE
    try:
        tensors = load_file(str(weights_path))
    except (OSError, SafetensorError) as err:
        raise CheckpointError(f"{weights_path}: cannot read: {err}") from err
    steps: list[Transform] = []
    for i, spec in enumerate(config.get("steps") or []):
        where = f"{config_path}: steps[{i}]"
        kind = spec.get("kind")
        if kind not in TRANSFORM_KINDS:
            raise CheckpointError(f"{where}: unknown kind {kind!r}; known: {sorted(TRANSFORM_KINDS)}")
        try:
            step = TRANSFORM_KINDS[kind](**spec.get("config", {}))
            state = {}
            for name in spec.get("tensors", []):
                key = f"step{i}.{name}"
                if key not in tensors:
                    raise ValueError(f"{weights_path} lacks tensor {key!r}")
                state[name] = tensors[key]
            step.load_state(state, int(spec["input_dim"]))
        except (TypeError, ValueError, KeyError, ConfigError) as err:
            raise CheckpointError(f"{where} ({kind}): {err}") from err
        steps.append(step)
    if not steps:
        raise CheckpointError(f"{config_path}: no steps")
    chain = TransformChain(steps)
    for i in range(1, len(steps)):
        if steps[i].input_dim != steps[i - 1].output_dim:
            raise CheckpointError(f"{config_path}: steps[{i}] expects {steps[i].input_dim} dims, "
                                  f"steps[{i - 1}] gives {steps[i - 1].output_dim}")
    return chain


def write_compressed_model(source: str | Path, chain: TransformChain, output_dir: str | Path,
                           info: dict[str, Any] | None = None) -> Path:
    """A self-contained compressed model: a copy of ``source`` (a checkpoint or HF folder, or a Hub id
    resolved to its folder; resumable-training files and any old transform left out) with ``chain``
    saved in ``output_dir/transform/``. Where the source is a sentence-transformers folder (every ``bi``
    checkpoint is), the chain is added to its modules too (:func:`~mixsp_core.models.st_layout.
    append_transform_modules`: Dense modules, quantisation settings). Written beside the target and
    renamed into place."""
    import shutil

    from mixsp_core.models.resolve import resolve_model
    from mixsp_core.models.st_layout import QUANTIZATION_FILE, append_transform_modules

    src = Path(resolve_model(str(source)))
    target = Path(output_dir)
    if target.resolve() == src.resolve():
        raise ValueError(f"{target}: write the compressed model to a new directory, not over its source")
    skip = shutil.ignore_patterns(TRANSFORM_SUBDIR, TRAINER_STATE_FILE, OPTIMIZER_FILE, QUANTIZATION_FILE, ".*")
    with writing_dir(target) as work:
        shutil.copytree(src, work, ignore=skip, dirs_exist_ok=True)
        save_transform(chain, work / TRANSFORM_SUBDIR, {"source": str(source), **(info or {})})
        append_transform_modules(work, chain)
    return target


def wrap_if_transformed(embedder: Embedder, checkpoint_dir: str | Path) -> Embedder:
    """The hook for ``load_embedder``: wrap ``embedder`` when ``checkpoint_dir/transform/`` holds a chain."""
    directory = Path(checkpoint_dir) / TRANSFORM_SUBDIR
    if not (directory / CONFIG_FILE).is_file():
        return embedder
    return TransformedEmbedder(embedder, load_transform(directory))
