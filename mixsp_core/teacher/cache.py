"""A folder of teacher embeddings keyed by the sha256 of each sentence's text, grown incrementally.

Layout: ``embeddings.npy`` (float32, one row per sentence), ``index.parquet`` (``sha256`` -> ``row``,
and ``row_sha256``: :func:`row_check` of the key and the row's vector) and ``meta.json`` (``model``, ``dim``,
``count``, encoder settings).

A cached row is reused only when it is finite and its ``row_sha256`` matches its key and vector, so a NaN
row, a bit flip or two swapped keys in the index are never served: such rows count as missing, are
re-encoded and rewritten in place (``CacheStats.repaired``). Rows of a cache written before ``row_sha256``
was recorded have no check and are re-encoded the same way when next needed (the cache heals row by row).

Writes are crash-safe: rows are appended (or a failing row rewritten), each file is replaced atomically
(temporary file + rename, :func:`mixsp_core.io.replacing_file`), and ``meta.json`` is written last. Its
``count`` says how many leading rows of the other two files are committed, so a run killed between two
replacements leaves the previous state readable (the extra trailing rows are ignored and overwritten by
the next write; a rewritten row whose new check did not land fails its old one and is encoded again).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd

from mixsp_core.data.corpus import check_sentences
from mixsp_core.errors import DataError
from mixsp_core.io import exclusive_lock, replacing_file, sha256_file, sha256_text, write_json_atomic
from mixsp_core.paths import WEIGHTS_FILE

log = logging.getLogger(__name__)

EMBEDDINGS = "embeddings.npy"
INDEX = "index.parquet"
ROW_CHECK = "row_sha256"  # index column binding each key to its row's vector (see row_check)
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
    """Distinct sentences of one ``encode`` call served from the cache and newly encoded; ``repaired`` of the
    encoded ones had a cached row that failed its check (NaN, key / vector mismatch, no check recorded)."""

    reused: int
    encoded: int
    repaired: int = 0


def sentence_key(sentence: str) -> str:
    """The cache key: hex sha256 of the sentence's UTF-8 text (exact text, no normalisation)."""
    return sha256_text(sentence)


def row_check(key: str, vector: np.ndarray) -> str:
    """The ``row_sha256`` of a cache row: hex sha256 of the key's text, a NUL byte and the row's float32
    little-endian bytes. It ties the key to the vector, so swapped keys or changed bytes no longer match."""
    data = np.ascontiguousarray(vector, dtype="<f4").tobytes()
    return hashlib.sha256(key.encode("utf-8") + b"\0" + data).hexdigest()


def _check_finite_rows(vectors: np.ndarray, labels: Sequence[str], where: Path) -> None:
    """Refuse to cache vectors with NaN / inf (``labels``: the sentences or keys of the rows, for the message)."""
    bad = np.flatnonzero(~np.isfinite(vectors).all(axis=1))
    if len(bad):
        raise DataError(where, f"the teacher gave NaN or infinite vectors for {len(bad)} of {len(vectors)} "
                               f"sentences (e.g. {labels[int(bad[0])]!r}); nothing was cached: check the "
                               "teacher's weights and precision")


