"""The fast encoding path: batch plans, bulk tokenisation, and outputs equal to the plain path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mixsp_core.models.encoder import Encoder
from mixsp_core.models.fast import (
    BulkTokenizer,
    TokenizedChunk,
    encode_planned,
    gather_tokens,
    plan_chunk,
    stream_plans,
)

SENTENCES = [
    "A man is playing a guitar.",
    "Dogs run.",
    "The quick brown fox jumps over the lazy dog while the farmer watches from a distance.",
    "",
    "Two women are sitting on a bench in the park, talking about the weather and their plans.",
    "Hi",
    "A child rides a bike.",
    "A cat sleeps.",
    "Dogs run fast.",
    "A woman is slicing an onion on a wooden board.",
    "Hi there",
    "The stock market fell sharply on Monday after the announcement.",
] * 3 + ["unique tail sentence number %d with some words" % i for i in range(9)]


def reference_encode(enc: Encoder, sentences: list[str], batch_size: int = 5) -> np.ndarray:
    """The straightforward loop: input order, padded batches, masked mean pooling, fp32."""
    rows = []
    with torch.no_grad():
        for start in range(0, len(sentences), batch_size):
            batch = enc.tokenizer(sentences[start:start + batch_size], padding=True, truncation=True,
                                  max_length=enc.max_length, return_tensors="pt")
            hidden = enc.model(**batch).last_hidden_state
            if enc.pooling == "cls":
                pooled = hidden[:, 0]
            else:
                mask = batch["attention_mask"].unsqueeze(-1).float()
                pooled = (hidden * mask).sum(1) / mask.sum(1)
            rows.append(F.normalize(pooled, dim=-1) if enc.normalize else pooled)
    return torch.cat(rows).numpy()


@pytest.fixture(scope="module")
def tiny(tiny_bert_dir) -> Encoder:
    return Encoder(tiny_bert_dir, device="cpu", show_progress=False)


def _tokens(lengths: list[int]) -> TokenizedChunk:
    lengths_arr = np.array(lengths, dtype=np.int64)
    # ids encode (sentence, position) so any mix-up shows
    ids = np.concatenate([np.arange(n) + 1000 * i for i, n in enumerate(lengths)]).astype(np.int64)
    return TokenizedChunk(ids, lengths_arr)


# --------------------------------------------------------------------------- plans


def test_plan_covers_every_row_once_without_padding():
    lengths = [5, 3, 5, 7, 3, 3, 5, 2, 7, 3]
    tokens = _tokens(lengths)
    rows = np.arange(len(lengths)) + 100
    plan, left = plan_chunk(rows, tokens, batch_size=2, token_budget=None, final=True)
    assert len(left) == 0 and sorted(plan.rows.tolist()) == rows.tolist()
    assert all(not b.padded and b.size <= 2 for b in plan.batches)
    for b in plan.batches:
        block = plan.ids[b.token_start:b.token_start + b.size * b.length].reshape(b.size, b.length)
        for r, ids in zip(plan.rows[b.row_start:b.row_start + b.size], block):
            i = r - 100
            assert lengths[i] == b.length and ids.tolist() == (np.arange(b.length) + 1000 * i).tolist()
    assert [b.length for b in plan.batches] == sorted((b.length for b in plan.batches), reverse=True)


def test_plan_carries_partial_groups_until_the_final_chunk():
    tokens = _tokens([4, 4, 4, 6, 6, 9])
    plan, left = plan_chunk(np.arange(6), tokens, batch_size=2, token_budget=None, final=False)
    assert sorted(plan.rows.tolist()) == [0, 1, 3, 4]  # full batches only
    assert sorted(left.tolist()) == [2, 5]


def test_token_budget_and_merged_tail():
    lengths = [10] * 7 + [9, 8, 8, 3]
    tokens = _tokens(lengths)
    plan, _ = plan_chunk(np.arange(len(lengths)), tokens, batch_size=1, token_budget=30, final=True,
                         merge_tail=True, pad_id=-1)
    assert all(b.size * b.length <= 30 for b in plan.batches)
    assert sorted(plan.rows.tolist()) == list(range(len(lengths)))
    padded = [b for b in plan.batches if b.padded]
    assert padded  # the rare lengths were merged into padded batches
    b = padded[0]
    block = plan.ids[b.token_start:b.token_start + b.size * b.length].reshape(b.size, b.length)
    for r, ids in zip(plan.rows[b.row_start:b.row_start + b.size], block):
        n = lengths[r]
        assert (ids[:n] == np.arange(n) + 1000 * r).all() and (ids[n:] == -1).all()
        assert plan.lengths[b.row_start + list(plan.rows[b.row_start:b.row_start + b.size]).index(r)] == n


def test_stream_plans_chunks_cover_everything():
    rng = np.random.default_rng(0)
    lengths = rng.integers(2, 12, size=500).tolist()
    sentences = [str(i) for i in range(len(lengths))]

    def tokenize(chunk):
        return _tokens([lengths[int(s)] for s in chunk]) if chunk else _tokens([])

    seen = []
    for plan in stream_plans(sentences, tokenize, batch_size=8, chunk_size=64):
        seen.extend(plan.rows.tolist())
        for b in plan.batches:
            assert not b.padded and b.size <= 8
            assert (plan.lengths[b.row_start:b.row_start + b.size] == b.length).all()
    assert sorted(seen) == list(range(len(lengths)))
    with pytest.raises(ValueError, match="batch_size"):
        list(stream_plans(sentences, tokenize, batch_size=0))


def test_gather_tokens_reorders():
    tokens = _tokens([2, 3, 1])
    assert gather_tokens(tokens, np.array([2, 0])).tolist() == [2000, 0, 1]


def test_zero_token_sentences_get_zero_vectors():
    def tokenize(chunk):
        return TokenizedChunk(np.zeros(0, dtype=np.int64), np.zeros(len(chunk), dtype=np.int64))

    def forward(ids, mask):  # never called for zero-length batches
        raise AssertionError("forward called on an empty batch")

    out = encode_planned(["", ""], tokenize, forward, {-1: 4}, torch.device("cpu"), 8, show_progress=False)
    assert out[-1].shape == (2, 4) and not out[-1].any()


# --------------------------------------------------------------------------- tokenisation


def test_bulk_tokenizer_matches_the_tokenizer_call(tiny):
    texts = SENTENCES + [" ".join(["word"] * 300)]
    expected = tiny.tokenizer(texts, truncation=True, max_length=20)["input_ids"]
    for threads in (1, 3):
        bulk = BulkTokenizer(tiny.tokenizer, max_length=20, threads=threads)
        got = bulk(texts * 100)  # several pieces for the thread pool
        assert got.lengths.tolist() == [len(x) for x in expected] * 100
        assert got.ids.tolist() == [t for x in expected for t in x] * 100
    # the wrapper's own truncation setting is left alone
    assert len(tiny.tokenizer(texts[-1])["input_ids"]) > 20


# --------------------------------------------------------------------------- encoder outputs


def test_fast_path_matches_reference_loop(tiny):
    expected = reference_encode(tiny, SENTENCES)
    np.testing.assert_allclose(tiny.encode(SENTENCES, batch_size=4), expected, atol=1e-5)
    np.testing.assert_allclose(tiny.encode(SENTENCES, batch_size=1), expected, atol=1e-5)
    budget = Encoder(tiny.source, device="cpu", show_progress=False, token_budget=40)
    np.testing.assert_allclose(budget.encode(SENTENCES), expected, atol=1e-5)
    budget.merge_tail, budget.chunk_size = True, 7  # padded tail batches, several chunks
    np.testing.assert_allclose(budget.encode(SENTENCES), expected, atol=1e-5)
    threads = torch.get_num_threads()
    for workers in (1, 3):  # batches side by side on threads give the same rows
        budget.cpu_workers = workers
        np.testing.assert_allclose(budget.encode(SENTENCES, batch_size=2), expected, atol=1e-5)
    assert torch.get_num_threads() == threads  # restored after the threaded run
    plain = Encoder(tiny.source, device="cpu", show_progress=False, fast=False)
    np.testing.assert_allclose(plain.encode(SENTENCES, batch_size=4), expected, atol=1e-5)


def test_fast_path_cls_unnormalised_and_layers(tiny_bert_dir):
    enc = Encoder(tiny_bert_dir, device="cpu", show_progress=False, pooling="cls", normalize=False)
    np.testing.assert_allclose(enc.encode(SENTENCES, batch_size=3), reference_encode(enc, SENTENCES), atol=1e-5)
    enc = Encoder(tiny_bert_dir, device="cpu", show_progress=False)
    plain = Encoder(tiny_bert_dir, device="cpu", show_progress=False, fast=False)
    fast_layers = enc.encode_layers(SENTENCES, [0, 2], batch_size=4)
    plain_layers = plain.encode_layers(SENTENCES, [0, 2], batch_size=4)
    for k in (0, 2):
        np.testing.assert_allclose(fast_layers[k], plain_layers[k], atol=1e-5)


def test_int8_and_bf16_copies(tiny_bert_dir):
    fp32 = Encoder(tiny_bert_dir, device="cpu", show_progress=False)
    ref = fp32.encode(SENTENCES)
    int8 = Encoder(tiny_bert_dir, device="cpu", show_progress=False, quantize="int8")
    q = int8.encode(SENTENCES)
    cos = (q * ref).sum(1)
    assert cos.min() > 0.95 and not np.allclose(q, ref, atol=1e-6)  # close, but really quantised
    dynamic_linear = torch.ao.nn.quantized.dynamic.Linear
    assert any(isinstance(m, dynamic_linear) for m in int8.inference_model().modules())
    assert not any(isinstance(m, dynamic_linear) for m in int8.model.modules())  # original kept
    bf16 = Encoder(tiny_bert_dir, device="cpu", show_progress=False, precision="bf16")
    out = bf16.encode(SENTENCES)
    assert out.dtype == np.float32 and np.abs(out - ref).max() < 0.05
    assert next(bf16.inference_model().parameters()).dtype == torch.bfloat16
    assert next(bf16.model.parameters()).dtype == torch.float32
    with torch.no_grad():  # weights changed in place: the cast copy must follow
        bf16.model.embeddings.word_embeddings.weight.mul_(2.0)
    assert not np.allclose(bf16.encode(SENTENCES), out, atol=1e-3)


def test_bad_settings(tiny_bert_dir):
    with pytest.raises(ValueError, match="quantize"):
        Encoder(tiny_bert_dir, device="cpu", quantize="int4")
    with pytest.raises(ValueError, match="int8"):
        Encoder(tiny_bert_dir, device="cpu", quantize="int8", precision="bf16")
    with pytest.raises(ValueError, match="precision"):
        Encoder(tiny_bert_dir, device="cpu", precision="fp8")
    with pytest.raises(ValueError, match="token_budget"):
        Encoder(tiny_bert_dir, device="cpu", token_budget=0)


@pytest.mark.slow
def test_fast_minilm_matches_sentence_transformers(minilm_dir):
    from sentence_transformers import SentenceTransformer

    ours = Encoder(minilm_dir, device="cpu", show_progress=False).encode(SENTENCES, batch_size=4)
    reference = SentenceTransformer(str(minilm_dir), device="cpu").encode(SENTENCES, batch_size=4)
    np.testing.assert_allclose(ours, reference, atol=1e-5)
