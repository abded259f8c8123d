"""Run a pooled forward function over planned batches (see :mod:`mixsp_core.models.batching`).

On CPU, whole batches run side by side on several threads with one intra-op thread each. On CUDA
the ids of a chunk go to the GPU in one pinned, asynchronous copy, batches are views of it, outputs
stay on the GPU until the chunk is done and come back asynchronously; the host waits once, at the end.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeAlias

import numpy as np
import torch

from mixsp_core.models.batching import Batch, BulkTokenizer, TokenizedChunk, stream_plans
from mixsp_core.models.malloc_tuning import tune_malloc
from mixsp_core.progress import encode_bar

# forward(ids (B, T) on the device, mask (B, T) bool or None) -> {key: pooled (B, width) float32}
PooledForward: TypeAlias = Callable[[torch.Tensor, "torch.Tensor | None"], dict[int, torch.Tensor]]


def encode_planned(sentences: Sequence[str], tokenize: Callable[[Sequence[str]], TokenizedChunk],
                   forward: PooledForward, widths: dict[int, int], device: torch.device, batch_size: int,
                   token_budget: int | None = None, merge_tail: bool = False, pad_id: int = 0,
                   chunk_size: int = 65536, show_progress: bool = True, workers: int = 1,
                   desc: str = "encode") -> dict[int, np.ndarray]:
    """``{key: (len(sentences), widths[key]) float32}``, row i for ``sentences[i]``.

    ``forward`` gets each batch's ids (and a padding mask only for padded batches) and returns the
    pooled vectors per key; ``widths`` names the keys and their widths. Batching as in
    :func:`mixsp_core.models.batching.stream_plans`. Runs under ``torch.inference_mode``. A batch of zero-token sentences (a
    tokenizer without special tokens given "") gets zero vectors, as masked mean pooling would.

    ``workers`` > 1 (CPU): that many threads take whole batches from a queue, each op running on one
    intra-op thread (``torch.set_num_threads(1)`` for the duration, restored after). Batches then run
    side by side instead of splitting every matrix product across cores, which wastes less on
    small matrices and thread barriers; each batch's result is the same either way.
    """
    n = len(sentences)
    result = {k: np.empty((n, w), dtype=np.float32) for k, w in widths.items()}
    cuda = device.type == "cuda"
    workers = 1 if cuda else max(1, workers)
    done: list[tuple[np.ndarray, dict[int, torch.Tensor]]] = []
    bar = encode_bar(n, desc, show_progress)  # the running stage's one bar, else a bar of its own
    lock = threading.Lock()
    threads_before = torch.get_num_threads()
    try:
        if workers > 1:
            torch.set_num_threads(1)
        with torch.inference_mode(), bar:
            for plan in stream_plans(sentences, tokenize, batch_size, token_budget, chunk_size, merge_tail, pad_id):
                ids, lengths = torch.from_numpy(plan.ids), torch.from_numpy(plan.lengths)
                if cuda:  # one pinned asynchronous copy per chunk; batches are views of it
                    ids = ids.pin_memory().to(device, non_blocking=True)
                    lengths = lengths.pin_memory().to(device, non_blocking=True)
                out = {k: torch.empty((len(plan.rows), w), dtype=torch.float32, device=device)
                       for k, w in widths.items()}

                def run(b: Batch, ids=ids, lengths=lengths, out=out) -> None:
                    rows = slice(b.row_start, b.row_start + b.size)
                    if b.length == 0:
                        for k in out:
                            out[k][rows] = 0.0
                    else:
                        x = ids[b.token_start:b.token_start + b.size * b.length].view(b.size, b.length)
                        mask = None
                        if b.padded:
                            mask = torch.arange(b.length, device=device)[None, :] < lengths[rows, None]
                        for k, vec in forward(x, mask).items():
                            out[k][rows] = vec
                    with lock:
                        bar.update(b.size)

                _run_batches(plan.batches, run, workers)
                if cuda:  # back to pinned host memory without waiting; the one wait is below
                    out = {k: torch.empty(v.shape, dtype=v.dtype, pin_memory=True).copy_(v, non_blocking=True)
                           for k, v in out.items()}
                done.append((plan.rows, out))
            if cuda:
                torch.cuda.synchronize(device)
    finally:
        if workers > 1:
            torch.set_num_threads(threads_before)
    for rows, out in done:
        for k, v in out.items():
            result[k][rows] = v.numpy()
    return result


def encode_with(sentences: Sequence[str], tokenizer, max_length: int, forward: PooledForward, dim: int,
                device: torch.device, batch_size: int = 64, show_progress: bool = True,
                token_budget: int | None = None) -> np.ndarray:
    """The fast path for any model with a HF ``tokenizer``: ``(len(sentences), dim)`` float32.

    ``forward(ids, mask)`` returns ``{-1: vectors}`` for one batch (``mask`` is None for the usual
    unpadded batch: pass ``torch.ones_like(ids)`` on if the model insists on one). CPU batches run
    side by side on ``torch.get_num_threads()`` threads, as in :class:`mixsp_core.models.encoder.Encoder`.
    """
    if device.type == "cpu":
        tune_malloc()
    pad_id = getattr(tokenizer, "pad_token_id", None)
    return encode_planned(list(sentences), BulkTokenizer(tokenizer, max_length), forward, {-1: dim}, device,
                          batch_size, token_budget=token_budget, merge_tail=device.type == "cuda",
                          pad_id=0 if pad_id is None else int(pad_id), show_progress=show_progress,
                          workers=torch.get_num_threads())[-1]


def _run_batches(batches: list[Batch], run: Callable[[Batch], None], workers: int) -> None:
    """``run`` every batch, on ``workers`` threads pulling from a shared queue (largest batches first,
    so the threads finish together)."""
    if workers <= 1 or len(batches) <= 1:
        for b in batches:
            run(b)
        return
    todo: queue.SimpleQueue[Batch] = queue.SimpleQueue()
    for b in sorted(batches, key=lambda b: -b.size * b.length):
        todo.put(b)

    def worker() -> None:
        with torch.inference_mode():  # thread-local: each worker enters it itself
            while True:
                try:
                    b = todo.get_nowait()
                except queue.Empty:
                    return
                run(b)

    with ThreadPoolExecutor(min(workers, len(batches)), thread_name_prefix="mixsp-encode") as pool:
        for f in [pool.submit(worker) for _ in range(min(workers, len(batches)))]:
            f.result()  # re-raise a worker's error
