"""The evaluation grid: one checkpoint, every (layers, dims, vector type) cell asked for.

For each layer count L the embedder runs with only its first L layers (:func:`limited_layers`); its
vectors for the evaluation sentences and for a fitting corpus are computed once. For each dims k a
projection is fitted on the corpus vectors (PCA, or prefix truncation for Matryoshka-trained models;
k at or above the width keeps the vectors as they are) and for each vector type a quantiser is
calibrated on the projected corpus (int8) or set (binary). Each cell reports Spearman per task (and the
dev primary metric), bytes per vector and encode speed: sentences/s of the L-layer encoder plus the
cell's transform, on this machine.

Output: :class:`GridResult` with ``to_dict`` (JSON), ``to_markdown`` (table) and ``plot`` (Spearman
against dims, one line per layer count, one panel per vector type).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from mixsp_core.compress.layers import find_hf_model, limited_layers, num_layers
from mixsp_core.compress.pca import PCATransform
from mixsp_core.compress.quantize import quantizer
from mixsp_core.compress.transform import VECTOR_TYPES, Embedder, Transform, TransformChain, bytes_per_vector
from mixsp_core.compress.truncate import TruncateTransform
from mixsp_core.errors import ConfigError
from mixsp_core.evaluate.plots import save_figure
from mixsp_core.evaluate.sts import DEV_TASKS, cosine_rows, json_ready, primary_metric, score_table
from mixsp_core.io import write_json_atomic, write_text_atomic

DIM_METHODS = ("pca", "truncate")
DEFAULT_DIMS = (32, 64, 128, 256, 384)


@dataclass
class GridSpec:
    """Which cells to evaluate.

    ``layers``: layer counts (None: the model's full depth only); ``dims``: target widths (None: the
    full width only); ``vector_types``: from ``float32``, ``int8``, ``binary``; ``dim_method``: ``pca``
    (post-hoc) or ``truncate`` (prefixes, for Matryoshka-trained models).
    """

    layers: list[int] | None = None
    dims: list[int] | None = None
    vector_types: list[str] = field(default_factory=lambda: list(VECTOR_TYPES))
    dim_method: str = "pca"
    batch_size: int = 64

    def validate(self) -> None:
        if self.dim_method not in DIM_METHODS:
            raise ConfigError("grid.dim_method", f"must be one of {DIM_METHODS}, got {self.dim_method!r}")
        bad = [v for v in self.vector_types if v not in VECTOR_TYPES]
        if bad or not self.vector_types:
            raise ConfigError("grid.vector_types",
                              f"must be a non-empty subset of {VECTOR_TYPES}, got {self.vector_types}")
        for name in ("layers", "dims"):
            values = getattr(self, name)
            if values is not None and (not values or any(int(v) < 1 for v in values)):
                raise ConfigError(f"grid.{name}", f"must be positive integers, got {values}")
        if self.batch_size < 1:
            raise ConfigError("grid.batch_size", f"must be >= 1, got {self.batch_size}")


@dataclass
class GridCell:
    layers: int
    dims: int
    vector_type: str
    bytes_per_vector: int
    sentences_per_s: float
    tasks: dict[str, float]  # eval name -> Spearman x100
    dev: float | None  # mean of the dev tasks present (the selection metric)
    transform: str  # e.g. "pca128+int8", "none"


@dataclass
class GridResult:
    model: str
    spec: dict[str, Any]
    width: int
    total_layers: int
    eval_sentences: int
    fit_sentences: int
    cells: list[GridCell]

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "spec": self.spec, "width": self.width, "total_layers": self.total_layers,
                "eval_sentences": self.eval_sentences, "fit_sentences": self.fit_sentences,
                "cells": [asdict(c) for c in self.cells]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GridResult:
        """Rebuild a result from :meth:`to_dict`'s output (for example to re-plot a saved grid)."""
        cells = [GridCell(**c) for c in data["cells"]]
        return cls(**{**{k: v for k, v in data.items() if k != "cells"}, "cells": cells})

    @classmethod
    def load_json(cls, path: str | Path) -> GridResult:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))

    def save_json(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` as JSON to ``path`` atomically (parent folders created); an undefined
        (NaN) correlation is written as null, never as the invalid ``NaN`` token."""
        return write_json_atomic(path, json_ready(self.to_dict()))

    @property
    def task_names(self) -> list[str]:
        names = sorted({t for c in self.cells for t in c.tasks})
        # Dev tasks first, in the design's order; then the rest alphabetically.
        return [t for t in DEV_TASKS if t in names] + [t for t in names if t not in DEV_TASKS]

    def to_markdown(self) -> str:
        """One row per cell: Spearman per task, the dev mean, bytes per vector and sentences/s."""
        tasks = self.task_names
        head = ["layers", "dims", "vector", *tasks, "dev", "bytes/vec", "sent/s", "transform"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
        for c in self.cells:
            scores = [f"{c.tasks[t]:.2f}" if t in c.tasks else "" for t in tasks]
            dev = f"{c.dev:.2f}" if c.dev is not None else ""
            lines.append("| " + " | ".join([str(c.layers), str(c.dims), c.vector_type, *scores, dev,
                                            str(c.bytes_per_vector), f"{c.sentences_per_s:.0f}",
                                            c.transform]) + " |")
        return "\n".join(lines)

    def plot(self, path: str | Path, metric: str = "dev") -> Path:
        """Spearman (``metric``: ``dev`` or a task name) against dims, one line per layer count, one
        panel per vector type; written as an image (format from the suffix)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        types = [v for v in VECTOR_TYPES if any(c.vector_type == v for c in self.cells)]
        fig, axes = plt.subplots(1, len(types), figsize=(4.2 * len(types), 3.6), sharey=True, squeeze=False)
        for ax, vtype in zip(axes[0], types):
            for layers in sorted({c.layers for c in self.cells}):
                cells = sorted((c for c in self.cells if c.layers == layers and c.vector_type == vtype),
                               key=lambda c: c.dims)
                ys = [c.dev if metric == "dev" else c.tasks.get(metric) for c in cells]
                ax.plot([c.dims for c in cells], ys, marker="o", label=f"{layers} layers")
            ax.set_xscale("log", base=2)
            ticks = sorted({c.dims for c in self.cells})
            ax.set_xticks(ticks, [str(t) for t in ticks])
            ax.minorticks_off()
            ax.set_xlabel("dims")
            ax.set_title(vtype)
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel(f"Spearman x100 ({metric})")
        axes[0][-1].legend(loc="best", fontsize=8)
        fig.suptitle(self.model, fontsize=9)
        fig.tight_layout()
        path = save_figure(fig, path)
        plt.close(fig)
        return path

    def write(self, directory: str | Path, stem: str = "grid") -> dict[str, Path]:
        """``{stem}.json``, ``{stem}.md`` and ``{stem}.png`` in ``directory``."""
        directory = Path(directory)
        md = write_text_atomic(directory / f"{stem}.md", self.to_markdown() + "\n")
        return {"json": self.save_json(directory / f"{stem}.json"), "markdown": md,
                "plot": self.plot(directory / f"{stem}.png")}


def _encode_timed(embedder: Embedder, sentences: list[str], batch_size: int) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    try:
        vectors = embedder.encode(sentences, batch_size=batch_size, show_progress=False)
    except TypeError:  # an embedder without the show_progress keyword
        vectors = embedder.encode(sentences, batch_size=batch_size)
    return np.asarray(vectors, dtype=np.float32), time.perf_counter() - start


def _depth(embedder: Embedder) -> int | None:
    try:
        return num_layers(find_hf_model(embedder))
    except ConfigError:
        return None


def _projection(method: str, dims: int, width: int) -> Transform | None:
    if dims >= width:
        return None
    return PCATransform(dims) if method == "pca" else TruncateTransform(dims)


def run_grid(embedder: Embedder, pairs: pd.DataFrame, corpus: Sequence[str], spec: GridSpec | None = None,
             model: str = "") -> GridResult:
    """Evaluate every cell of ``spec`` for ``embedder`` on ``pairs`` (the pairs table; every task in it
    is scored), fitting projections and int8 ranges on ``corpus`` sentences (not the evaluation
    sentences). Layer cells need an embedder wrapping a Hugging Face encoder."""
    spec = spec or GridSpec()
    spec.validate()
    if pairs.empty:
        raise ValueError("run_grid: no pairs to evaluate")
    corpus = list(dict.fromkeys(corpus))
    needs_fit = spec.dim_method == "pca" or "int8" in spec.vector_types
    if needs_fit and len(corpus) < 2:
        raise ValueError("run_grid: PCA / int8 cells need a fitting corpus of sentences")
    depth = _depth(embedder)
    layer_counts = sorted({int(v) for v in spec.layers}, reverse=True) if spec.layers else [depth or 0]
    if spec.layers and depth is None:
        raise ConfigError("grid.layers", f"{type(embedder).__name__} has no transformer layer stack to cut")
    if depth is not None and max(layer_counts) > depth:
        raise ConfigError("grid.layers", f"the model has {depth} layers; asked for {max(layer_counts)}")
    unique = list(pd.unique(pd.concat([pairs["sentence1"], pairs["sentence2"]], ignore_index=True)))
    row_of = {s: i for i, s in enumerate(unique)}
    left = np.array([row_of[s] for s in pairs["sentence1"]])
    right = np.array([row_of[s] for s in pairs["sentence2"]])

    cells: list[GridCell] = []
    width = 0
    n_cells = len(layer_counts) * len(spec.dims or [0]) * len(spec.vector_types)
    bar = tqdm(total=n_cells, desc="grid", unit="cell")
    with bar:
        for layers in layer_counts:
            limit = (limited_layers(embedder, layers) if depth is not None and layers < depth
                     else contextlib.nullcontext(embedder))
            with limit as active:
                eval_vecs, seconds = _encode_timed(active, unique, spec.batch_size)
                fit_vecs = _encode_timed(active, corpus, spec.batch_size)[0] if needs_fit else eval_vecs
            width = eval_vecs.shape[1]
            for dims in sorted({min(int(k), width) for k in (spec.dims or [width])}):
                for vtype in spec.vector_types:
                    steps = [s for s in (_projection(spec.dim_method, dims, width), quantizer(vtype)) if s]
                    if steps:
                        chain = TransformChain(steps).fit(fit_vecs)
                        t0 = time.perf_counter()
                        vecs = chain.apply(eval_vecs)
                        transform_s, label = time.perf_counter() - t0, chain.name
                    else:
                        vecs, transform_s, label = eval_vecs, 0.0, "none"
                    tasks = score_table(pairs, cosine_rows(vecs[left], vecs[right]))
                    spearman = {name: round(float(row["spearman"]), 4) for name, row in tasks.items()}
                    cells.append(GridCell(
                        layers=layers, dims=dims, vector_type=vtype, bytes_per_vector=bytes_per_vector(dims, vtype),
                        sentences_per_s=len(unique) / max(seconds + transform_s, 1e-9), tasks=spearman,
                        dev=primary_metric({"tasks": tasks}), transform=label))
                    bar.update(1)
    return GridResult(model=model, spec=asdict(spec), width=width, total_layers=depth or 0,
                      eval_sentences=len(unique), fit_sentences=len(corpus) if needs_fit else 0, cells=cells)
