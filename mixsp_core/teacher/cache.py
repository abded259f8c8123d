"""A folder of teacher embeddings keyed by the sha256 of each sentence's text, grown incrementally.

Layout: ``embeddings.npy`` (float32, one row per sentence), ``index.parquet`` (``sha256`` -> ``row``)
and ``meta.json`` (``model``, ``dim``, ``count``, encoder settings).

Writes are crash-safe: rows are only ever appended, each file is replaced atomically (temporary
file + rename, :func:`mixsp_core.io.replacing_file`), and ``meta.json`` is written last. Its ``count``
says how many leading rows of the other two files are committed, so a run killed between two
replacements leaves the previous state readable (the extra trailing rows are ignored and overwritten by
the next write).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd

from mixsp_core.data.corpus import check_sentences
from mixsp_core.errors import DataError
from mixsp_core.io import exclusive_lock, replacing_file, sha256_file, sha256_text, write_json_atomic
from mixsp_core.paths import WEIGHTS_FILE

EMBEDDINGS = "embeddings.npy"
INDEX = "index.parquet"
META = "meta.json"
LOCK = ".lock"  # serialises writers of one cache across processes (POSIX advisory lock)
FINETUNED_TEACHER_FILE = "mixsp_teacher.json"  # marks a teacher folder written by teacher.finetune.export_teacher
_COPY_ROWS = 8192  # rows copied per step when rewriting embeddings.npy (bounded memory)


class SentenceEncoder(Protocol):
    """What the cache needs from an encoder (``mixsp_core.models.encoder.Encoder`` fits)."""

    dim: int

    def encode(self, sentences: Sequence[str], batch_size: int = ..., show_progress: bool | None = ...) -> np.ndarray: ...


@dataclass(frozen=True)
class CacheStats:
    """Distinct sentences of one ``encode`` call served from the cache and newly encoded."""

    reused: int
    encoded: int


def sentence_key(sentence: str) -> str:
    """The cache key: hex sha256 of the sentence's UTF-8 text (exact text, no normalisation)."""
    return sha256_text(sentence)


# Caches written before precision / quantize were recorded were encoded in fp32 without quantisation.
LEGACY_SETTINGS: dict[str, Any] = {"precision": "fp32", "quantize": None}
# Recorded, not checked: the token budget only regroups sentences into batches (same vectors up to rounding).
BATCHING_ONLY = ("token_budget",)


def is_finetuned_teacher(name_or_path: str | os.PathLike[str]) -> bool:
    """True for a folder written by :func:`mixsp_core.teacher.finetune.export_teacher` (it holds
    ``mixsp_teacher.json``)."""
    return (Path(os.fspath(name_or_path)) / FINETUNED_TEACHER_FILE).is_file()


