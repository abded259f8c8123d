"""Every model directory the pipeline writes is a sentence-transformers folder, its encoder an HF model, and
`mixsp export` gives an ONNX graph: each loader gives `mixsp encode`'s (load_embedder's) embeddings."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from mixsp_core.compress import TransformChain, make_step, write_compressed_model
from mixsp_core.errors import CheckpointError
from mixsp_core.models.checkpoint import load_embedder
from mixsp_core.paths import RunDir
from mixsp_core.tracking.tracker import NullTracker
from mixsp_core.training.loop import run_training
from tests.train_helpers import one_thread, small_pairs, tiny_config

_one_thread = pytest.fixture(scope="module", autouse=True)(one_thread)

SENTENCES = ["A man is playing a guitar.", "A woman slices an onion.", "Two dogs run in the snow.", "Hi.",
             "A long sentence " + "with many words " * 12 + "that the tokenizer truncates."]


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def mixsp_encode(model_dir, **kwargs) -> np.ndarray:
    return load_embedder(model_dir, device="cpu", **kwargs).encode(SENTENCES, batch_size=2, show_progress=False)


def st_model(model_dir, **kwargs):
    from mixsp_core.models.st_modules import load_sentence_transformer

    return load_sentence_transformer(model_dir, device="cpu", **kwargs)


@pytest.fixture(scope="module")
def pairs(senteval_dir):
    return small_pairs(senteval_dir)


@pytest.fixture(scope="module")
def run(tiny_bert_dir, pairs, tmp_path_factory) -> RunDir:
    """A tiny student trained for a few steps (best/, last/ with optimizer state, start/, snapshots)."""
    config = tiny_config(tiny_bert_dir, train={"max_steps": 4, "eval_every": 2, "snapshot_every": 2})
    out = tmp_path_factory.mktemp("interop") / "run"
    result = run_training(config, pairs, out_dir=out, tracker=NullTracker(), show_progress=False)
    return RunDir(result.output_dir)


@pytest.fixture(scope="module")
def variants(run, pairs, tmp_path_factory) -> dict:
    """pca8, int8 and binary variants of best/, fitted on the pairs' sentences (as the compress stage does)."""
    fit = list(dict.fromkeys(pairs["sentence1"].tolist() + pairs["sentence2"].tolist()))[:64]
    vectors = load_embedder(run.best, device="cpu").encode(fit, show_progress=False)
    root = tmp_path_factory.mktemp("variants")
    out = {}
    for spec in ("pca:8", "int8", "binary"):
        chain = TransformChain([make_step(s) for s in spec.split("+")]).fit(vectors)
        out[spec] = write_compressed_model(run.best, chain, root / spec.replace(":", ""))
    return out


def test_plain_sentence_transformer_asks_for_trust_remote_code(run):
    """sentence-transformers >= 6 imports a module class outside its own package only with the flag (the
    folder carries no code: the class comes from the installed mixsp_core)."""
    from sentence_transformers import SentenceTransformer

    with pytest.raises(ValueError, match="trust_remote_code"):
        SentenceTransformer(str(run.best), device="cpu")
    model = SentenceTransformer(str(run.best), device="cpu", trust_remote_code=True)
    assert [type(m).__name__ for m in model] == ["Transformer", "Pooling", "MixSPHead", "Normalize"]


@pytest.mark.parametrize("which", ["best", "last", "start", "snapshot"])
def test_run_checkpoints_encode_in_sentence_transformers_as_in_mixsp(run, which):
    model_dir = {"best": run.best, "last": run.last, "start": run.start,
                 "snapshot": run.snapshot_dirs()[-1][1]}[which]
    expected = mixsp_encode(model_dir)
    got = st_model(model_dir).encode(SENTENCES, batch_size=3)
    assert got.shape == expected.shape == (len(SENTENCES), 16)
    assert cosines(got, expected).min() >= 1 - 1e-5
    assert np.abs(got - expected).max() < 1e-5


