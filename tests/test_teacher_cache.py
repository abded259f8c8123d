"""Teacher cache: reuse, partial overlap, persistence, crash safety and clear errors on bad files."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from mixsp_core.errors import DataError
from mixsp_core.models.encoder import Encoder
from mixsp_core.teacher.cache import CacheStats, TeacherCache

FIRST = ["A dog barks.", "A cat sleeps on the mat.", "Two men play chess.", "A dog barks."]
SECOND = ["Two men play chess.", "It is raining in the city.", "A woman slices an onion."]
MODEL = "tiny-teacher"


class Counting:
    """Wraps an encoder and records which sentences it was asked to encode."""

    def __init__(self, encoder: Encoder):
        self.inner = encoder
        self.dim = encoder.dim
        self.pooling, self.normalize, self.max_length = encoder.pooling, encoder.normalize, encoder.max_length
        self.calls: list[list[str]] = []

    def encode(self, sentences, batch_size=64, show_progress=True):
        self.calls.append(list(sentences))
        return self.inner.encode(sentences, batch_size=batch_size, show_progress=False)


@pytest.fixture(scope="module")
def teacher(tiny_teacher_dir) -> Encoder:
    return Encoder(tiny_teacher_dir, device="cpu")


def test_second_call_reuses_everything(tmp_path, teacher):
    enc = Counting(teacher)
    cache = TeacherCache(tmp_path / "c", MODEL)
    first, stats = cache.encode(FIRST, enc, batch_size=2, show_progress=False)
    assert stats == CacheStats(reused=0, encoded=3)  # the repeated sentence is encoded once
    assert enc.calls == [["A dog barks.", "A cat sleeps on the mat.", "Two men play chess."]]
    np.testing.assert_allclose(first, teacher.encode(FIRST, show_progress=False), atol=1e-5)
    np.testing.assert_array_equal(first[0], first[3])

    again, stats = TeacherCache(tmp_path / "c", MODEL).encode(FIRST, enc, show_progress=False)
    assert stats == CacheStats(reused=3, encoded=0) and len(enc.calls) == 1
    np.testing.assert_array_equal(again, first)
    meta = json.loads((tmp_path / "c" / "meta.json").read_text())
    assert (meta["model"], meta["dim"], meta["count"]) == (MODEL, 48, 3)
    assert np.load(tmp_path / "c" / "embeddings.npy").dtype == np.float32


def test_partial_overlap_encodes_only_new(tmp_path, teacher):
    enc = Counting(teacher)
    cache = TeacherCache(tmp_path, MODEL)
    first, _ = cache.encode(FIRST, enc, show_progress=False)
    second, stats = cache.encode(SECOND, enc, show_progress=False)
    assert stats == CacheStats(reused=1, encoded=2)
    assert enc.calls[-1] == SECOND[1:]
    np.testing.assert_array_equal(second[0], first[2])
    np.testing.assert_allclose(second, teacher.encode(SECOND, show_progress=False), atol=1e-5)
    reopened = TeacherCache(tmp_path, MODEL)
    assert len(reopened) == 5 and "It is raining in the city." in reopened
    np.testing.assert_array_equal(reopened.lookup(SECOND + FIRST), np.concatenate([second, first]))
    with pytest.raises(KeyError, match="not in"):
        reopened.lookup(["never seen"])


def test_fully_cached_needs_no_encoder(tmp_path, teacher):
    cache = TeacherCache(tmp_path, MODEL)
    assert cache.missing(FIRST) == ["A dog barks.", "A cat sleeps on the mat.", "Two men play chess."]
    first, _ = cache.encode(FIRST, teacher, show_progress=False)
    assert cache.missing(FIRST) == [] and cache.missing(SECOND) == SECOND[1:]
    again, stats = TeacherCache(tmp_path, MODEL).encode(FIRST[::-1], None)
    assert stats == CacheStats(reused=3, encoded=0)
    np.testing.assert_array_equal(again, first[::-1])
    with pytest.raises(ValueError, match="no encoder"):
        cache.encode(SECOND, None)


def test_interrupted_write_keeps_the_old_cache(tmp_path, teacher, monkeypatch):
    cache = TeacherCache(tmp_path, MODEL)
    first, _ = cache.encode(FIRST, teacher, show_progress=False)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pd.DataFrame, "to_parquet", crash)  # dies after embeddings.npy was replaced
    with pytest.raises(KeyboardInterrupt):
        cache.encode(SECOND, teacher, show_progress=False)
    monkeypatch.undo()
    assert not list(tmp_path.glob("*.tmp"))
    reopened = TeacherCache(tmp_path, MODEL)
    assert len(reopened) == 3
    np.testing.assert_array_equal(reopened.lookup(FIRST), first)
    _, stats = reopened.encode(SECOND, teacher, show_progress=False)
    assert stats == CacheStats(reused=1, encoded=2) and len(TeacherCache(tmp_path, MODEL)) == 5


def test_other_model_or_settings_is_an_error(tmp_path, teacher, tiny_bert_dir):
    TeacherCache(tmp_path, MODEL).encode(FIRST, teacher, show_progress=False)
    with pytest.raises(DataError, match=r"meta\.json.*'tiny-teacher', not 'other'"):
        TeacherCache(tmp_path, "other")
    with pytest.raises(DataError, match="48 wide"):
        TeacherCache(tmp_path, MODEL).encode(SECOND, Encoder(tiny_bert_dir, device="cpu"), show_progress=False)
    raw = Counting(teacher)
    raw.normalize = False
    with pytest.raises(DataError, match="normalize"):
        TeacherCache(tmp_path, MODEL).encode(SECOND, raw, show_progress=False)


def test_corrupt_files_give_clear_errors(tmp_path, teacher):
    TeacherCache(tmp_path, MODEL).encode(FIRST, teacher, show_progress=False)
    meta = tmp_path / "meta.json"
    good_meta = meta.read_text()
    meta.write_text("{not json")
    with pytest.raises(DataError, match=r"meta\.json: unreadable"):
        TeacherCache(tmp_path, MODEL)
    meta.write_text(good_meta)

    index = tmp_path / "index.parquet"
    good_index = index.read_bytes()
    index.write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"index\.parquet: unreadable"):
        TeacherCache(tmp_path, MODEL)
    index.write_bytes(good_index)

    np.save(tmp_path / "embeddings.npy", np.zeros((2, 48), dtype=np.float32))
    with pytest.raises(DataError, match=r"embeddings\.npy: array"):
        TeacherCache(tmp_path, MODEL)

    meta.unlink()
    with pytest.raises(DataError, match=r"meta\.json: missing"):
        TeacherCache(tmp_path, MODEL)


def test_precision_and_quantize_are_recorded_and_checked(tmp_path, teacher, tiny_teacher_dir):
    TeacherCache(tmp_path, MODEL).encode(FIRST, teacher, show_progress=False)
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["encoder"] == {"pooling": "mean", "normalize": True, "max_length": teacher.max_length,
                               "precision": "fp32", "quantize": None, "backend": "torch", "token_budget": None}
    for other, setting in ((Encoder(tiny_teacher_dir, device="cpu", precision="bf16"), "precision: cache 'fp32'"),
                           (Encoder(tiny_teacher_dir, device="cpu", quantize="int8"), "quantize: cache None")):
        with pytest.raises(DataError, match=rf"meta\.json: encoder settings differ.*{setting}"):
            TeacherCache(tmp_path, MODEL).encode(SECOND, other, show_progress=False)
    assert len(TeacherCache(tmp_path, MODEL)) == 3  # refused before anything was written
    # the token budget only regroups batches: recorded, not a clash
    budget = Encoder(tiny_teacher_dir, device="cpu", token_budget=64)
    _, stats = TeacherCache(tmp_path, MODEL).encode(SECOND, budget, show_progress=False)
    assert stats == CacheStats(reused=1, encoded=2)


def test_cache_without_the_new_keys_reads_as_fp32(tmp_path, teacher, tiny_teacher_dir):
    first, _ = TeacherCache(tmp_path, MODEL).encode(FIRST, teacher, show_progress=False)
    meta_path = tmp_path / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["encoder"] = {k: meta["encoder"][k] for k in ("pooling", "normalize", "max_length")}  # as written before
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(DataError, match="precision: cache 'fp32' vs encoder 'bf16'"):
        TeacherCache(tmp_path, MODEL).encode(SECOND, Encoder(tiny_teacher_dir, device="cpu", precision="bf16"),
                                             show_progress=False)
    cache = TeacherCache(tmp_path, MODEL)
    np.testing.assert_array_equal(cache.lookup(FIRST), first)
    _, stats = cache.encode(SECOND, teacher, show_progress=False)  # an fp32 encoder fits it and grows it
    assert stats == CacheStats(reused=1, encoded=2)
    assert json.loads(meta_path.read_text())["encoder"]["precision"] == "fp32"
