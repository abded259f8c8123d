"""TokenizerProcessPool: the ids of BulkTokenizer, from worker processes; the encoder's choice of it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from mixsp_core.models.batching import BulkTokenizer
from mixsp_core.models.encoder import Encoder, _default_tokenize_processes
from mixsp_core.models.tokenize_pool import TokenizerProcessPool

SENTENCES = [f"sentence number {i} " + "word " * (i % 37) for i in range(3000)] + ["", "x"]


def test_pool_gives_the_ids_of_bulk_tokenizer(tiny_bert_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    pool = TokenizerProcessPool(tokenizer, 16, processes=2)
    try:
        got = pool(SENTENCES)
        want = BulkTokenizer(tokenizer, 16, threads=1)(SENTENCES)
        assert np.array_equal(got.ids, want.ids) and np.array_equal(got.lengths, want.lengths)
        assert got.ids.dtype == np.int64 and got.lengths.max() == 16  # truncated
        assert len(pool([]).lengths) == 0
    finally:
        pool.close()


def test_pool_refuses_slow_tokenizers_and_bad_sizes(tiny_bert_dir):
    slow = type("PythonTokenizer", (), {"is_fast": False})()  # no Rust backend to copy into the workers
    with pytest.raises(ValueError, match="fast"):
        TokenizerProcessPool(slow, 16, processes=2)
    with pytest.raises(ValueError, match="processes"):
        TokenizerProcessPool(AutoTokenizer.from_pretrained(tiny_bert_dir), 16, processes=0)


def test_encoder_with_a_pool_encodes_as_without(tiny_bert_dir):
    encoder = Encoder(tiny_bert_dir, device="cpu", show_progress=False)
    assert encoder.tokenize_processes == 0  # CPU default: the cores are the model's
    plain = encoder.encode(SENTENCES[:500])
    encoder.tokenize_processes = 2
    pooled = encoder.encode(SENTENCES[:500])
    assert isinstance(encoder._bulk_tokenizer(), TokenizerProcessPool)
    np.testing.assert_array_equal(plain, pooled)
    encoder._bulk_tokenizer().close()


def test_default_processes_only_on_cuda():
    assert _default_tokenize_processes(torch.device("cpu")) == 0