def test_encoder_folder_is_a_transformers_model(run):
    import torch
    from transformers import AutoModel, AutoTokenizer

    student = load_embedder(run.best, device="cpu")
    hf = AutoModel.from_pretrained(run.best / "encoder").eval()
    batch = AutoTokenizer.from_pretrained(run.best / "encoder")(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(hf(**batch).last_hidden_state, student.encoder(**batch).last_hidden_state)


def test_merged_and_champion_dirs_load_in_sentence_transformers(run, tmp_path):
    from mixsp_core.merging import merge_checkpoints
    from mixsp_core.tracking.registry import copy_champion

    merged = merge_checkpoints([run.best, run.last], tmp_path / "merged", "uniform").path
    champion = copy_champion(merged, tmp_path / "champion", {"version": "1"})
    for model_dir in (merged, champion):
        assert cosines(st_model(model_dir).encode(SENTENCES), mixsp_encode(model_dir)).min() >= 1 - 1e-5
    # the soup really is new weights, not a copy of either input
    assert not np.allclose(mixsp_encode(merged), mixsp_encode(run.best), atol=1e-6)


def test_truncate_dim_keeps_the_prefix_mixsp_dims_gives(run):
    full = st_model(run.best).encode(SENTENCES)
    short = st_model(run.best, truncate_dim=8).encode(SENTENCES)
    assert short.shape == (len(SENTENCES), 8) and np.allclose(short, full[:, :8], atol=1e-6)
    assert cosines(short, mixsp_encode(run.best, dims=8)).min() >= 1 - 1e-5


def test_pca_variant_is_a_dense_module(variants):
    model = st_model(variants["pca:8"])
    assert [type(m).__name__ for m in model][-3:] == ["Normalize", "Dense", "Normalize"]
    got, expected = model.encode(SENTENCES), mixsp_encode(variants["pca:8"])
    assert got.shape == expected.shape == (len(SENTENCES), 8)
    assert cosines(got, expected).min() >= 1 - 1e-5


def test_int8_variant_codes_through_quantize_embeddings(run, variants):
    from sentence_transformers import quantize_embeddings

    folder = variants["int8"]
    model = st_model(folder)
    floats = model.encode(SENTENCES)
    assert np.abs(floats - mixsp_encode(run.best)).max() < 1e-5  # the vectors the quantiser was fitted on
    record = json.loads((folder / "quantization.json").read_text())
    assert record["precision"] == "int8" and 'precision="int8"' in (folder / "README.md").read_text()
    codes = quantize_embeddings(floats, precision="int8", ranges=np.array(record["ranges"], dtype=np.float32))
    ours = load_embedder(folder, device="cpu").encode_stored(SENTENCES, show_progress=False)
    assert codes.dtype == ours.dtype == np.int8
    # sentence-transformers floors, mixsp rounds to nearest: at most one step apart
    assert np.abs(codes.astype(int) - ours.astype(int)).max() <= 1


def test_binary_variant_bits_are_sentence_transformers_ubinary(variants):
    bits = st_model(variants["binary"]).encode(SENTENCES, precision="ubinary")
    ours = load_embedder(variants["binary"], device="cpu").encode_stored(SENTENCES, show_progress=False)
    np.testing.assert_array_equal(bits, ours)


def test_loader_refuses_a_folder_with_code(run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(run.best, copy)
    (copy / "2_MixSPHead" / "head.py").write_text("raise SystemExit\n")
    with pytest.raises(CheckpointError, match="head.py"):
        st_model(copy)


def test_onnx_export_runs_in_onnxruntime_as_mixsp_encode(run, tmp_path, capsys):
    from mixsp_core.cli import main
    from mixsp_core.models.onnx_export import OnnxEmbedder

    out = tmp_path / "onnx"
    assert main(["export", "--model", str(run.best), "--format", "onnx", "--out", str(out), "--int8"]) == 0
    assert (out / "tokenizer.json").is_file() and json.loads((out / "mixsp_onnx.json").read_text())["dim"] == 16
    expected = mixsp_encode(run.best)
    got = OnnxEmbedder(out).encode(SENTENCES, batch_size=3)
    assert np.abs(got - expected).max() < 1e-4
    # int8 weights: close, not equal
    assert cosines(OnnxEmbedder(out, int8=True).encode(SENTENCES), expected).min() > 0.95


def test_onnx_export_of_a_pca_variant(variants, tmp_path):
    from mixsp_core.models.onnx_export import OnnxEmbedder, export_onnx

    out = export_onnx(variants["pca:8"], tmp_path / "onnx")
    got = OnnxEmbedder(out).encode(SENTENCES, batch_size=2)
    assert got.shape == (len(SENTENCES), 8) and np.abs(got - mixsp_encode(variants["pca:8"])).max() < 1e-4
    with pytest.raises(CheckpointError, match="int8"):
        OnnxEmbedder(out, int8=True)
