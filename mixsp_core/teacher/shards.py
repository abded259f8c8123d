"""Sharded teacher encoding: the sentences still missing from the teacher cache, split into N shards that
separate processes (or machines) encode into their own directories, then merged into the one cache.

Split: sentence ``s`` belongs to shard ``int(sha256(s)[:16], 16) % N + 1`` (shards are numbered 1..N), so a
sentence keeps its shard when other sentences are added, and the N shards are disjoint and together hold
every missing sentence.

A shard directory ``shard-K-of-N/`` holds ``embeddings.npy`` (float32, one row per sentence), ``keys.txt``
(the :func:`~mixsp_core.teacher.cache.sentence_key` of each row's sentence, one per line) and
``manifest.json`` (format, model, encoder settings, dim, shard, shards, count, and ``sentences_sha256``:
the sha256 of keys.txt, which pins the sentence list). It is written into a work directory and swapped in
whole (:func:`mixsp_core.io.writing_dir`): a shard directory is complete or absent.

The merge checks every shard before touching the cache and commits all rows in one atomic append
(:meth:`TeacherCache.add`): a missing, corrupt or mismatched shard raises :class:`DataError` naming it and
leaves the cache as it was.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mixsp_core.errors import ConfigError, DataError
from mixsp_core.io import sha256_text, write_json_atomic, write_text_atomic, writing_dir
from mixsp_core.progress import stage_progress
from mixsp_core.teacher.cache import SentenceEncoder, TeacherCache, encoder_settings, sentence_key, settings_clash

FORMAT = "mixsp-teacher-shard/1"
MANIFEST = "manifest.json"
EMBEDDINGS = "embeddings.npy"
KEYS = "keys.txt"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardSpec:
    """Shard ``number`` (1-based) of ``count``."""

    number: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1 or not 1 <= self.number <= self.count:
            raise ConfigError("shard", f"expected K/N with 1 <= K <= N, got {self.number}/{self.count}")

    @classmethod
    def parse(cls, text: str) -> ShardSpec:
        """``"K/N"``, e.g. ``"2/4"``; a malformed value raises :class:`ConfigError`."""
        number, sep, count = str(text).partition("/")
        if not sep or not number.strip().isdigit() or not count.strip().isdigit():
            raise ConfigError("shard", f"expected K/N (e.g. 1/2), got {text!r}")
        return cls(int(number), int(count))

    @property
    def name(self) -> str:
        """The shard's directory name, ``shard-K-of-N``."""
        return f"shard-{self.number}-of-{self.count}"

    def __str__(self) -> str:
        return f"{self.number}/{self.count}"


def all_shards(count: int) -> list[ShardSpec]:
    return [ShardSpec(number, count) for number in range(1, count + 1)]


def shard_of(sentence: str, count: int) -> int:
    """The shard (1..count) that ``sentence`` belongs to: a stable hash of its text, independent of the others."""
    return int(sentence_key(sentence)[:16], 16) % count + 1


def shard_sentences(sentences: Sequence[str], spec: ShardSpec, cache: TeacherCache) -> list[str]:
    """The distinct sentences missing from ``cache`` that belong to shard ``spec``, in first-seen order."""
    return [s for s in cache.missing(sentences) if shard_of(s, spec.count) == spec.number]


@dataclass(frozen=True)
class Shard:
    """One shard directory as read back (checked by :func:`read_shard`)."""

    path: Path
    spec: ShardSpec
    model: str
    settings: dict[str, Any] | None  # None for an empty shard (no encoder was loaded)
    dim: int | None
    keys: list[str]
    embeddings: np.ndarray


def _keys_text(keys: Sequence[str]) -> str:
    """The text of ``keys.txt``: one key per line."""
    return "".join(f"{k}\n" for k in keys)


def _digest(keys: Sequence[str]) -> str:
    """sha256 of ``keys.txt`` (keys are hex, so its ASCII and UTF-8 bytes are the same)."""
    return sha256_text(_keys_text(keys))


