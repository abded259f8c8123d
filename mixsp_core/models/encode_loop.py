"""Run a pooled forward function over planned batches (see :mod:`mixsp_core.models.batching`).

On CPU, whole batches run side by side on several threads with one intra-op thread each. On CUDA
the ids of a chunk go to the GPU in one pinned, asynchronous copy, batches are views of it, outputs
stay on the GPU until the chunk is done and come back asynchronously; the host waits for a chunk only
once the next one is queued. :func:`iter_planned` hands out each chunk's outputs as they are done (a file
encoded in bounded memory, :mod:`mixsp_core.models.streaming`); :func:`encode_planned` gathers them.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeAlias

import numpy as np
import torch

from mixsp_core.models.batching import (CPU_CHUNK_SENTENCES, Batch, BulkTokenizer, PlannedChunk, TokenizedChunk,
                                        default_chunk_size, plan_chunks, split_chunks)
from mixsp_core.models.malloc_tuning import tune_malloc
from mixsp_core.progress import encode_bar

# forward(ids (B, T) on the device, mask (B, T) bool or None) -> {key: pooled (B, width) float32}
PooledForward: TypeAlias = Callable[[torch.Tensor, "torch.Tensor | None"], dict[int, torch.Tensor]]


Block: TypeAlias = "tuple[np.ndarray, dict[int, np.ndarray]]"  # (rows, {key: (len(rows), width) float32})


def encode_planned(sentences: Sequence[str], tokenize: Callable[[Sequence[str]], TokenizedChunk],
                   forward: PooledForward, widths: dict[int, int], device: torch.device, batch_size: int,
                   token_budget: int | None = None, merge_tail: bool = False, pad_id: int = 0,
                   chunk_size: int = CPU_CHUNK_SENTENCES, show_progress: bool = True, workers: int = 1,
                   desc: str = "encode") -> dict[int, np.ndarray]:
    """``{key: (len(sentences), widths[key]) float32}``, row i for ``sentences[i]``: the blocks of
    :func:`iter_planned` over the list cut by :func:`~mixsp_core.models.batching.split_chunks`, gathered."""
    blocks = iter_planned(split_chunks(sentences, chunk_size), tokenize, forward, widths, device, batch_size,
                          token_budget, merge_tail, pad_id, show_progress, workers, desc, total=len(sentences))
    return gather_blocks(blocks, len(sentences), widths)


def gather_blocks(blocks: Iterator[Block], n: int, widths: dict[int, int]) -> dict[int, np.ndarray]:
    """The ``(rows, outputs)`` blocks of a stream as ``{key: (n, widths[key]) float32}`` in row order."""
    result = {k: np.empty((n, w), dtype=np.float32) for k, w in widths.items()}
    with contextlib.closing(blocks):  # a generator: an error here ends the stream's threads at once
        for rows, out in blocks:
            for k, v in out.items():
                result[k][rows] = v
    return result


def key_blocks(blocks: Iterator[Block], key: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(rows, outputs[key])`` of each block of a stream, holding none of them while the next one is made."""
    with contextlib.closing(blocks):  # closed early: the stream's threads end at once
        for rows, out in blocks:
            yield rows, out[key]
            del rows, out  # a loop variable would keep the last chunk's outputs alive until the next is done


def iter_planned(chunks: Iterable[Sequence[str]], tokenize: Callable[[Sequence[str]], TokenizedChunk],
                 forward: PooledForward, widths: dict[int, int], device: torch.device, batch_size: int,
                 token_budget: int | None = None, merge_tail: bool = False, pad_id: int = 0,
                 show_progress: bool = True, workers: int = 1, desc: str = "encode",
                 total: int = 0) -> Iterator[Block]:
    """Encode the sentences of ``chunks`` (consecutive lists, read lazily) one planned chunk at a time:
    yields ``(rows, {key: (len(rows), widths[key]) float32})``, ``rows`` numbering the sentences across
    all chunks; every row comes exactly once, in plan order (not input order). ``total``: the sentence
    count, for the progress bar.

    ``forward`` gets each batch's ids (and a padding mask only for padded batches) and returns the
    pooled vectors per key; ``widths`` names the keys and their widths. Batching as in
    :func:`mixsp_core.models.batching.plan_chunks`. Runs under ``torch.inference_mode``. A batch of zero-token sentences (a
    tokenizer without special tokens given "") gets zero vectors, as masked mean pooling would.
    Held at a time: the plan and outputs of one chunk (on CUDA two: a chunk's outputs are handed out
    once the next chunk is queued, so the host waits only for work already done).

    ``workers`` > 1 (CPU): that many threads take whole batches from a queue, each op running on one
    intra-op thread (``torch.set_num_threads(1)`` while a chunk runs, restored after). Batches then run
    side by side instead of splitting every matrix product across cores, which wastes less on
    small matrices and thread barriers; each batch's result is the same either way.
    """
    cuda = device.type == "cuda"
    workers = 1 if cuda else max(1, workers)
    bar = encode_bar(total, desc, show_progress)  # the running stage's one bar, else a bar of its own
    lock = threading.Lock()
    pending: tuple[np.ndarray, dict[int, torch.Tensor], torch.cuda.Event] | None = None
    with bar:
        # CUDA: two chunks tokenise ahead, so the GPU never waits for one (the tokeniser pool's workers
        # are shared by both; on CPU the tokeniser's threads would take cores from the model)
        for plan in plan_chunks(chunks, tokenize, batch_size, token_budget, merge_tail, pad_id,
                                read_ahead=2 if cuda else 1):
            out = _run_plan(plan, forward, widths, device, workers, bar, lock)
            if not cuda:
                yield plan.rows, {k: v.numpy() for k, v in out.items()}
                del out  # the consumer has this chunk's outputs: not held while the next one runs
                continue
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(device))
            if pending is not None:
                yield _when_done(*pending)
            pending = (plan.rows, out, done)
        if pending is not None:
            yield _when_done(*pending)


