"""Issue 15, items 2 and 3: a model folder loads only with its own tokenizer; weights are the bytes that were
saved (sha256 recorded in config.json) and finite; `mixsp encode` / `mixsp evaluate --json` never write NaN;
teacher-cache rows are reused only when finite and bound to their key (``row_sha256``)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from mixsp_core.cli import main
from mixsp_core.errors import CheckpointError, DataError
from mixsp_core.io import sha256_file
from mixsp_core.merging import write_merged
from mixsp_core.models.checkpoint import load_checkpoint, load_embedder, read_weights, save_checkpoint
from mixsp_core.models.encoder import Encoder
from mixsp_core.models.student import BiStudent
from mixsp_core.teacher.cache import ROW_CHECK, CacheStats, TeacherCache
from mixsp_core.teacher.shards import all_shards, encode_shard, merge_shards
from mixsp_core.training.config import ModelConfig
from tests.train_helpers import one_thread

_one_thread = pytest.fixture(scope="module", autouse=True)(one_thread)

SENTENCES = ["A man is playing a guitar.", "A woman slices an onion.", "Two dogs run in the snow.", "Hi."]
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json")
WEIGHTS = "encoder/model.safetensors"


@pytest.fixture(scope="module")
def bi_model(tiny_bert_dir):
    torch.manual_seed(0)
    config = ModelConfig(kind="bi", encoder=str(tiny_bert_dir), projector_mult=2, output_dim=16, max_length=32)
    return BiStudent.from_config(config).eval()


@pytest.fixture()
def saved(bi_model, tmp_path) -> Path:
    return save_checkpoint(bi_model, tmp_path / "ckpt")


def _copy(folder: Path, tmp_path: Path, name: str) -> Path:
    return Path(shutil.copytree(folder, tmp_path / name))


def _drop_tokenizer(folder: Path) -> None:
    for name in TOKENIZER_FILES:
        (folder / name).unlink(missing_ok=True)


def _tokenizer_of_size(source: Path, size: int, dest: Path) -> None:
    """Replace the tokenizer files in ``dest`` by a WordPiece tokenizer of exactly ``size`` tokens: the
    first ``size`` entries of ``source``'s vocabulary, padded with made-up tokens."""
    from transformers import AutoTokenizer, BertTokenizerFast

    ids = AutoTokenizer.from_pretrained(source).get_vocab()
    vocab = sorted(ids, key=ids.__getitem__)
    vocab = (vocab + [f"extra{i}" for i in range(max(0, size - len(vocab)))])[:size]
    _drop_tokenizer(dest)
    tokenizer = BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)})
    tokenizer.save_pretrained(dest)
    assert len(tokenizer) == size


def _one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"mixsp {command}: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


# --- item 2: a tokenizer that belongs to the model ----------------------------------------------------


def test_checkpoint_without_tokenizer_files_is_refused_naming_the_folder(saved, tmp_path, capsys):
    _drop_tokenizer(saved / "encoder")
    with pytest.raises(CheckpointError, match=rf"{saved / 'encoder'}: no tokenizer files"):
        load_embedder(saved, device="cpu")
    sentences = tmp_path / "s.txt"
    sentences.write_text("\n".join(SENTENCES) + "\n")
    out = tmp_path / "v.npy"
    assert main(["encode", "--model", str(saved), "--input", str(sentences), "--output", str(out),
                 "--device", "cpu"]) == 2
    assert "no tokenizer files" in _one_line_error(capsys, "encode") and not out.exists()


def test_hf_folder_without_tokenizer_files_is_refused_for_teacher_and_student(tiny_bert_dir, tmp_path):
    folder = _copy(tiny_bert_dir, tmp_path, "hf")
    _drop_tokenizer(folder)
    with pytest.raises(CheckpointError, match=rf"{folder}: no tokenizer files"):
        Encoder(folder, device="cpu")  # the teacher's loader
    with pytest.raises(CheckpointError, match=rf"{folder}: no tokenizer files"):
        BiStudent.from_config(ModelConfig(kind="bi", encoder=str(folder), output_dim=16, max_length=32))


