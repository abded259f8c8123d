"""The fast encoding path: batch plans, bulk tokenisation, and outputs equal to the plain path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mixsp_core.models.batching import (BulkTokenizer, TokenizedChunk, gather_tokens, plan_chunk, plan_chunks,
                                        split_chunks, stream_plans)
from mixsp_core.models.encode_loop import encode_planned, encode_with
from mixsp_core.models.encoder import Encoder

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


def test_merge_tail_plans_every_chunk_whole_and_read_ahead_changes_nothing():
    """CUDA's planning: nothing is carried, so chunk k's plan holds exactly chunk k's sentences (the GPU
    runs it while the next chunk is tokenised); tokenising two chunks ahead gives the same plans."""
    rng = np.random.default_rng(1)
    lengths = rng.integers(2, 40, size=700).tolist()
    sentences = [str(i) for i in range(len(lengths))]

    def tokenize(chunk):
        return _tokens([lengths[int(s)] for s in chunk])

    def plans(read_ahead, merge_tail):
        return list(plan_chunks(split_chunks(sentences, 128), tokenize, 16, token_budget=200,
                                merge_tail=merge_tail, read_ahead=read_ahead))

    whole = plans(2, True)
    starts = np.cumsum([0, *[len(c) for c in split_chunks(sentences, 128)]])
    assert [sorted(p.rows.tolist()) for p in whole] == [list(range(a, b)) for a, b in zip(starts[:-1], starts[1:])]
    assert any(b.padded for p in whole for b in p.batches)  # partial groups pooled, not carried
    for merge_tail in (True, False):
        one, two = plans(1, merge_tail), plans(2, merge_tail)
        assert [p.rows.tolist() for p in one] == [p.rows.tolist() for p in two]
        assert all((a.ids == b.ids).all() and a.batches == b.batches for a, b in zip(one, two))
    carried = plans(1, False)
    assert len(carried[0].rows) < 128  # CPU: partial groups wait for the next chunk
    with pytest.raises(ValueError, match="read_ahead"):
        list(plan_chunks([sentences], tokenize, 16, read_ahead=0))


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


def test_encode_with_any_model(tiny):
    def forward(ids, mask):  # a model that insists on a mask, as the trained student does
        mask = torch.ones_like(ids) if mask is None else mask.long()
        hidden = tiny.model(input_ids=ids, attention_mask=mask).last_hidden_state
        return {-1: F.normalize((hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True), dim=-1)}

    out = encode_with(SENTENCES, tiny.tokenizer, tiny.max_length, forward, tiny.dim, torch.device("cpu"),
                      batch_size=4, show_progress=False)
    np.testing.assert_allclose(out, reference_encode(tiny, SENTENCES), atol=1e-5)


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


# --------------------------------------------------------------------------- the trained student


def _student(tiny_bert_dir, **model):
    from mixsp_core.models.student import BiStudent
    from mixsp_core.training.config import ModelConfig

    torch.manual_seed(0)
    config = ModelConfig(**{"kind": "bi", "encoder": str(tiny_bert_dir), "projector_mult": 2, "output_dim": 16,
                            "max_length": 32, **model})
    return BiStudent.from_config(config).eval()


def _plain(student, sentences, **kwargs) -> np.ndarray:
    """The student's reference loop (``fast=False``), its fast path switched back on after."""
    student.configure_inference(fast=False)
    try:
        return student.encode(sentences, show_progress=False, **kwargs)
    finally:
        student.configure_inference()


@pytest.mark.parametrize("model", [{}, {"routing": "soft", "pooling": "cls", "output_dim": 0},
                                   {"num_projectors": 1, "output_activation": "none"}])
def test_student_fast_path_matches_plain_loop(tiny_bert_dir, model):
    student = _student(tiny_bert_dir, **model)
    expected = _plain(student, SENTENCES, batch_size=4)
    assert student.fast and expected.shape == (len(SENTENCES), student.dim)
    for batch_size in (1, 4, 64):
        np.testing.assert_allclose(student.encode(SENTENCES, batch_size=batch_size, show_progress=False),
                                   expected, atol=1e-5)
    raw = student.encode(SENTENCES, show_progress=False, normalize=False)
    np.testing.assert_allclose(raw, _plain(student, SENTENCES, normalize=False), atol=1e-5)
    student.configure_inference(token_budget=40)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(3)  # batches side by side on three threads
        np.testing.assert_allclose(student.encode(SENTENCES, show_progress=False), expected, atol=1e-5)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(threads)
        student.configure_inference()
    student.dims = 8  # a compressed (prefix) student: both paths cut, then re-normalise
    try:
        np.testing.assert_allclose(student.encode(SENTENCES, show_progress=False), _plain(student, SENTENCES),
                                   atol=1e-5)
    finally:
        student.dims = None
    student.train()
    student.encode(SENTENCES[:3], show_progress=False)
    assert student.training  # the training mode comes back after encoding