def _when_done(rows: np.ndarray, out: dict[int, torch.Tensor], done: torch.cuda.Event) -> Block:
    done.synchronize()  # the chunk's asynchronous copy to pinned host memory has landed
    return rows, {k: v.numpy() for k, v in out.items()}


def _run_plan(plan: PlannedChunk, forward: PooledForward, widths: dict[int, int], device: torch.device,
              workers: int, bar, lock: threading.Lock) -> dict[int, torch.Tensor]:
    """One planned chunk's outputs ``{key: (len(plan.rows), width)}`` on the host (CUDA: pinned tensors
    still being filled asynchronously)."""
    cuda = device.type == "cuda"
    threads_before = torch.get_num_threads()
    try:
        if workers > 1:
            torch.set_num_threads(1)
        with torch.inference_mode():
            ids, lengths = torch.from_numpy(plan.ids), torch.from_numpy(plan.lengths)
            if cuda:  # one pinned asynchronous copy per chunk; batches are views of it
                ids = ids.pin_memory().to(device, non_blocking=True)
                lengths = lengths.pin_memory().to(device, non_blocking=True)
            out = {k: torch.empty((len(plan.rows), w), dtype=torch.float32, device=device)
                   for k, w in widths.items()}

            def run(b: Batch) -> None:
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
            if cuda:  # back to pinned host memory without waiting; the caller waits on an event
                out = {k: torch.empty(v.shape, dtype=v.dtype, pin_memory=True).copy_(v, non_blocking=True)
                       for k, v in out.items()}
    finally:
        if workers > 1:
            torch.set_num_threads(threads_before)
    return out


def encode_with(sentences: Sequence[str], tokenizer, max_length: int, forward: PooledForward, dim: int,
                device: torch.device, batch_size: int = 64, show_progress: bool = True,
                token_budget: int | None = None) -> np.ndarray:
    """The fast path for any model with a HF ``tokenizer``: ``(len(sentences), dim)`` float32.

    ``forward(ids, mask)`` returns ``{-1: vectors}`` for one batch (``mask`` is None for the usual
    unpadded batch: pass ``torch.ones_like(ids)`` on if the model insists on one). CPU batches run
    side by side on ``torch.get_num_threads()`` threads, as in :class:`mixsp_core.models.encoder.Encoder`.
    """
    sentences = list(sentences)
    blocks = stream_with(split_chunks(sentences, default_chunk_size(device.type)), tokenizer, max_length, forward, dim,
                         device, batch_size, show_progress, token_budget, total=len(sentences))
    return gather_blocks(blocks, len(sentences), {-1: dim})[-1]


def stream_with(chunks: Iterable[Sequence[str]], tokenizer, max_length: int, forward: PooledForward, dim: int,
                device: torch.device, batch_size: int = 64, show_progress: bool = True,
                token_budget: int | None = None, total: int = 0) -> Iterator[Block]:
    """:func:`encode_with` as a stream: the sentences of ``chunks`` (read lazily) in blocks
    ``(rows, {-1: (len(rows), dim)})``, see :func:`iter_planned`."""
    if device.type == "cpu":
        tune_malloc()
    pad_id = getattr(tokenizer, "pad_token_id", None)
    return iter_planned(chunks, BulkTokenizer(tokenizer, max_length), forward, {-1: dim}, device, batch_size,
                        token_budget=token_budget, merge_tail=device.type == "cuda",
                        pad_id=0 if pad_id is None else int(pad_id), show_progress=show_progress,
                        workers=torch.get_num_threads(), total=total)


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