def test_a_tokenizer_larger_than_the_embedding_table_is_refused(saved, tiny_bert_dir, tmp_path):
    rows = json.loads((tiny_bert_dir / "config.json").read_text())["vocab_size"]
    _tokenizer_of_size(tiny_bert_dir, rows + 100, saved / "encoder")
    with pytest.raises(CheckpointError, match=rf"{saved / 'encoder'}: the tokenizer has {rows + 100} tokens but "
                                              rf"the model's embedding table only {rows} rows"):
        load_checkpoint(saved)
    folder = _copy(tiny_bert_dir, tmp_path, "hf")
    _tokenizer_of_size(tiny_bert_dir, rows + 100, folder)
    with pytest.raises(CheckpointError, match=rf"{folder}: the tokenizer has {rows + 100} tokens"):
        Encoder(folder, device="cpu")


def test_a_tokenizer_far_smaller_than_the_embedding_table_is_refused(tiny_bert_dir, tmp_path):
    folder = _copy(tiny_bert_dir, tmp_path, "hf")
    _tokenizer_of_size(tiny_bert_dir, 200, folder)  # files present, but not the model's vocabulary
    with pytest.raises(CheckpointError, match=rf"{folder}: the tokenizer has only 200 tokens"):
        Encoder(folder, device="cpu")
    Encoder(tiny_bert_dir, device="cpu")  # the intact folder loads


# --- item 3: weights are the bytes saved, and finite ---------------------------------------------------


def test_saving_records_the_sha256_of_each_weights_file(saved):
    recorded = json.loads((saved / "config.json").read_text())["weights_sha256"]
    assert recorded == {name: sha256_file(saved / name) for name in (WEIGHTS, "2_MixSPHead/model.safetensors")}


def test_flipped_bytes_inside_the_weights_are_refused_naming_the_file(saved):
    weights = saved / WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-64:-60] = bytes(b ^ 0xFF for b in data[-64:-60])  # inside the tensor data: safetensors still parses it
    weights.write_bytes(bytes(data))
    load_file(str(weights))  # the header is intact: only the recorded sha256 can tell
    for load in (lambda: load_checkpoint(saved), lambda: read_weights(saved)):
        with pytest.raises(CheckpointError, match=rf"{weights}: content hash mismatch, file changed or corrupt"):
            load()


def _write_nan(saved: Path, tensor: str) -> None:
    """NaN into ``tensor`` of the encoder's weights, rewritten with safetensors (config.json untouched)."""
    weights = saved / WEIGHTS
    state = load_file(str(weights))
    state[tensor][0, 0] = float("nan")
    save_file(state, str(weights), metadata={"format": "pt"})


def test_nan_weights_are_refused_with_or_without_a_recorded_hash(saved, bi_model):
    tensor = "embeddings.word_embeddings.weight"
    _write_nan(saved, tensor)
    with pytest.raises(CheckpointError, match=f"{saved / WEIGHTS}: content hash mismatch"):
        load_embedder(saved, device="cpu")
    cfg = saved / "config.json"
    meta = json.loads(cfg.read_text())
    del meta["weights_sha256"]  # as a checkpoint saved before the hashes were recorded
    cfg.write_text(json.dumps(meta))
    for load in (lambda: load_checkpoint(saved), lambda: read_weights(saved)):
        with pytest.raises(CheckpointError, match=rf"{saved / WEIGHTS}: tensor {tensor} holds NaN"):
            load()


def test_checkpoints_without_recorded_hashes_still_load(saved, bi_model):
    cfg = saved / "config.json"
    meta = json.loads(cfg.read_text())
    del meta["weights_sha256"]
    cfg.write_text(json.dumps(meta))
    np.testing.assert_array_equal(load_embedder(saved, device="cpu").encode(SENTENCES, show_progress=False),
                                  bi_model.encode(SENTENCES, show_progress=False))


def test_merged_weights_get_fresh_hashes(saved, tmp_path):
    state = {k: v * 0.5 if v.is_floating_point() else v for k, v in read_weights(saved).items()}
    merged = write_merged(saved, state, tmp_path / "merged", record={"method": "half"})
    recorded = json.loads((merged / "config.json").read_text())["weights_sha256"]
    assert recorded[WEIGHTS] == sha256_file(merged / WEIGHTS) != sha256_file(saved / WEIGHTS)
    torch.testing.assert_close(read_weights(merged), state, rtol=0, atol=0)
    load_checkpoint(merged)


def test_a_plain_hf_folder_with_nan_weights_is_refused(tiny_bert_dir, tmp_path, capsys):
    folder = _copy(tiny_bert_dir, tmp_path, "hf")
    state = load_file(str(folder / "model.safetensors"))
    name = next(k for k in state if k.endswith("word_embeddings.weight"))
    state[name][3, 1] = float("inf")
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"{folder}: tensor \S*word_embeddings.weight holds NaN or infinite"):
        Encoder(folder, device="cpu")