# Caches written before precision / quantize / backend were recorded were encoded in fp32 without
# quantisation, by torch.
LEGACY_SETTINGS: dict[str, Any] = {"precision": "fp32", "quantize": None, "backend": "torch"}
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
    keys = ("pooling", "normalize", "max_length", "precision", "quantize", "backend", "token_budget")
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
        self._keys: list[str] = []  # row order
        self._checks: list[str | None] = []  # row_sha256 per row (None: not recorded, an older cache)
        self._trusted: dict[int, bool] = {}  # rows verified so far (lazily: only rows asked for are read)
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
        """True when ``sentence`` has a cached row that passes its check."""
        if not isinstance(sentence, str) or sentence_key(sentence) not in self._rows:
            return False
        return not self._untrusted_rows([self._rows[sentence_key(sentence)]])

    @property
    def dim(self) -> int | None:
        """Embedding width, or None for a cache with no rows yet."""
        return None if self.meta is None else int(self.meta["dim"])

    def _load(self) -> None:
        """Read and check ``meta.json`` and the index (embeddings are memory-mapped on demand)."""
        self.meta, self._rows, self._keys, self._checks, self._trusted = None, {}, [], [], {}
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
            index = pd.read_parquet(self.path_index)
        except Exception as err:  # noqa: BLE001 - pyarrow raises several types for bad files
            raise DataError(self.path_index, f"unreadable teacher-cache index: {err}") from err
        lacking = [c for c in ("sha256", "row") if c not in index.columns]
        if lacking:
            raise DataError(self.path_index, f"unreadable teacher-cache index: no column {', '.join(lacking)}")
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
        self._keys = index["sha256"].tolist()
        self._rows = dict(zip(self._keys, range(count)))
        checks = index[ROW_CHECK].tolist() if ROW_CHECK in index.columns else [None] * count
        self._checks = [c if isinstance(c, str) else None for c in checks]

    def _embeddings(self) -> np.ndarray:
        try:
            return np.load(self.path_embeddings, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as err:
            raise DataError(self.path_embeddings, f"unreadable embeddings array: {err}") from err

    def lookup(self, sentences: Sequence[str]) -> np.ndarray:
        """Cached rows (n, dim) float32 aligned with ``sentences``; KeyError if any is not cached, DataError
        naming index.parquet if any cached row fails its check (:meth:`encode` re-encodes those)."""
        sentences = check_sentences(sentences)
        keys = [sentence_key(s) for s in sentences]
        missing = [s for s, k in zip(sentences, keys) if k not in self._rows]
        if missing:
            raise KeyError(f"{len(missing)} of {len(sentences)} sentences are not in {self.directory}, e.g. {missing[0]!r}")
        if not keys:
            return np.zeros((0, self.dim or 0), dtype=np.float32)
        rows = np.fromiter((self._rows[k] for k in keys), dtype=np.int64, count=len(keys))
        bad = self._untrusted_rows(rows.tolist())
        if bad:
            raise DataError(self.path_index, f"{len(bad)} cached rows fail their check (NaN values, a key that does "
                                             f"not match its vector, or no {ROW_CHECK} recorded); encode with the "
                                             "teacher to re-encode them")
        return np.asarray(self._embeddings()[rows], dtype=np.float32)

    def _untrusted_rows(self, rows: Iterable[int]) -> set[int]:
        """Those of ``rows`` whose vector is not finite or does not match its ``row_sha256`` (or has none).
        Each row is read and hashed once per load of the index; what fails is logged once."""
        rows = list(rows)
        todo = sorted({r for r in rows if r not in self._trusted})
        failed = {"with NaN or infinite values": 0, "whose key does not match its vector": 0,
                  f"without {ROW_CHECK} (written by an older version)": 0}
        reasons = list(failed)
        if todo:
            emb = self._embeddings()
            for start in range(0, len(todo), _COPY_ROWS):
                chunk = todo[start : start + _COPY_ROWS]
                block = np.asarray(emb[chunk], dtype=np.float32)
                for row, vector, finite in zip(chunk, block, np.isfinite(block).all(axis=1)):
                    check = self._checks[row]
                    reason = (reasons[0] if not finite else reasons[2] if check is None
                              else reasons[1] if check != row_check(self._keys[row], vector) else None)
                    self._trusted[row] = reason is None
                    if reason is not None:
                        failed[reason] += 1
        if any(failed.values()):
            detail = ", ".join(f"{n} {why}" for why, n in failed.items() if n)
            log.warning("%s: cached rows fail their check (%s): not reused, re-encoded", self.path_index, detail)
        return {r for r in rows if not self._trusted[r]}

    # ------------------------------------------------------------------ writing

    def missing(self, sentences: Sequence[str]) -> list[str]:
        """The distinct sentences not cached yet, or whose cached row fails its check, in first-seen order
        (empty: no encoder needed)."""
        return self.pending(sentences)[0]

    def failing(self, sentences: Sequence[str]) -> list[str]:
        """The distinct sentences of ``sentences`` that have a cached row failing its check (to re-encode)."""
        return self.pending(sentences)[1]

    def pending(self, sentences: Sequence[str]) -> tuple[list[str], list[str]]:
        """``(missing, failing)`` of :meth:`missing` and :meth:`failing` from one check of the cached rows."""
        unseen = self._unseen(check_sentences(sentences))
        return list(unseen.values()), [s for k, s in unseen.items() if k in self._rows]

    def _unseen(self, sentences: list[str]) -> dict[str, str]:
        """``{key: sentence}`` of the distinct sentences without a cached row that passes its check."""
        keys = [sentence_key(s) for s in sentences]
        bad = self._untrusted_rows(self._rows[k] for k in set(keys) if k in self._rows)
        new: dict[str, str] = {}
        for s, k in zip(sentences, keys):
            if k not in new and (k not in self._rows or self._rows[k] in bad):
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
            repaired = sum(1 for k in new if k in self._rows)
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
                _check_finite_rows(vectors, list(new.values()), self.directory)
                self._append(list(new), vectors, int(encoder.dim), settings)
        stats = CacheStats(reused=distinct - len(new), encoded=len(new), repaired=repaired)
        return self.lookup(sentences), stats

    def add(self, keys: Sequence[str], vectors: np.ndarray, settings: dict[str, Any]) -> int:
        """Append rows encoded elsewhere (e.g. a shard, see :mod:`mixsp_core.teacher.shards`); returns how many
        were new.

        ``keys`` are :func:`sentence_key` values aligned with the rows of ``vectors`` (n, dim); ``settings``
        the encoder's (:func:`encoder_settings`), which, like the width, must match the cache's. Keys already
        cached are skipped, unless their row fails its check (then it is replaced); NaN / inf rows are refused.
        One atomic commit under the cache lock: on error the cache is unchanged.
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
            bad = self._untrusted_rows(self._rows[k] for k in set(keys) if k in self._rows)
            fresh: dict[str, int] = {}
            for row, key in enumerate(keys):
                if key not in fresh and (key not in self._rows or self._rows[key] in bad):
                    fresh[key] = row
            if fresh:
                rows = vectors[list(fresh.values())]
                _check_finite_rows(rows, list(fresh), self.directory)
                self._append(list(fresh), rows, int(vectors.shape[1]), settings)
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
        """Commit ``vectors`` for ``keys``: new keys appended, keys already cached (rows that failed their
        check) rewritten in place; every written row gets its ``row_sha256``."""
        self.directory.mkdir(parents=True, exist_ok=True)
        old = len(self._rows)
        rewrite = [(self._rows[k], i) for i, k in enumerate(keys) if k in self._rows]
        appended = [i for i, k in enumerate(keys) if k not in self._rows]
        meta = {"model": self.model_name, "dim": dim, "count": old, "encoder": settings}
        if self.meta is None:
            # Claim the folder for this model before any data lands, so a crash leaves a valid empty cache.
            write_json_atomic(self.path_meta, meta)
        total = old + len(appended)
        with replacing_file(self.path_embeddings) as tmp:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(total, dim))
            if old:
                src = self._embeddings()
                for start in range(0, old, _COPY_ROWS):
                    out[start : min(old, start + _COPY_ROWS)] = src[start : min(old, start + _COPY_ROWS)]
            for row, i in rewrite:
                out[row] = vectors[i]
            out[old:] = vectors[appended]
            out.flush()
            del out
        all_keys = self._keys + [keys[i] for i in appended]
        checks = self._checks + [None] * len(appended)
        written = rewrite + [(old + j, i) for j, i in enumerate(appended)]
        for row, i in written:
            checks[row] = row_check(keys[i], vectors[i])
        index = pd.DataFrame({"sha256": all_keys, "row": np.arange(total, dtype=np.int64),
                              ROW_CHECK: pd.Series(checks, dtype=object)})
        with replacing_file(self.path_index) as tmp:
            index.to_parquet(tmp, index=False)
        meta["count"] = total
        write_json_atomic(self.path_meta, meta)  # the commit point
        self.meta = meta
        self._keys, self._checks = all_keys, checks
        self._rows.update((keys[i], old + j) for j, i in enumerate(appended))
        self._trusted.update((row, True) for row, _ in written)

