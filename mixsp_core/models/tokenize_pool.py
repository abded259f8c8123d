"""Tokenisation in worker processes, for hosts whose accelerator outruns one Python process.

:class:`~mixsp_core.models.batching.BulkTokenizer` runs the Rust tokenizer on several threads, but
turning its ``Encoding`` objects into id lists holds the GIL (0.38 s per 100k sentences on the H200 host),
so 8 threads top out near 105k sentences/s, below what an H200 encodes (MiniLM's forward passes: 253k/s). :class:`TokenizerProcessPool` moves the whole step (encode and conversion) into
processes started once, each with its own copy of the tokenizer; they send back flat id arrays
(pickled numpy buffers, cheap), so the parent only concatenates. Same ids as ``BulkTokenizer``.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import threading
from collections.abc import Sequence

import numpy as np

from mixsp_core.models.batching import TokenizedChunk, backend_ids, id_arrays, truncating_backend

# sentences per task: measured on the H200 host (16 cores, 100k sentences, 14 workers), 1024 tokenised at
# 257k/s against 217k/s at 4096 (the last tasks finish closer together)
_SENTENCES_PER_TASK = 1024

_backend = None  # the worker process's tokenizer (set by _start_worker)


def _start_worker(tokenizer_json: str, max_length: int) -> None:
    global _backend
    _backend = truncating_backend(tokenizer_json, max_length)


def _tokenize_piece(sentences: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(lengths, concatenated ids) of ``sentences``, int32 (half the bytes to send back)."""
    assert _backend is not None, "worker not initialised"
    return id_arrays(backend_ids(_backend, sentences), np.int32)


class TokenizerProcessPool:
    """``processes`` worker processes tokenising for one fast tokenizer, truncated to ``max_length``,
    special tokens added, no padding; called like :class:`~mixsp_core.models.batching.BulkTokenizer`.

    The processes start at the first call and live until :meth:`close` (or the pool is collected).
    On Linux they are forked, as PyTorch's DataLoader workers are (cheap, and safe next to CUDA: the
    workers never touch it); elsewhere spawned. ``tokenizer``: a Hugging Face fast tokenizer.
    """

    def __init__(self, tokenizer, max_length: int, processes: int):
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("TokenizerProcessPool needs a fast (Rust) tokenizer")
        if processes < 1:
            raise ValueError(f"processes must be positive, got {processes}")
        self.max_length = int(max_length)
        self.processes = int(processes)
        self._json = tokenizer.backend_tokenizer.to_str()
        self._pool = None
        self._starting = threading.Lock()  # the encode loop calls from two prefetch threads at once

    def start(self) -> TokenizerProcessPool:
        """Start the worker processes now (else the first call does). Call it from the main thread
        before the prefetch threads run: forking while another thread holds a lock is unsafe."""
        self._started()
        return self

    def _started(self):
        with self._starting:
            if self._pool is None:
                method = "fork" if sys.platform.startswith("linux") else "spawn"
                # the workers' Rust tokenizers run one thread each: the parallelism is the processes
                os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
                self._pool = multiprocessing.get_context(method).Pool(
                    self.processes, initializer=_start_worker, initargs=(self._json, self.max_length))
            return self._pool

    def __call__(self, sentences: Sequence[str]) -> TokenizedChunk:
        """Token ids of ``sentences``, in order."""
        sentences = list(sentences)
        if not sentences:
            return TokenizedChunk(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
        # equal pieces of at most _SENTENCES_PER_TASK, in whole waves of `processes` (16,384 sentences on
        # 14 workers: 28 pieces of 586, not 16 of 1,024 with the last two alone in a second wave)
        waves = -(-len(sentences) // (self.processes * _SENTENCES_PER_TASK))
        step = max(1, -(-len(sentences) // (self.processes * waves)))
        pieces = [sentences[i:i + step] for i in range(0, len(sentences), step)]
        parts = self._started().map(_tokenize_piece, pieces, chunksize=1)
        lengths = np.concatenate([p[0] for p in parts]).astype(np.int64)
        ids = np.concatenate([p[1] for p in parts]).astype(np.int64)
        return TokenizedChunk(ids, lengths)

    def close(self) -> None:
        """Stop the worker processes (a later call starts new ones)."""
        with self._starting:
            if self._pool is not None:
                self._pool.terminate()
                self._pool.join()
                self._pool = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: the pool's own finaliser stops the processes
            pass