# --- item 3: never NaN in CLI outputs ------------------------------------------------------------------


def test_encode_refuses_non_finite_vectors_and_writes_nothing(tmp_path, tiny_bert_dir, monkeypatch, capsys):
    class HalfNaN:
        def encode(self, sentences, batch_size=64):
            out = np.ones((len(sentences), 4), np.float32)
            out[1] = np.nan
            return out

    monkeypatch.setattr("mixsp_core.cli._load", lambda *args: HalfNaN())
    sentences = tmp_path / "s.txt"
    sentences.write_text("\n".join(SENTENCES) + "\n")
    out = tmp_path / "v.npy"
    out.write_bytes(b"previous")
    assert main(["encode", "--model", str(tiny_bert_dir), "--input", str(sentences), "--output", str(out)]) == 2
    err = _one_line_error(capsys, "encode")
    assert "NaN or infinite vectors for 1 of 4 inputs (first: row 1)" in err and out.read_bytes() == b"previous"


def _pairs_csv(tmp_path: Path, scores: list[float]) -> Path:
    path = tmp_path / "pairs.csv"
    rows = [("A cat sits.", "A cat is sitting."), ("A dog runs.", "A man sings."),
            ("Kids play.", "Children are playing."), ("It rains.", "The sun is out.")]
    path.write_text("sentence1,sentence2,score,split\n" + "".join(f"{a},{b},{s},test\n" for (a, b), s in zip(rows, scores)))
    return path


@pytest.mark.filterwarnings("ignore::scipy.stats.ConstantInputWarning")
def test_evaluate_json_with_constant_predictions_is_valid_json(tiny_bert_dir, tmp_path, capsys):
    folder = _copy(tiny_bert_dir, tmp_path, "constant")  # a real model whose every vector is the same
    state = load_file(str(folder / "model.safetensors"))
    norm = max(k for k in state if k.endswith("output.LayerNorm.weight"))  # the last layer's output norm
    state[norm].zero_()
    state[norm.replace("weight", "bias")].fill_(0.5)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "r.json"
    assert main(["evaluate", "--model", str(folder), "--data", f"file:{_pairs_csv(tmp_path, [4.5, 0.5, 4.0, 1.0])}",
                 "--json", str(out), "--device", "cpu"]) == 0

    def refuse(token: str):
        raise AssertionError(f"invalid JSON token {token}")

    result = json.loads(out.read_text(), parse_constant=refuse)
    assert result["tasks"]["pairs"]["spearman"] is None
    assert "undefined values (NaN / inf" in capsys.readouterr().err


def test_evaluate_json_with_constant_gold_scores_is_a_clear_error(tiny_bert_dir, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["evaluate", "--model", str(tiny_bert_dir), "--data", f"file:{_pairs_csv(tmp_path, [3.0] * 4)}",
                 "--json", str(out), "--device", "cpu"]) == 2
    assert "constant" in _one_line_error(capsys, "evaluate") and not out.exists()


# --- item 3: teacher-cache rows are finite and bound to their key ----------------------------------------

MODEL = "tiny-teacher"
FIRST = ["A dog barks.", "A cat sleeps on the mat.", "Two men play chess."]


class Counting:
    """An encoder wrapper recording what it was asked to encode."""

    def __init__(self, encoder: Encoder):
        self.inner, self.dim, self.calls = encoder, encoder.dim, []
        self.pooling, self.normalize, self.max_length = encoder.pooling, encoder.normalize, encoder.max_length

    def encode(self, sentences, batch_size=64, show_progress=True):
        self.calls.append(list(sentences))
        return self.inner.encode(sentences, batch_size=batch_size, show_progress=False)


@pytest.fixture(scope="module")
def teacher(tiny_teacher_dir) -> Encoder:
    return Encoder(tiny_teacher_dir, device="cpu", show_progress=False)


@pytest.fixture()
def cache_dir(tmp_path, teacher) -> Path:
    TeacherCache(tmp_path / "cache", MODEL).encode(FIRST, teacher, show_progress=False)
    return tmp_path / "cache"


def _edit_rows(cache_dir: Path, edit) -> None:
    emb = np.load(cache_dir / "embeddings.npy")
    edit(emb)
    np.save(cache_dir / "embeddings.npy", emb)


