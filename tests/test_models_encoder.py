"""Encoder and pooling: shapes, input order, normalisation, layers, gradients; MiniLM vs sentence-transformers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mixsp_core.models.encoder import Encoder
from mixsp_core.models.pooling import cls_pool, mean_pool

SENTENCES = [
    "A man is playing a guitar.",
    "Dogs run.",
    "The quick brown fox jumps over the lazy dog while the farmer watches from a distance.",
    "",
    "Two women are sitting on a bench in the park, talking about the weather and their plans.",
    "Hi",
    "A child rides a bike.",
]


@pytest.fixture(scope="module")
def tiny(tiny_bert_dir) -> Encoder:
    return Encoder(tiny_bert_dir, device="cpu")


def test_mean_pool_ignores_padding_and_is_differentiable():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0]])
    out = mean_pool(hidden, mask)
    assert torch.allclose(out, torch.tensor([[2.0, 3.0]]))
    out.sum().backward()
    assert torch.equal(hidden.grad[0, 2], torch.zeros(2))  # padded token gets no gradient
    assert torch.equal(cls_pool(hidden, mask), hidden[:, 0])
    with pytest.raises(ValueError, match="mask"):
        mean_pool(hidden, torch.ones(1, 2))


def test_shapes_attributes_and_normalisation(tiny, tiny_bert_dir):
    assert (tiny.dim, tiny.num_layers, tiny.device.type) == (32, 2, "cpu")
    emb = tiny.encode(SENTENCES, batch_size=3, show_progress=False)
    assert emb.shape == (len(SENTENCES), 32) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    raw = Encoder(tiny_bert_dir, normalize=False, device="cpu").encode(SENTENCES, show_progress=False)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0, atol=1e-3)
    np.testing.assert_allclose(raw / np.linalg.norm(raw, axis=1, keepdims=True), emb, atol=1e-5)


def test_rows_follow_input_order(tiny):
    batched = tiny.encode(SENTENCES, batch_size=2, show_progress=False)
    one_by_one = np.stack([tiny.encode([s], show_progress=False)[0] for s in SENTENCES])
    np.testing.assert_allclose(batched, one_by_one, atol=1e-5)
    reversed_ = tiny.encode(SENTENCES[::-1], batch_size=4, show_progress=False)
    np.testing.assert_allclose(reversed_[::-1], batched, atol=1e-5)
    assert not np.allclose(batched[0], batched[1])  # distinct sentences, distinct rows


def test_cls_pooling_is_the_first_token(tiny_bert_dir):
    enc = Encoder(tiny_bert_dir, pooling="cls", normalize=False, device="cpu")
    batch = enc.tokenize(SENTENCES[:2])
    with torch.no_grad():
        first = enc.model(**batch).last_hidden_state[:, 0]
    np.testing.assert_allclose(enc.encode(SENTENCES[:2], show_progress=False), first.numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="pooling"):
        Encoder(tiny_bert_dir, pooling="max")


def test_encode_layers(tiny):
    layers = tiny.encode_layers(SENTENCES, [0, 1, 2], batch_size=3, show_progress=False)
    assert sorted(layers) == [0, 1, 2]
    assert all(v.shape == (len(SENTENCES), 32) for v in layers.values())
    np.testing.assert_allclose(layers[2], tiny.encode(SENTENCES, show_progress=False), atol=1e-5)
    assert not np.allclose(layers[0], layers[2], atol=1e-3)
    np.testing.assert_allclose(np.linalg.norm(layers[0], axis=1), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="0..2"):
        tiny.encode_layers(SENTENCES, [3])


def test_forward_pooled_keeps_gradients(tiny_bert_dir):
    enc = Encoder(tiny_bert_dir, device="cpu")
    enc.model.train()
    out = enc.forward_pooled(enc.tokenize(SENTENCES[:3]))
    assert out.shape == (3, 32) and out.requires_grad
    out.sum().backward()
    grads = [p.grad for p in enc.model.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)


def test_max_length_truncates(tiny_bert_dir):
    enc = Encoder(tiny_bert_dir, device="cpu", max_length=8)
    assert enc.tokenize([SENTENCES[2]])["input_ids"].shape[1] == 8
    # The tiny model's position table has 128 slots: longer text is cut there, not crashed on.
    long_text = " ".join(["word"] * 400)
    tiny = Encoder(tiny_bert_dir, device="cpu")
    assert tiny.max_length == 128
    assert tiny.encode([long_text], show_progress=False).shape == (1, 32)


def test_progress_default_comes_from_the_instance(tiny_bert_dir, capsys):
    quiet = Encoder(tiny_bert_dir, device="cpu", show_progress=False)
    quiet.encode(SENTENCES)
    assert "encode" not in capsys.readouterr().err
    quiet.encode(SENTENCES, show_progress=True)
    assert "encode" in capsys.readouterr().err


def test_bad_input(tiny):
    assert tiny.encode([], show_progress=False).shape == (0, 32)
    with pytest.raises(TypeError, match="not one string"):
        tiny.encode("one sentence")
    with pytest.raises(TypeError, match="sentence 1"):
        tiny.encode(["ok", None])


@pytest.mark.slow
def test_minilm_matches_sentence_transformers(minilm_dir):
    from sentence_transformers import SentenceTransformer

    ours = Encoder(minilm_dir, device="cpu").encode(SENTENCES, batch_size=3, show_progress=False)
    reference = SentenceTransformer(str(minilm_dir), device="cpu").encode(SENTENCES, batch_size=3)
    assert ours.shape == (len(SENTENCES), 384)
    np.testing.assert_allclose(ours, reference, atol=1e-5)


def test_sdpa_where_supported_else_eager(tiny, tiny_bert_dir, tmp_path):
    from transformers import AutoTokenizer, MPNetConfig, MPNetModel

    assert tiny.attn_implementation == "sdpa"
    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    config = MPNetConfig(
        vocab_size=tok.vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    MPNetModel(config).save_pretrained(tmp_path, safe_serialization=True)  # MPNet has no SDPA kernel
    tok.save_pretrained(tmp_path)
    enc = Encoder(tmp_path, device="cpu")
    assert enc.attn_implementation == "eager"
    assert enc.encode(SENTENCES[:2], show_progress=False).shape == (2, 16)


def test_unreachable_hub_falls_back_to_packaged_copy(monkeypatch, minilm_dir):
    from transformers import AutoTokenizer

    import mixsp_core.models.encoder as encoder_module

    real = AutoTokenizer.from_pretrained

    def hub_down(source, **kwargs):
        if source == "sentence-transformers/all-MiniLM-L6-v2":
            raise OSError("We couldn't connect to 'https://huggingface.co'")
        return real(source, **kwargs)

    # As if online: the resolver hands back the Hub id, but the Hub cannot be reached.
    monkeypatch.setattr(encoder_module, "resolve_model", lambda name: "sentence-transformers/all-MiniLM-L6-v2")
    monkeypatch.setattr(encoder_module.AutoTokenizer, "from_pretrained", hub_down)
    enc = Encoder("all-MiniLM-L6-v2", device="cpu")
    assert enc.source == str(minilm_dir) and enc.dim == 384
