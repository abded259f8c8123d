"""`mixsp encode` streams: a file encoded chunk by chunk into an atomically written .npy equals the in-memory
encode; bad lines are refused naming the line; an interrupted encode leaves the previous output as it was."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from mixsp_core.cli import main
from mixsp_core.data.corpus import read_corpus
from mixsp_core.errors import CheckpointError, DataError
from mixsp_core.models import encode_loop
from mixsp_core.models.encoder import Encoder
from mixsp_core.models.streaming import SentenceFile, encode_file_streaming

WORDS = ("a man dog plays guitar the quick brown fox jumps over lazy river city night rain "
         "children bench park weather market fell sharply after announcement").split()


def _sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)  # 1 to 30 words: many token lengths, so partial batches carry across chunks
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 30))) + "." for _ in range(n)]


def _file(tmp_path: Path, sentences: list[str], name: str = "s.txt") -> Path:
    path = tmp_path / name
    path.write_text("".join(s + "\n" for s in sentences), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny(tiny_bert_dir) -> Encoder:
    return Encoder(tiny_bert_dir, device="cpu", show_progress=False)


@pytest.fixture(scope="module")
def student_dir(tiny_bert_dir, tmp_path_factory) -> Path:
    import torch

    from mixsp_core.models.checkpoint import save_checkpoint
    from mixsp_core.models.student import BiStudent
    from mixsp_core.training.config import ModelConfig

    torch.manual_seed(0)
    config = ModelConfig(kind="bi", encoder=str(tiny_bert_dir), projector_mult=2, output_dim=16, max_length=32)
    return save_checkpoint(BiStudent.from_config(config), tmp_path_factory.mktemp("student") / "student")


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# --- the same vectors as the in-memory encode -------------------------------------------------------


def test_streamed_output_is_bitwise_the_in_memory_encode(tiny, tmp_path, monkeypatch):
    sentences = _sentences(437)
    monkeypatch.setattr(tiny, "chunk_size", 50)  # 50-sentence chunks: 437 is no multiple; partial batches carry
    plans: list[int] = []
    real = encode_loop._run_plan
    monkeypatch.setattr(encode_loop, "_run_plan", lambda plan, *a: plans.append(len(plan.rows)) or real(plan, *a))
    expected = tiny.encode(sentences, batch_size=8)
    assert len(plans) == 9 and sum(plans) == 437  # the in-memory path runs in chunks too
    plans.clear()
    out = tmp_path / "v.npy"
    assert encode_file_streaming(tiny, _file(tmp_path, sentences), out, batch_size=8, show_progress=False) == (437, 32)
    assert len(plans) == 9 and max(plans) < 437  # one chunk at a time, never the whole file
    streamed = np.load(out)
    assert streamed.dtype == np.float32 and np.array_equal(streamed, expected)  # the very same batches
    # other chunk sizes give other batches at the chunk ends: the same vectors up to float rounding
    encode_file_streaming(tiny, tmp_path / "s.txt", out, batch_size=8, chunk_sentences=37, show_progress=False)
    np.testing.assert_allclose(np.load(out), expected, atol=1e-6, rtol=0)
    assert _leftovers(tmp_path) == []


def test_cli_streams_any_embedder_within_float_rounding(student_dir, tmp_path, capsys):
    from mixsp_core.models.checkpoint import load_embedder

    sentences = _sentences(300, seed=1)
    source = _file(tmp_path, sentences)
    student = load_embedder(student_dir, device="cpu", precision="fp32")
    expected = student.encode(sentences, batch_size=16, show_progress=False)

    def encode(*options: str) -> np.ndarray:
        out = tmp_path / "v.npy"
        assert main(["encode", "--model", str(student_dir), "--input", str(source), "--output", str(out),
                     "--device", "cpu", "--batch-size", "16", *options]) == 0
        return np.load(out)

    np.testing.assert_allclose(encode("--precision", "fp32"), expected, atol=1e-6, rtol=0)
    assert "v.npy: 300 x 16 float32" in capsys.readouterr().out
    int8 = encode("--quantize", "int8")  # the int8-weight copy streams too
    assert int8.shape == (300, 16) and (int8 * expected).sum(1).min() > 0.9
    prefix = encode("--dims", "8", "--precision", "fp32")  # a wrapped model: encoded chunk by chunk
    np.testing.assert_allclose(prefix, expected[:, :8] / np.linalg.norm(expected[:, :8], axis=1, keepdims=True),
                               atol=1e-5)
    assert _leftovers(tmp_path) == []


def test_an_embedder_without_a_stream_is_called_one_chunk_at_a_time(tmp_path):
    calls: list[int] = []

    class Rows:  # the vector of line i is (i, i): rows must land in order, whatever the chunks
        next_row = 0

        def encode(self, sentences, batch_size=64):
            calls.append(len(sentences))
            rows = np.arange(self.next_row, self.next_row + len(sentences), dtype=np.float32)
            self.next_row += len(sentences)
            return np.stack([rows, rows], axis=1)

    out = tmp_path / "v.npy"
    assert encode_file_streaming(Rows(), _file(tmp_path, _sentences(437)), out, chunk_sentences=100) == (437, 2)
    assert calls == [100, 100, 100, 100, 37]
    assert np.array_equal(np.load(out)[:, 0], np.arange(437, dtype=np.float32))


def test_an_empty_file_gives_an_empty_matrix_of_the_model_width(tiny, tmp_path, capsys, tiny_bert_dir):
    (tmp_path / "s.txt").write_bytes(b"")
    assert main(["encode", "--model", str(tiny_bert_dir), "--input", str(tmp_path / "s.txt"),
                 "--output", str(tmp_path / "v.npy"), "--device", "cpu"]) == 0
    assert np.load(tmp_path / "v.npy").shape == (0, 32)


# --- input lines ------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["", "   ", "\t"])
def test_an_empty_line_is_refused_naming_file_and_line_before_the_model_loads(tmp_path, capsys, bad):
    source = _file(tmp_path, _sentences(4) + [bad] + _sentences(3))
    out = tmp_path / "v.npy"
    out.write_bytes(b"previous")
    # the model does not exist: the input is refused before anything tries to load it
    assert main(["encode", "--model", str(tmp_path / "no-model"), "--input", str(source), "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"mixsp encode: error: {source}:5: empty line; expected one sentence per line", err
    assert out.read_bytes() == b"previous" and _leftovers(tmp_path) == []


def test_lines_are_read_as_read_corpus_reads_them(tmp_path):
    path = tmp_path / "s.txt"
    path.write_bytes("\ufefffirst\r\nsecond\u2028still second\n third \nlast, no newline".encode("utf-8"))
    source = SentenceFile(path)
    assert list(source.lines()) == read_corpus(path, allow_empty_lines=False)
    assert len(source) == 4 and [len(c) for c in source.chunks([3, 3])] == [3, 1]
    path.write_bytes(b"good\nstill good\nbad \xe2\x82 bytes\n")
    with pytest.raises(DataError) as streamed:
        SentenceFile(path)
    with pytest.raises(DataError) as whole:
        read_corpus(path, allow_empty_lines=False)
    assert str(streamed.value) == str(whole.value) and streamed.value.line == 3
    with pytest.raises(DataError, match="file not found"):
        SentenceFile(tmp_path / "missing.txt")


@pytest.mark.parametrize("lines", [12, 8])
def test_a_file_that_changes_while_encoded_is_refused(tmp_path, lines):
    path = _file(tmp_path, _sentences(10))
    source = SentenceFile(path)
    path.write_text("".join(s + "\n" for s in _sentences(lines)), encoding="utf-8")
    handed: list[int] = []
    with pytest.raises(DataError, match=f"changed while it was encoded: 10 lines when counted, {lines} when read"):
        for chunk in source.chunks(iter(lambda: 4, 0)):
            handed.append(len(chunk))
    assert sum(handed) <= 10  # never a row past the count: the output has 10 rows


def test_a_grown_file_writes_nothing_even_through_an_embedder_without_a_stream(tmp_path):
    class Ones:
        def encode(self, sentences, batch_size=64):
            return np.ones((len(sentences), 2), np.float32)

    path = _file(tmp_path, _sentences(10))
    source = SentenceFile(path)
    path.write_text("".join(s + "\n" for s in _sentences(12)), encoding="utf-8")
    out = tmp_path / "v.npy"
    with pytest.raises(DataError, match="10 lines when counted, 12 when read"):
        encode_file_streaming(Ones(), source, out, chunk_sentences=5, show_progress=False)
    assert not out.exists() and _leftovers(tmp_path) == []


def test_memory_is_one_chunk_not_the_file(tmp_path):
    import tracemalloc

    class Rows:  # 64-d vectors: the whole matrix would be 12.8 MB, one 1,000-row chunk 0.26 MB
        def encode(self, sentences, batch_size=64):
            return np.full((len(sentences), 64), 0.5, np.float32)

    n = 50_000
    path = tmp_path / "s.txt"
    path.write_text("".join(f"sentence number {i} of the file.\n" for i in range(n)), encoding="utf-8")
    tracemalloc.start()  # numpy's buffers are traced too; the output's memory map is not (it is the disk's)
    try:
        source = SentenceFile(path)  # the first pass: 50,000 lines (about 4 MB as str) counted, none kept
        counted_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        shape = encode_file_streaming(Rows(), source, tmp_path / "v.npy", chunk_sentences=1000, show_progress=False)
        encode_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert shape == (n, 64)
    assert counted_peak < 200_000, counted_peak
    assert encode_peak < 2_000_000, encode_peak  # a chunk's lines and vectors, the n-byte finite flags
    assert np.array_equal(np.load(tmp_path / "v.npy", mmap_mode="r")[[0, n - 1]], np.full((2, 64), 0.5, np.float32))


# --- interrupted writes ------------------------------------------------------------------------------


def test_npy_rows_land_where_their_indices_say_in_any_order(tmp_path, monkeypatch):
    from mixsp_core import io

    monkeypatch.setattr(io, "NPY_WRITE_ROWS", 3)  # several steps per write, runs cut at the step ends too
    expected = np.arange(40 * 5, dtype=np.float32).reshape(40, 5)
    order = np.random.default_rng(0).permutation(30)
    out = tmp_path / "m.npy"
    with io.writing_npy_rows(out, (40, 5)) as write:
        write(order, expected[order])  # a chunk's rows come in plan order
        write(slice(30, 40), expected[30:40])
        with pytest.raises(ValueError, match="2 rows of width 5 expected"):
            write([0, 1], expected[:3])
        with pytest.raises(IndexError, match="outside the matrix"):
            write([40], expected[:1])
    assert np.array_equal(np.load(out), expected) and _leftovers(tmp_path) == []




@pytest.mark.parametrize("error", [RuntimeError("forward failed"), KeyboardInterrupt()])
def test_an_interrupted_encode_keeps_the_previous_output_and_leaves_nothing(tiny, tmp_path, monkeypatch, error):
    out = tmp_path / "v.npy"
    np.save(out, np.ones((2, 2), np.float32))
    before = out.read_bytes()
    monkeypatch.setattr(tiny, "chunk_size", 50)
    real, seen = encode_loop._run_plan, []

    def third_chunk_fails(plan, *args):
        seen.append(_leftovers(tmp_path))
        if len(seen) == 3:
            raise error
        return real(plan, *args)

    monkeypatch.setattr(encode_loop, "_run_plan", third_chunk_fails)
    with pytest.raises(type(error)):
        encode_file_streaming(tiny, _file(tmp_path, _sentences(437)), out, show_progress=False)
    assert len(seen) == 3 and len(seen[2]) == 1 and seen[2][0].startswith(".v.npy.")  # rows were going to disk
    assert out.read_bytes() == before and _leftovers(tmp_path) == []


def test_an_embedder_without_a_stream_failing_on_the_second_chunk_writes_nothing(tmp_path):
    class FailsSecond:
        calls = 0

        def encode(self, sentences, batch_size=64):
            self.calls += 1
            if self.calls == 2:
                raise RuntimeError("model failed on chunk 2")
            return np.ones((len(sentences), 4), np.float32)

    out = tmp_path / "v.npy"
    np.save(out, np.zeros((3, 3), np.float32))
    before = out.read_bytes()
    with pytest.raises(RuntimeError, match="chunk 2"):
        encode_file_streaming(FailsSecond(), _file(tmp_path, _sentences(250)), out, chunk_sentences=100,
                              show_progress=False)
    assert out.read_bytes() == before and _leftovers(tmp_path) == []


def test_a_nan_vector_in_a_later_chunk_writes_nothing_and_names_its_row(tmp_path):
    class NaNAt250:
        start = 0

        def encode(self, sentences, batch_size=64):
            out = np.ones((len(sentences), 4), np.float32)
            if self.start <= 250 < self.start + len(sentences):
                out[250 - self.start] = np.nan
            self.start += len(sentences)
            return out

    out = tmp_path / "v.npy"
    out.write_bytes(b"previous")
    with pytest.raises(CheckpointError, match=r"model x: produced NaN or infinite vectors for 1 of 437 inputs "
                                              r"\(first: row 250\); nothing was written"):
        encode_file_streaming(NaNAt250(), _file(tmp_path, _sentences(437)), out, chunk_sentences=100, where="model x")
    assert out.read_bytes() == b"previous" and _leftovers(tmp_path) == []