def test_nan_rows_are_re_encoded_not_reused(cache_dir, teacher):
    _edit_rows(cache_dir, lambda emb: emb.__setitem__((1, 5), np.nan))
    cache = TeacherCache(cache_dir, MODEL)
    with pytest.raises(DataError, match=r"index\.parquet: 1 cached rows fail their check"):
        cache.lookup(FIRST)
    assert cache.missing(FIRST) == cache.failing(FIRST) == [FIRST[1]] and FIRST[1] not in cache
    enc = Counting(teacher)
    vectors, stats = cache.encode(FIRST, enc, show_progress=False)
    assert stats == CacheStats(reused=2, encoded=1, repaired=1) and enc.calls == [[FIRST[1]]]
    np.testing.assert_allclose(vectors, teacher.encode(FIRST, show_progress=False), atol=1e-5)
    reopened = TeacherCache(cache_dir, MODEL)
    assert len(reopened) == 3 and reopened.missing(FIRST) == []  # repaired in place, no row added
    np.testing.assert_array_equal(reopened.lookup(FIRST), vectors)


def test_swapped_keys_in_the_index_are_detected_and_repaired(cache_dir, teacher):
    index_path = cache_dir / "index.parquet"
    index = pd.read_parquet(index_path)
    index.loc[[0, 1], "sha256"] = index.loc[[1, 0], "sha256"].to_numpy()  # sentence 0 now points at row 1
    index.to_parquet(index_path, index=False)
    cache = TeacherCache(cache_dir, MODEL)
    assert cache.failing(FIRST) == FIRST[:2]
    vectors, stats = cache.encode(FIRST, Counting(teacher), show_progress=False)
    assert stats.repaired == 2 and stats.reused == 1
    np.testing.assert_allclose(vectors, teacher.encode(FIRST, show_progress=False), atol=1e-5)  # not swapped


def test_a_changed_row_without_nan_is_detected(cache_dir):
    _edit_rows(cache_dir, lambda emb: emb.__setitem__((2, 0), emb[2, 0] + 1e-3))
    assert TeacherCache(cache_dir, MODEL).failing(FIRST) == [FIRST[2]]


def test_a_cache_written_before_row_checks_is_re_encoded_once(cache_dir, teacher):
    index_path = cache_dir / "index.parquet"
    pd.read_parquet(index_path)[["sha256", "row"]].to_parquet(index_path, index=False)  # the older format
    cache = TeacherCache(cache_dir, MODEL)
    assert cache.failing(FIRST) == FIRST
    _, stats = cache.encode(FIRST, teacher, show_progress=False)
    assert stats == CacheStats(reused=0, encoded=3, repaired=3)
    assert pd.read_parquet(index_path)[ROW_CHECK].notna().all()
    _, stats = TeacherCache(cache_dir, MODEL).encode(FIRST, None)
    assert stats == CacheStats(reused=3, encoded=0)


def test_a_teacher_giving_nan_is_refused_and_nothing_is_cached(cache_dir, teacher):
    class NaNTeacher(Counting):
        def encode(self, sentences, batch_size=64, show_progress=True):
            return np.full((len(sentences), self.dim), np.nan, np.float32)

    before = {p.name: p.read_bytes() for p in cache_dir.iterdir() if p.is_file()}
    with pytest.raises(DataError, match="NaN or infinite vectors for 1 of 1 sentences"):
        TeacherCache(cache_dir, MODEL).encode(["A new sentence."], NaNTeacher(teacher), show_progress=False)
    assert {p.name: p.read_bytes() for p in cache_dir.iterdir() if p.is_file()} == before


def test_the_sharded_teacher_stage_path_replaces_failing_rows(cache_dir, teacher, tmp_path):
    _edit_rows(cache_dir, lambda emb: emb.__setitem__(0, np.inf))
    shards = tmp_path / "shards"
    done = [encode_shard(FIRST, cache_dir, shards, MODEL, spec, lambda: teacher, batch_size=4)
            for spec in all_shards(2)]
    assert sum(r.encoded for r in done) == 1
    report = merge_shards(cache_dir, shards, MODEL, 2, sentences=FIRST)
    assert report.added == 1
    cache = TeacherCache(cache_dir, MODEL)
    assert len(cache) == 3 and cache.failing(FIRST) == []
    np.testing.assert_allclose(cache.lookup(FIRST), teacher.encode(FIRST, show_progress=False), atol=1e-5)


def test_row_check_binds_key_and_vector():
    from mixsp_core.teacher.cache import row_check

    vector = np.arange(4, dtype=np.float32)
    expected = hashlib.sha256(b"ab\0" + vector.astype("<f4").tobytes()).hexdigest()
    assert row_check("ab", vector) == expected != row_check("ba", vector)