def teacher_identity(name_or_path: str | os.PathLike[str]) -> str:
    """The name a teacher's cache is keyed by (``meta.json`` ``model``).

    A Hub id or a plain model folder: the name as given (what the teacher stage always used). A fine-tuned
    teacher folder: ``<base encoder>+finetuned@sha256:<hex of model.safetensors>``, because such a folder is
    re-written in place by the next fine-tune: keyed by its path, the cache would serve the old model's rows.
    """
    name = os.fspath(name_or_path)
    if not is_finetuned_teacher(name):
        return name
    folder = Path(name)
    record = folder / FINETUNED_TEACHER_FILE
    try:
        base = json.loads(record.read_text(encoding="utf-8"))["base_encoder"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(record, f"unreadable fine-tuned teacher record (needs 'base_encoder'): {err}") from err
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise DataError(weights, f"missing: a fine-tuned teacher folder must hold its weights as {WEIGHTS_FILE}")
    return f"{base}+finetuned@sha256:{sha256_file(weights)}"


def settings_clash(recorded: dict[str, Any], settings: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """The output-changing settings on which ``recorded`` and ``settings`` differ: ``{name: (recorded, given)}``
    (unrecorded precision / quantize count as :data:`LEGACY_SETTINGS`; batching-only settings are ignored)."""
    recorded = {**LEGACY_SETTINGS, **recorded}
    return {k: (recorded[k], v) for k, v in settings.items()
            if k in recorded and k not in BATCHING_ONLY and recorded[k] != v}


def encoder_settings(encoder: Any) -> dict[str, Any]:
    """Settings that change an encoder's output, recorded so a cache is never mixed across them
    (an encoder that does not report precision / quantize counts as fp32, not quantised)."""
    keys = ("pooling", "normalize", "max_length", "precision", "quantize", "token_budget")
    return {**LEGACY_SETTINGS, **{k: getattr(encoder, k) for k in keys if hasattr(encoder, k)}}


class TeacherCache:
    """Teacher embeddings for ``model_name`` stored in ``directory`` (created on first write).

    Opening an existing cache made for another model raises :class:`DataError` naming ``meta.json``.
    """

    def __init__(self, directory: str | os.PathLike[str], model_name: str):
        self.directory = Path(directory)
        self.model_name = str(model_name)
        self.meta: dict[str, Any] | None = None
        self._rows: dict[str, int] = {}
        self._load()

    # ------------------------------------------------------------------ reading

    @property
    def path_embeddings(self) -> Path:
        return self.directory / EMBEDDINGS

    @property
    def path_index(self) -> Path:
        return self.directory / INDEX

    @property
    def path_meta(self) -> Path:
        return self.directory / META

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, sentence: object) -> bool:
        return isinstance(sentence, str) and sentence_key(sentence) in self._rows

    @property
    def dim(self) -> int | None:
        """Embedding width, or None for a cache with no rows yet."""
        return None if self.meta is None else int(self.meta["dim"])

    def _load(self) -> None:
        """Read and check ``meta.json`` and the index (embeddings are memory-mapped on demand)."""
        self.meta, self._rows = None, {}
        meta_path = self.path_meta
        if not meta_path.exists():
            leftovers = [p.name for p in (self.path_embeddings, self.path_index) if p.exists()]
            if leftovers:
                raise DataError(meta_path, f"missing, but {', '.join(leftovers)} exist: not a complete teacher cache")
            return
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise DataError(meta_path, f"unreadable teacher-cache metadata: {err}") from err
        missing = [k for k in ("model", "dim", "count") if k not in meta] if isinstance(meta, dict) else ["(object)"]
        if missing:
            raise DataError(meta_path, f"teacher-cache metadata lacks {', '.join(missing)}")
        if meta["model"] != self.model_name:
            raise DataError(
                meta_path,
                f"this cache holds embeddings of model {meta['model']!r}, not {self.model_name!r}; "
                "use another cache directory (or delete this one)",
            )
        count = int(meta["count"])
        self.meta = meta
        if count == 0:
            return
        try:
            index = pd.read_parquet(self.path_index, columns=["sha256", "row"])
        except Exception as err:  # noqa: BLE001 - pyarrow raises several types for bad files
            raise DataError(self.path_index, f"unreadable teacher-cache index: {err}") from err
        if len(index) < count:
            raise DataError(self.path_index, f"holds {len(index)} rows, but {META} records {count}")
        index = index.iloc[:count]
        if not np.array_equal(index["row"].to_numpy(), np.arange(count)):
            raise DataError(self.path_index, "column 'row' is not 0..count-1 in order: corrupt index")
        if index["sha256"].duplicated().any():
            raise DataError(self.path_index, "duplicate sha256 keys: corrupt index")
        emb = self._embeddings()
        if emb.ndim != 2 or emb.shape[1] != int(meta["dim"]) or emb.shape[0] < count or emb.dtype != np.float32:
            raise DataError(
                self.path_embeddings,
                f"array {emb.dtype}{emb.shape} does not fit {META} (float32, >= {count} rows x {meta['dim']})",
            )
        self._rows = dict(zip(index["sha256"].tolist(), range(count)))

    def _embeddings(self) -> np.ndarray:
        try:
            return np.load(self.path_embeddings, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as err:
            raise DataError(self.path_embeddings, f"unreadable embeddings array: {err}") from err

    def lookup(self, sentences: Sequence[str]) -> np.ndarray:
        """Cached rows (n, dim) float32 aligned with ``sentences``; KeyError if any is not cached."""
        sentences = check_sentences(sentences)
        keys = [sentence_key(s) for s in sentences]
        missing = [s for s, k in zip(sentences, keys) if k not in self._rows]
        if missing:
            raise KeyError(f"{len(missing)} of {len(sentences)} sentences are not in {self.directory}, e.g. {missing[0]!r}")
        if not keys:
            return np.zeros((0, self.dim or 0), dtype=np.float32)
        rows = np.fromiter((self._rows[k] for k in keys), dtype=np.int64, count=len(keys))
        return np.asarray(self._embeddings()[rows], dtype=np.float32)

    # ------------------------------------------------------------------ writing

    def missing(self, sentences: Sequence[str]) -> list[str]:
        """The distinct sentences not cached yet, in first-seen order (empty: no encoder needed)."""
        return list(self._unseen(check_sentences(sentences)).values())

    def _unseen(self, sentences: list[str]) -> dict[str, str]:
        new: dict[str, str] = {}
        for s in sentences:
            k = sentence_key(s)
            if k not in self._rows and k not in new:
                new[k] = s
        return new

    def encode(
        self,
        sentences: Sequence[str],
        encoder: SentenceEncoder | None,
        batch_size: int = 64,
        show_progress: bool | None = None,
    ) -> tuple[np.ndarray, CacheStats]:
        """Embeddings aligned with ``sentences``, encoding (and caching) only sentences not seen before.

        ``CacheStats`` counts distinct sentences. Encoder settings (pooling, normalisation,
        max_length, precision, quantize) and width must match what the cache was built with
        (``meta.json`` ``encoder``; one without precision / quantize counts as fp32, not quantised,
        the token budget is recorded only). ``encoder`` may be None
        when every sentence is cached (see :meth:`missing`); ``show_progress`` None leaves the
        encoder's default.
        """
        sentences = check_sentences(sentences)
        if not sentences:
            return np.zeros((0, int(encoder.dim) if encoder else self.dim or 0), dtype=np.float32), CacheStats(0, 0)
        with exclusive_lock(self.directory / LOCK):
            self._load()  # another process may have grown the cache meanwhile
            new = self._unseen(sentences)
            distinct = len({sentence_key(s) for s in sentences})
            if new and encoder is None:
                raise ValueError(f"{len(new)} sentences are not in {self.directory} and no encoder was given")
            if encoder is not None:
                settings = encoder_settings(encoder)
                self._check_encoder(int(encoder.dim), settings)
            if new:
                kwargs: dict[str, Any] = {"batch_size": batch_size}
                if show_progress is not None:
                    kwargs["show_progress"] = show_progress
                vectors = np.asarray(encoder.encode(list(new.values()), **kwargs), dtype=np.float32)
                if vectors.shape != (len(new), int(encoder.dim)):
                    raise ValueError(f"encoder returned shape {vectors.shape}, expected {(len(new), encoder.dim)}")
                self._append(list(new), vectors, int(encoder.dim), settings)
        stats = CacheStats(reused=distinct - len(new), encoded=len(new))
        return self.lookup(sentences), stats

    def add(self, keys: Sequence[str], vectors: np.ndarray, settings: dict[str, Any]) -> int:
        """Append rows encoded elsewhere (e.g. a shard, see :mod:`mixsp_core.teacher.shards`); returns how many
        were new.

        ``keys`` are :func:`sentence_key` values aligned with the rows of ``vectors`` (n, dim); ``settings``
        the encoder's (:func:`encoder_settings`), which, like the width, must match the cache's. Keys already
        cached are skipped. One atomic commit under the cache lock: on error the cache is unchanged.
        """
        keys = list(keys)
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[0] != len(keys):
            raise ValueError(f"{len(keys)} keys but vectors of shape {vectors.shape}")
        with exclusive_lock(self.directory / LOCK):
            self._load()
            if not keys:
                return 0
            self._check_encoder(int(vectors.shape[1]), settings)
            fresh: dict[str, int] = {}
            for row, key in enumerate(keys):
                if key not in self._rows and key not in fresh:
                    fresh[key] = row
            if fresh:
                self._append(list(fresh), vectors[list(fresh.values())], int(vectors.shape[1]), settings)
        return len(fresh)

    def _check_encoder(self, dim: int, settings: dict[str, Any]) -> None:
        if self.meta is None:
            return
        if int(self.meta["dim"]) != dim:
            raise DataError(self.path_meta, f"cache rows are {self.meta['dim']} wide, the encoder gives {dim}")
        clash = settings_clash(self.meta.get("encoder", {}), settings)
        if clash:
            detail = ", ".join(f"{k}: cache {a!r} vs encoder {b!r}" for k, (a, b) in clash.items())
            raise DataError(self.path_meta, f"encoder settings differ from the cache's ({detail}); encode with "
                            "the cache's settings, or use another cache directory (or delete this one)")

    def _append(self, keys: list[str], vectors: np.ndarray, dim: int, settings: dict[str, Any]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        old = len(self._rows)
        meta = {"model": self.model_name, "dim": dim, "count": old, "encoder": settings}
        if self.meta is None:
            # Claim the folder for this model before any data lands, so a crash leaves a valid empty cache.
            write_json_atomic(self.path_meta, meta)
        total = old + len(keys)
        with replacing_file(self.path_embeddings) as tmp:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(total, dim))
            if old:
                src = self._embeddings()
                for start in range(0, old, _COPY_ROWS):
                    out[start : min(old, start + _COPY_ROWS)] = src[start : min(old, start + _COPY_ROWS)]
            out[old:] = vectors
            out.flush()
            del out
        all_keys = list(self._rows) + keys  # dicts keep insertion order = row order
        index = pd.DataFrame({"sha256": all_keys, "row": np.arange(total, dtype=np.int64)})
        with replacing_file(self.path_index) as tmp:
            index.to_parquet(tmp, index=False)
        meta["count"] = total
        write_json_atomic(self.path_meta, meta)  # the commit point
        self.meta = meta
        self._rows.update((k, old + i) for i, k in enumerate(keys))