def write_shard(target: Path, spec: ShardSpec, model: str, keys: list[str], vectors: np.ndarray,
                settings: dict[str, Any] | None) -> Path:
    """Write a shard directory atomically (the manifest last, inside the work directory)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    with writing_dir(target) as work:
        np.save(work / EMBEDDINGS, vectors, allow_pickle=False)
        write_text_atomic(work / KEYS, _keys_text(keys), encoding="ascii")
        manifest = {"format": FORMAT, "model": model, "encoder": settings,
                    "dim": int(vectors.shape[1]) if keys else None, "shard": spec.number, "shards": spec.count,
                    "count": len(keys), "sentences_sha256": _digest(keys)}
        write_json_atomic(work / MANIFEST, manifest)
    return target


def read_shard(path: Path, spec: ShardSpec) -> Shard:
    """Read and check the shard directory ``path`` for ``spec``: manifest fields, row count, key digest and
    array shape must agree. Raises :class:`DataError` naming the file at fault."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise DataError(manifest_path, f"shard {spec} is incomplete: no {MANIFEST}")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DataError(manifest_path, f"unreadable shard manifest: {err}") from err
    required = ("format", "model", "encoder", "dim", "shard", "shards", "count", "sentences_sha256")
    lacking = [k for k in required if k not in manifest] if isinstance(manifest, dict) else ["(object)"]
    if lacking:
        raise DataError(manifest_path, f"shard manifest lacks {', '.join(lacking)}")
    if manifest["format"] != FORMAT:
        raise DataError(manifest_path, f"format {manifest['format']!r}, expected {FORMAT!r}")
    if (manifest["shard"], manifest["shards"]) != (spec.number, spec.count):
        raise DataError(manifest_path, f"holds shard {manifest['shard']}/{manifest['shards']}, expected {spec}")
    try:
        keys = (path / KEYS).read_text(encoding="ascii").splitlines()
    except (OSError, ValueError) as err:
        raise DataError(path / KEYS, f"unreadable shard keys: {err}") from err
    if len(keys) != manifest["count"] or _digest(keys) != manifest["sentences_sha256"]:
        raise DataError(path / KEYS, f"{len(keys)} keys that do not match {MANIFEST} "
                                     f"(count {manifest['count']}, sentences_sha256): corrupt shard {spec}")
    try:
        vectors = np.load(path / EMBEDDINGS, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise DataError(path / EMBEDDINGS, f"unreadable shard embeddings: {err}") from err
    dim = manifest["dim"]
    if keys and (vectors.dtype != np.float32 or vectors.shape != (len(keys), dim) or not np.isfinite(vectors).all()):
        raise DataError(path / EMBEDDINGS, f"array {vectors.dtype}{vectors.shape} does not fit {MANIFEST} "
                                           f"(finite float32, {len(keys)} x {dim}): corrupt shard {spec}")
    return Shard(path, spec, str(manifest["model"]), manifest["encoder"], dim, keys, vectors)


@dataclass(frozen=True)
class ShardResult:
    """What :func:`encode_shard` left in ``path``: ``sentences`` rows, ``encoded`` of them by this call
    (0: the shard was done before)."""

    path: Path
    spec: ShardSpec
    sentences: int
    encoded: int


def encode_shard(sentences: Sequence[str], cache_dir: Path, shards_dir: Path, model: str, spec: ShardSpec,
                 load_encoder: Callable[[], SentenceEncoder], batch_size: int = 64) -> ShardResult:
    """Encode shard ``spec`` of the ``sentences`` missing from the cache in ``cache_dir`` into
    ``shards_dir/shard-K-of-N``.

    A shard already there for ``model`` that holds every sentence this shard needs is kept as is (a
    re-run is a no-op); an unreadable or stale one (other model, sentences missing) is replaced.
    ``load_encoder`` is called only when there is something to encode.
    """
    cache = TeacherCache(cache_dir, model)
    todo = shard_sentences(sentences, spec, cache)
    target = Path(shards_dir) / spec.name
    done = _reusable(target, spec, model, todo) if target.exists() else None
    if done is not None:
        return ShardResult(target, spec, len(done.keys), 0)
    if todo:
        encoder = load_encoder()
        # One bar for the shard, and a progress line in the log every minute (the step is long and, with
        # shards side by side, runs with its terminal bar off: the encoder's show_progress).
        with stage_progress(f"teacher shard {spec}", show=bool(getattr(encoder, "show_progress", True))):
            vectors = np.asarray(encoder.encode(todo, batch_size=batch_size), dtype=np.float32)
        if vectors.shape != (len(todo), int(encoder.dim)):
            raise ValueError(f"encoder returned shape {vectors.shape}, expected {(len(todo), encoder.dim)}")
        settings: dict[str, Any] | None = encoder_settings(encoder)
    else:
        vectors, settings = np.zeros((0, 0), dtype=np.float32), None
    write_shard(target, spec, model, [sentence_key(s) for s in todo], vectors, settings)
    return ShardResult(target, spec, len(todo), len(todo))


def _reusable(target: Path, spec: ShardSpec, model: str, todo: list[str]) -> Shard | None:
    """The shard at ``target`` when it already holds every sentence of ``todo`` for ``model``, else None."""
    try:
        shard = read_shard(target, spec)
    except DataError as err:
        log.warning("re-encoding shard %s: %s", spec, err)
        return None
    have = set(shard.keys)
    return shard if shard.model == model and all(sentence_key(s) in have for s in todo) else None


@dataclass(frozen=True)
class MergeReport:
    """A merge: ``added`` rows new to the cache, from ``shards`` (rows per shard, in shard order)."""

    added: int
    shards: dict[str, int]


def merge_shards(cache_dir: Path, shards_dir: Path, model: str, count: int,
                 sentences: Sequence[str] | None = None) -> MergeReport:
    """Merge ``shard-1-of-N`` .. ``shard-N-of-N`` under ``shards_dir`` into the cache in ``cache_dir``.

    Every shard must be present, intact, made with ``model`` and with the same encoder settings and
    width as the others and the cache. With ``sentences`` (the corpus), every one of them missing from the
    cache must be in its shard (else the shard is stale: encoded before the corpus changed). Any failure
    raises :class:`DataError` naming the shard before the cache is touched.
    """
    shards = [_read_for_merge(Path(shards_dir) / spec.name, spec, model) for spec in all_shards(count)]
    cache = TeacherCache(cache_dir, model)
    reference: tuple[str, int | None, dict[str, Any]] | None = None
    if cache.meta is not None and int(cache.meta["count"]) > 0:
        reference = (str(cache.path_meta), cache.dim, cache.meta.get("encoder") or {})
    for shard in (s for s in shards if s.keys):
        if reference is None:
            reference = (str(shard.path / MANIFEST), shard.dim, shard.settings or {})
        where, dim, settings = reference
        clash = settings_clash(settings, shard.settings or {})
        if shard.dim != dim or clash:
            detail = ", ".join(f"{k}: {a!r} there vs {b!r} here" for k, (a, b) in clash.items())
            raise DataError(shard.path / MANIFEST, f"shard {shard.spec} does not fit {where}: dim {shard.dim} vs "
                                                   f"{dim}{'; ' + detail if detail else ''}")
    if sentences is not None:
        _check_coverage(cache, sentences, shards)
    nonempty = [s for s in shards if s.keys]
    added = 0
    if nonempty:
        keys = [k for s in nonempty for k in s.keys]
        added = cache.add(keys, np.concatenate([s.embeddings for s in nonempty]), nonempty[0].settings or {})
    return MergeReport(added, {s.spec.name: len(s.keys) for s in shards})


def _read_for_merge(path: Path, spec: ShardSpec, model: str) -> Shard:
    if not path.is_dir():
        raise DataError(path, f"shard {spec} is missing: encode it (`mixsp teacher --shard {spec}`, or materialise "
                              f"its asset) or copy it here from the machine that did")
    shard = read_shard(path, spec)
    if shard.model != model:
        raise DataError(path / MANIFEST, f"shard {spec} holds embeddings of model {shard.model!r}, not {model!r}")
    return shard


def _check_coverage(cache: TeacherCache, sentences: Sequence[str], shards: list[Shard]) -> None:
    have = {k for s in shards for k in s.keys}
    lacking: dict[int, list[str]] = {}
    for sentence in cache.missing(sentences):
        if sentence_key(sentence) not in have:
            lacking.setdefault(shard_of(sentence, len(shards)), []).append(sentence)
    if lacking:
        number, missed = min(lacking.items())
        shard = shards[number - 1]
        raise DataError(shard.path, f"shard {shard.spec} lacks {len(missed)} corpus sentences (e.g. {missed[0]!r}): "
                                    f"it was encoded before the corpus changed; re-run it (`mixsp teacher --shard "
                                    f"{shard.spec}`)")
