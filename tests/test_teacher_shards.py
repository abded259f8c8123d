"""Sharded teacher encoding (mixsp_core.teacher.shards): the split, shards merged == one-shot encoding,
re-runs as no-ops, and missing / corrupt / mismatched / stale shards refused with the cache untouched."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mixsp_core.errors import ConfigError, DataError
from mixsp_core.models.encoder import Encoder
from mixsp_core.teacher.cache import TeacherCache, sentence_key
from mixsp_core.teacher.shards import (
    ShardSpec,
    all_shards,
    encode_shard,
    merge_shards,
    read_shard,
    shard_of,
    shard_sentences,
)

MODEL = "tiny-teacher"
SENTENCES = [f"Sentence number {i} about {topic}." for i, topic in enumerate(["dogs", "cats", "rain", "chess"] * 6)]


@pytest.fixture(scope="module")
def teacher(tiny_teacher_dir) -> Encoder:
    return Encoder(tiny_teacher_dir, device="cpu", show_progress=False)


class Loader:
    """A load_encoder callable that counts its calls."""

    def __init__(self, encoder):
        self.encoder, self.calls = encoder, 0

    def __call__(self):
        self.calls += 1
        return self.encoder


def encode_all(tmp: Path, sentences: list[str], loader, count: int = 3) -> list:
    return [encode_shard(sentences, tmp / "cache", tmp / "shards", MODEL, spec, loader, batch_size=4)
            for spec in all_shards(count)]


def cache_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file() and p.name != ".lock"}


def test_split_is_deterministic_disjoint_covering_and_stable(tmp_path):
    cache = TeacherCache(tmp_path, MODEL)
    parts = [shard_sentences(SENTENCES, spec, cache) for spec in all_shards(3)]
    assert sorted(s for part in parts for s in part) == sorted(SENTENCES)  # covering, no sentence twice
    assert all(parts)  # 24 sentences: every shard gets some
    assert parts == [shard_sentences(SENTENCES, spec, cache) for spec in all_shards(3)]
    # Adding sentences never moves one from its shard: the shard is a function of the text alone.
    grown = SENTENCES + [f"A new sentence {i}." for i in range(10)]
    for spec, part in zip(all_shards(3), parts):
        assert set(part) <= set(shard_sentences(grown, spec, cache))
    assert all(shard_of(s, 1) == 1 for s in SENTENCES)
    assert ShardSpec.parse("2/4") == ShardSpec(2, 4) and ShardSpec(2, 4).name == "shard-2-of-4"
    for bad in ("0/2", "3/2", "2", "a/b", "1/0"):
        with pytest.raises(ConfigError, match="shard"):
            ShardSpec.parse(bad)


def test_merged_shards_equal_one_shot_encoding(tmp_path, teacher):
    loader = Loader(teacher)
    results = encode_all(tmp_path, SENTENCES, loader)
    assert loader.calls == 3 and sum(r.encoded for r in results) == len(SENTENCES)
    manifest = json.loads((tmp_path / "shards" / "shard-2-of-3" / "manifest.json").read_text())
    assert (manifest["model"], manifest["dim"], manifest["shard"], manifest["shards"]) == (MODEL, 48, 2, 3)
    assert manifest["count"] == results[1].sentences and manifest["encoder"]["pooling"] == "mean"

    report = merge_shards(tmp_path / "cache", tmp_path / "shards", MODEL, 3, sentences=SENTENCES)
    assert report.added == len(SENTENCES) and sum(report.shards.values()) == len(SENTENCES)
    merged = TeacherCache(tmp_path / "cache", MODEL).lookup(SENTENCES)
    one_shot, _ = TeacherCache(tmp_path / "one", MODEL).encode(SENTENCES, teacher, show_progress=False)
    np.testing.assert_allclose(merged, one_shot, atol=1e-5)
    assert json.loads((tmp_path / "cache" / "meta.json").read_text())["encoder"] == manifest["encoder"]

    # Merging again adds nothing; re-running a finished shard (before or after the merge) is a no-op.
    assert merge_shards(tmp_path / "cache", tmp_path / "shards", MODEL, 3).added == 0
    stamp = (tmp_path / "shards" / "shard-1-of-3" / "manifest.json").stat().st_mtime_ns
    again = encode_all(tmp_path, SENTENCES, loader)
    assert [r.encoded for r in again] == [0, 0, 0] and loader.calls == 3
    assert (tmp_path / "shards" / "shard-1-of-3" / "manifest.json").stat().st_mtime_ns == stamp


def test_missing_or_corrupt_shard_is_named_and_cache_untouched(tmp_path, teacher):
    cache_dir, shards = tmp_path / "cache", tmp_path / "shards"
    TeacherCache(cache_dir, MODEL).encode(SENTENCES[:4], teacher, show_progress=False)
    before = cache_bytes(cache_dir)
    encode_all(tmp_path, SENTENCES, Loader(teacher))
    target = shards / "shard-2-of-3"

    def refused(match: str) -> None:
        with pytest.raises(DataError, match=match):
            merge_shards(cache_dir, shards, MODEL, 3, sentences=SENTENCES)
        assert cache_bytes(cache_dir) == before

    (target / "embeddings.npy").rename(tmp_path / "moved.npy")
    refused(r"shard-2-of-3/embeddings\.npy: unreadable")
    arr = np.load(tmp_path / "moved.npy")
    np.save(target / "embeddings.npy", arr[:-1])  # a row short
    refused(r"shard-2-of-3/embeddings\.npy: array .* corrupt shard 2/3")
    arr[0, 0] = np.nan
    np.save(target / "embeddings.npy", arr)
    refused(r"shard-2-of-3/embeddings\.npy: .*finite")
    np.save(target / "embeddings.npy", np.load(tmp_path / "moved.npy"))
    keys = (target / "keys.txt").read_text()
    (target / "keys.txt").write_text(keys.replace(keys[:8], "00000000", 1))
    refused(r"shard-2-of-3/keys\.txt: .*corrupt shard 2/3")
    (target / "keys.txt").write_text(keys)
    manifest = (target / "manifest.json").read_text()
    (target / "manifest.json").write_text("{broken")
    refused(r"shard-2-of-3/manifest\.json: unreadable")
    (target / "manifest.json").write_text(manifest.replace(f'"{MODEL}"', '"other-model"'))
    refused(r"shard-2-of-3/manifest\.json: shard 2/3 holds embeddings of model 'other-model'")
    (target / "manifest.json").write_text(manifest.replace('"pooling": "mean"', '"pooling": "cls"'))
    refused(r"shard-2-of-3/manifest\.json: shard 2/3 does not fit .*pooling")
    (target / "manifest.json").write_text(manifest)
    (shards / "shard-3-of-3").rename(tmp_path / "elsewhere")
    refused(r"shard-3-of-3: shard 3/3 is missing: encode it \(`mixsp teacher --shard 3/3`")

    # Restored, the merge goes through; encoding a shard again replaces only a corrupt one.
    (tmp_path / "elsewhere").rename(shards / "shard-3-of-3")
    assert merge_shards(cache_dir, shards, MODEL, 3, sentences=SENTENCES).added == len(SENTENCES) - 4


def test_stale_shard_is_refused_then_re_encoded(tmp_path, teacher):
    loader = Loader(teacher)
    encode_all(tmp_path, SENTENCES[:12], loader, count=2)
    grown = SENTENCES  # the corpus changed after the shards were encoded
    stale = [spec for spec in all_shards(2) if any(shard_of(s, 2) == spec.number for s in grown[12:])]
    with pytest.raises(DataError, match=rf"{stale[0].name}: shard {stale[0]} lacks \d+ corpus sentences"):
        merge_shards(tmp_path / "cache", tmp_path / "shards", MODEL, 2, sentences=grown)
    assert not (tmp_path / "cache" / "meta.json").exists()
    again = encode_all(tmp_path, grown, loader, count=2)
    assert all(r.encoded == r.sentences for r in again)  # both shards gained sentences: re-encoded
    assert merge_shards(tmp_path / "cache", tmp_path / "shards", MODEL, 2, sentences=grown).added == len(grown)
    assert read_shard(tmp_path / "shards" / "shard-1-of-2", ShardSpec(1, 2)).keys == [
        sentence_key(s) for s in grown if shard_of(s, 2) == 1]


def test_nothing_missing_writes_empty_shards_without_loading(tmp_path, teacher):
    TeacherCache(tmp_path / "cache", MODEL).encode(SENTENCES, teacher, show_progress=False)
    loader = Loader(teacher)
    results = encode_all(tmp_path, SENTENCES, loader, count=2)
    assert loader.calls == 0 and [r.sentences for r in results] == [0, 0]
    assert merge_shards(tmp_path / "cache", tmp_path / "shards", MODEL, 2, sentences=SENTENCES).added == 0
