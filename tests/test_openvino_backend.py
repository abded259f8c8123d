"""The OpenVINO backend of the fast path (issue 18): fp32 equal to torch, static int8 calibrated and cached,
the options it refuses, a damaged cache entry rebuilt, `mixsp encode --backend openvino`, the student."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mixsp_core.cli import main
from mixsp_core.models import openvino_backend
from mixsp_core.models.encoder import Encoder
from mixsp_core.models.inference import resolve_inference

# lengths 3..14 words: several exact-length batches and a padded tail on CPU, so both mask paths run
SENTENCES = [" ".join(f"w{i}x{j}" for j in range(3 + i % 12)) for i in range(90)]


@pytest.fixture()
def ov_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("MIXSP_CACHE_DIR", str(cache))
    return cache / "openvino"


def _entries(cache):
    return sorted(p.name for p in cache.iterdir()) if cache.is_dir() else []


def test_fp32_equals_torch_and_is_cached(tiny_bert_dir, ov_cache):
    reference = Encoder(tiny_bert_dir, device="cpu", show_progress=False).encode(SENTENCES)
    ov = Encoder(tiny_bert_dir, device="cpu", show_progress=False, backend="openvino")
    vectors = ov.encode(SENTENCES)
    assert np.abs(vectors - reference).max() < 1e-5
    assert isinstance(ov.inference_model(), openvino_backend.OpenVINOEncoder)
    assert len(_entries(ov_cache)) == 1 and (ov_cache / _entries(ov_cache)[0] / "model.xml").is_file()
    # a second encoder of the same weights reads the IR instead of converting
    again = Encoder(tiny_bert_dir, device="cpu", show_progress=False, backend="openvino")
    assert np.abs(again.encode(SENTENCES) - reference).max() < 1e-5
    assert len(_entries(ov_cache)) == 1


def test_int8_calibrates_on_given_sentences_once(tiny_bert_dir, ov_cache, monkeypatch):
    calls = []
    real = openvino_backend._quantize

    def spy(model, tokens):
        calls.append(len(tokens.lengths))
        return real(model, tokens)

    monkeypatch.setattr(openvino_backend, "_quantize", spy)
    reference = Encoder(tiny_bert_dir, device="cpu", show_progress=False).encode(SENTENCES)
    enc = Encoder(tiny_bert_dir, device="cpu", show_progress=False, backend="openvino", quantize="int8")
    enc.calibration = SENTENCES[:40]
    vectors = enc.encode(SENTENCES)
    assert calls == [40]  # the given calibration sentences, not the 90 encoded
    cos = (vectors * reference).sum(axis=1)
    assert vectors.shape == reference.shape and np.isfinite(vectors).all()
    assert cos.min() > 0.9 and np.abs(vectors - reference).max() > 1e-5  # quantised, and close
    enc.encode(SENTENCES[:10])
    second = Encoder(tiny_bert_dir, device="cpu", show_progress=False, backend="openvino", quantize="int8")
    second.calibration = SENTENCES[:40]
    assert np.abs(second.encode(SENTENCES) - vectors).max() < 1e-5
    assert calls == [40]  # the same calibration: read from the cache, not quantised again
    third = Encoder(tiny_bert_dir, device="cpu", show_progress=False, backend="openvino", quantize="int8")
    third.encode(SENTENCES[5:])  # no calibration given: the first sentences of the first encode
    assert calls == [40, 85]


def test_damaged_cache_entry_is_rebuilt(tiny_bert_dir, ov_cache):
    reference = Encoder(tiny_bert_dir, device="cpu", show_progress=False, backend="openvino").encode(SENTENCES)
    (entry,) = _entries(ov_cache)
    (ov_cache / entry / "model.xml").write_text("<net broken", encoding="utf-8")
    again = Encoder(tiny_bert_dir, device="cpu", show_progress=False, backend="openvino").encode(SENTENCES)
    assert np.abs(again - reference).max() < 1e-6
    assert (ov_cache / entry / "model.xml").read_text(encoding="utf-8").startswith("<?xml")


def test_refused_options(tiny_bert_dir):
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_inference("auto", None, "auto", torch.device("cpu"), "tensorrt")
    with pytest.raises(ValueError, match="runs on the CPU"):
        resolve_inference("auto", None, "auto", torch.device("cuda"), "openvino")
    with pytest.raises(ValueError, match="fp32 or bf16"):
        Encoder(tiny_bert_dir, device="cpu", backend="openvino", precision="fp16")
    enc = Encoder(tiny_bert_dir, device="cpu", show_progress=False, backend="openvino")
    with pytest.raises(ValueError, match="encode_layers runs on backend 'torch'"):
        enc.encode_layers(SENTENCES[:4], layers=[1])


def test_cli_encode_openvino_matches_torch(tiny_bert_dir, tmp_path, ov_cache, capsys):
    source = tmp_path / "s.txt"
    source.write_text("".join(s + "\n" for s in SENTENCES), encoding="utf-8")
    outs = {}
    for backend in ("torch", "openvino"):
        outs[backend] = tmp_path / f"{backend}.npy"
        assert main(["encode", "--model", str(tiny_bert_dir), "--input", str(source), "--output",
                     str(outs[backend]), "--device", "cpu", "--backend", backend]) == 0
    assert np.abs(np.load(outs["openvino"]) - np.load(outs["torch"])).max() < 1e-5
    assert main(["encode", "--model", str(tiny_bert_dir), "--input", str(source), "--output",
                 str(tmp_path / "x.npy"), "--device", "cpu", "--backend", "openvino", "--precision", "fp16"]) == 2
    assert "fp32 or bf16" in capsys.readouterr().err


def test_student_encoder_runs_on_openvino(tiny_bert_dir, ov_cache):
    from mixsp_core.models.student import BiStudent
    from mixsp_core.training.config import ModelConfig

    torch.manual_seed(0)
    config = ModelConfig(kind="bi", encoder=str(tiny_bert_dir), projector_mult=2, output_dim=16, max_length=32)
    student = BiStudent.from_config(config).eval()
    reference = student.encode(SENTENCES, show_progress=False)
    student.configure_inference(backend="openvino")
    assert np.abs(student.encode(SENTENCES, show_progress=False) - reference).max() < 1e-5
    student.configure_inference(backend="openvino", quantize="int8")
    vectors = student.encode(SENTENCES, show_progress=False)
    assert (vectors * reference).sum(axis=1).min() > 0.9