def test_student_bf16_and_int8_copies_on_cpu(tiny_bert_dir):
    student = _student(tiny_bert_dir)
    ref = _plain(student, SENTENCES)
    bf16 = student.configure_inference(precision="bf16").encode(SENTENCES, show_progress=False)
    assert bf16.dtype == np.float32 and np.abs(bf16 - ref).max() < 0.05
    copy_ = student._encoder_copy.get(student.encoder, "bf16", None)
    assert next(copy_.parameters()).dtype == torch.bfloat16
    assert next(student.encoder.parameters()).dtype == torch.float32  # the weights stay fp32
    assert all(p.dtype == torch.float32 for p in student.routed.parameters())  # heads run in fp32
    int8 = student.configure_inference(quantize="int8").encode(SENTENCES, show_progress=False)
    assert (int8 * ref).sum(1).min() > 0.95 and not np.allclose(int8, ref, atol=1e-6)
    student.configure_inference()
    np.testing.assert_allclose(student.encode(SENTENCES, show_progress=False), ref, atol=1e-5)
    assert not any("_encoder_copy" in k for k in student.state_dict())  # the copies are never saved
    for bad, match in (({"precision": "fp8"}, "precision"), ({"quantize": "int4"}, "quantize"),
                       ({"quantize": "int8", "precision": "bf16"}, "int8"), ({"token_budget": 0}, "token_budget")):
        with pytest.raises(ValueError, match=match):
            student.configure_inference(**bad)
    assert student.inference["precision"] == "auto" and student.fast


def test_wrapped_models_encode_through_the_fast_path(tiny_bert_dir, tmp_path, monkeypatch):
    from mixsp_core.compress import TransformChain, TransformedEmbedder, make_step, write_compressed_model
    from mixsp_core.models import encoder as encoder_module
    from mixsp_core.models import student as student_module
    from mixsp_core.models.checkpoint import TruncatedEncoder, load_embedder, save_checkpoint

    student = _student(tiny_bert_dir)
    save_checkpoint(student, tmp_path / "ckpt")
    plain = _plain(student, SENTENCES)
    chain = TransformChain([make_step("pca:8")]).fit(plain)
    write_compressed_model(tmp_path / "ckpt", chain, tmp_path / "pca8")
    calls: list[str] = []

    def spy(name, real):
        def run(*args, **kwargs):
            calls.append(name)
            return real(*args, **kwargs)
        return run

    monkeypatch.setattr(student_module, "encode_with", spy("student", student_module.encode_with))
    monkeypatch.setattr(encoder_module, "encode_planned", spy("encoder", encoder_module.encode_planned))
    pca = load_embedder(tmp_path / "pca8", device="cpu")
    assert isinstance(pca, TransformedEmbedder) and pca.base.fast
    np.testing.assert_allclose(pca.encode(SENTENCES, show_progress=False), chain.apply(plain), atol=1e-4)
    assert calls == ["student"]
    bf16 = load_embedder(tmp_path / "pca8", device="cpu", precision="bf16", token_budget=64)
    assert bf16.base.inference == {"precision": "bf16", "quantize": None, "token_budget": 64, "backend": "torch"}
    truncated = load_embedder(tiny_bert_dir, device="cpu", dims=8, quantize="int8")
    assert isinstance(truncated, TruncatedEncoder) and truncated.quantize == "int8"
    assert truncated.encode(SENTENCES, show_progress=False).shape == (len(SENTENCES), 8)
    assert calls == ["student", "encoder"]


@pytest.mark.slow
def test_fast_minilm_matches_sentence_transformers(minilm_dir):
    from sentence_transformers import SentenceTransformer

    ours = Encoder(minilm_dir, device="cpu", show_progress=False).encode(SENTENCES, batch_size=4)
    reference = SentenceTransformer(str(minilm_dir), device="cpu").encode(SENTENCES, batch_size=4)
    np.testing.assert_allclose(ours, reference, atol=1e-5)


# --------------------------------------------------------------------------- benchmark helpers


def test_bench_samples_are_shared_prefixes_and_files_round_trip(tmp_path):
    from benchmarks.corpus import read_sentences, sample, write_sentences

    pool = [f"sentence {i}" for i in range(50)]
    small, _ = sample(pool, 10, seed=3)
    large, used = sample(pool, 30, seed=3)
    assert large[:10] == small  # every model's sample is a prefix of the largest one
    queries, _ = sample(pool, 20, seed=4, exclude=used)
    assert not set(queries) & set(large)
    repeated, _ = sample(pool[:5], 12, seed=0)  # a small pool is repeated, not refused
    assert len(repeated) == 12 and set(repeated) == set(pool[:5])
    for name in ("s.txt", "s.txt.gz"):
        assert read_sentences(write_sentences(pool, tmp_path / name)) == pool


def test_bench_flops_bound_and_model_names():
    from benchmarks.models import flops_per_sentence, parse_models, peak_bf16_tflops
    from mixsp_core.errors import ConfigError

    minilm = {"hidden_size": 384, "intermediate_size": 1536, "num_hidden_layers": 6}
    # 6 layers x (8*16*384^2 + 4*16*384*1536 + 4*16^2*384) = 6 x 56,999,936
    assert flops_per_sentence(minilm, 16) == 6 * (8 * 16 * 384**2 + 4 * 16 * 384 * 1536 + 4 * 256 * 384)
    assert peak_bf16_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert peak_bf16_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_bf16_tflops("NVIDIA H200") == 989.4  # SXM, the GPU lent now: H100 SXM's peak
    assert peak_bf16_tflops("NVIDIA H200 NVL") == 835.0
    assert peak_bf16_tflops("a toaster") is None
    assert [m.key for m in parse_models("mpnet, minilm")] == ["mpnet", "minilm"]
    with pytest.raises(ConfigError, match="--models"):
        parse_models("minilm,bert")
