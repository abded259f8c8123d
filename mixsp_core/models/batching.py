"""Tokenise sentences once, in bulk, and plan unpadded batches of equal token count.

The plan groups sentences by their exact token count, so a batch has no padding at all: the model
runs without an attention mask (transformers then takes SDPA's fastest kernel), mean pooling is a
plain mean, and no FLOP is spent on pad tokens. Sentences are tokenised once, in bulk, by the Rust
tokenizer on several threads (it releases the GIL) or processes, in chunks that background threads
prepare while the previous chunk is encoded. On CPU a length group's partial last batch is carried
into the next chunk, so only the final chunk has partial batches; on CUDA (``merge_tail``) each chunk's
partial groups are pooled into a few padded batches at once, so each chunk is encoded as soon as it is
tokenised and the tokeniser runs beside the GPU, not before it. The chunks can come from a list
(:func:`stream_plans`) or lazily, from a file read as it is encoded (:func:`plan_chunks`); either way
the same chunk sizes give the same batches.

:func:`mixsp_core.models.encode_loop.encode_planned` runs a model over these plans.
"""

from __future__ import annotations

import itertools
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

_SENTENCES_PER_TOKENIZER_CALL = 2048  # sentences per tokenizer call in the thread pool
_FIRST_CHUNK_SENTENCES = 8192  # a small first chunk: the model starts while the rest is tokenised
# Sentences per chunk. CPU: what a streamed encode holds at a time (a chunk's text, ids and float32 outputs:
# 16384 x 384 x 4 B = 25 MB for MiniLM; at 65536, 100 MB, a million-line `mixsp encode` peaked at 1,003 MB RSS),
# partial batches carried to the next chunk. CUDA: each chunk is planned
# whole and is what the GPU runs while the next ones are tokenised. H200, 100k sentences, budget 65536,
# 14 tokeniser processes (benchmarks/gpu_throughput.py): MiniLM 151k / 153k / 150k sentences/s at 16384 /
# 32768 / 65536 per chunk; mpnet 62k / 66k at 16384 / 32768.
CPU_CHUNK_SENTENCES = 16384
CUDA_CHUNK_SENTENCES = 32768


def default_chunk_size(device_type: str) -> int:
    """Sentences per planned chunk on ``device_type`` (``"cuda"``, else CPU)."""
    return CUDA_CHUNK_SENTENCES if device_type == "cuda" else CPU_CHUNK_SENTENCES


# --------------------------------------------------------------------------- tokenisation


@dataclass(frozen=True)
class TokenizedChunk:
    """Token ids of consecutive sentences: ``ids`` concatenated (int64), ``lengths`` per sentence."""

    ids: np.ndarray
    lengths: np.ndarray

    @property
    def offsets(self) -> np.ndarray:
        """Start of each sentence in ``ids``."""
        return np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(np.int64)


class BulkTokenizer:
    """Tokenise many sentences at once, truncated to ``max_length``, special tokens added, no padding.

    ``tokenizer``: a Hugging Face tokenizer. A fast one is driven through a private copy of its Rust
    backend (``encode_batch_fast`` in pieces on ``threads`` threads); a slow (Python) one through its
    usual call. Either way the ids equal ``tokenizer(s, truncation=True, max_length=max_length)``.
    """

    def __init__(self, tokenizer, max_length: int, threads: int | None = None):
        self.max_length = int(max_length)
        self.threads = max(1, threads if threads is not None else min(8, os.cpu_count() or 1))
        self._tokenizer = tokenizer
        self._backend = None
        if getattr(tokenizer, "is_fast", False):
            # A copy: the wrapper resets truncation/padding on its own backend at every call.
            self._backend = truncating_backend(tokenizer.backend_tokenizer.to_str(), self.max_length)

    def _ids(self, sentences: list[str]) -> list[list[int]]:
        if self._backend is not None:
            return backend_ids(self._backend, sentences)
        out = self._tokenizer(sentences, truncation=True, max_length=self.max_length,
                              return_attention_mask=False, return_token_type_ids=False)
        return list(out["input_ids"])

    def __call__(self, sentences: Sequence[str]) -> TokenizedChunk:
        """Token ids of ``sentences`` (a list of str), in order."""
        sentences = list(sentences)
        piece = _SENTENCES_PER_TOKENIZER_CALL
        pieces = [sentences[i:i + piece] for i in range(0, len(sentences), piece)]
        if len(pieces) > 1 and self.threads > 1 and self._backend is not None:
            with ThreadPoolExecutor(min(self.threads, len(pieces)), thread_name_prefix="mixsp-tok") as pool:
                lists = list(itertools.chain.from_iterable(pool.map(self._ids, pieces)))
        else:
            lists = list(itertools.chain.from_iterable(map(self._ids, pieces)))
        lengths, ids = id_arrays(lists, np.int64)
        return TokenizedChunk(ids, lengths)


def truncating_backend(tokenizer_json: str, max_length: int):
    """A Rust ``tokenizers.Tokenizer`` from its JSON, truncating at ``max_length``, never padding."""
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(tokenizer_json)
    backend.no_padding()
    backend.enable_truncation(max_length)
    return backend


def backend_ids(backend, sentences: list[str]) -> list[list[int]]:
    """Token ids of ``sentences`` by a Rust backend, special tokens added."""
    # encode_batch_fast skips character offsets (not needed here); older tokenizers lack it
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    return [e.ids for e in encode(sentences, add_special_tokens=True)]


def id_arrays(lists: list[list[int]], dtype) -> tuple[np.ndarray, np.ndarray]:
    """``(lengths, concatenated ids)`` of per-sentence id lists, both ``dtype``."""
    lengths = np.fromiter(map(len, lists), dtype=dtype, count=len(lists))
    ids = np.fromiter(itertools.chain.from_iterable(lists), dtype=dtype, count=int(lengths.sum()))
    return lengths, ids


# --------------------------------------------------------------------------- batch plans


@dataclass(frozen=True)
class Batch:
    """Rows ``row_start .. row_start + size`` of a chunk's plan order, padded to ``length`` tokens;
    their ids are ``ids[token_start : token_start + size * length]`` (row-major, (size, length)).
    ``padded``: some rows are shorter than ``length`` (the rest of the row is the pad id)."""

    row_start: int
    size: int
    length: int
    token_start: int
    padded: bool = False


@dataclass(frozen=True)
class PlannedChunk:
    """Sentences to encode now: ``rows`` (indices into the caller's list, in plan order), their true
    token counts ``lengths``, their ids laid out batch after batch, and the batches."""

    rows: np.ndarray
    lengths: np.ndarray
    ids: np.ndarray
    batches: list[Batch]


def batch_rows(length: int, batch_size: int, token_budget: int | None) -> int:
    """Sentences per batch for sentences of ``length`` tokens: ``token_budget // length`` (at least
    one) when a budget is set, else ``batch_size``."""
    if token_budget:
        return max(1, token_budget // max(1, length))
    return batch_size


def plan_chunk(rows: np.ndarray, tokens: TokenizedChunk, batch_size: int, token_budget: int | None,
               final: bool, merge_tail: bool = False, pad_id: int = 0) -> tuple[PlannedChunk, np.ndarray]:
    """Group ``rows`` (with their ``tokens``) by exact length into full batches, longest first.

    Unless ``final``, each length group's partial last batch is left out and its positions (into
    ``rows``) returned, to be planned with the next chunk. When ``final``, the partial batches are
    kept: one unpadded batch per length, or with ``merge_tail`` pooled into padded batches (longest
    first, each padded to its longest row), far fewer for a long tail of rare lengths.
    Returns ``(plan, leftover positions)``.
    """
    lengths = tokens.lengths
    order = _longest_first(lengths, np.arange(len(lengths), dtype=np.int64))
    cuts = np.flatnonzero(np.diff(lengths[order])) + 1
    full_parts, tail_parts = [], []
    for group in np.split(order, cuts) if len(order) else []:
        per = batch_rows(int(lengths[group[0]]), batch_size, token_budget)
        full = len(group) // per * per
        full_parts.append(group[:full])
        tail_parts.append(group[full:])
    empty = np.zeros(0, dtype=np.int64)
    exact = np.concatenate(full_parts) if full_parts else empty
    tail = np.concatenate(tail_parts) if tail_parts else empty
    if final and not merge_tail:
        exact, tail = _longest_first(lengths, np.concatenate([exact, tail])), empty
    batches = _exact_batches(lengths[exact], batch_size, token_budget)
    id_parts, kept = [gather_tokens(tokens, exact)], [exact]
    if final and len(tail):  # merge_tail: padded batches over the partial groups
        tail = _longest_first(lengths, tail)
        row, tok = len(exact), int(lengths[exact].sum())
        while len(tail):
            width = int(lengths[tail[0]])
            part, tail = np.split(tail, [batch_rows(width, batch_size, token_budget)])
            id_parts.append(pad_tokens(tokens, part, width, pad_id).ravel())
            batches.append(Batch(row, len(part), width, tok, bool(lengths[part[-1]] < width)))
            kept.append(part)
            row, tok = row + len(part), tok + len(part) * width
    kept_all = np.concatenate(kept)
    plan = PlannedChunk(rows[kept_all], lengths[kept_all], np.concatenate(id_parts), batches)
    return plan, tail


def _longest_first(lengths: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """``positions`` ordered by length, longest first, ties in input order."""
    return positions[np.lexsort((positions, -lengths[positions]))]


def _exact_batches(lengths: np.ndarray, batch_size: int, token_budget: int | None) -> list[Batch]:
    """Unpadded batches over rows whose equal lengths come in consecutive runs."""
    batches: list[Batch] = []
    cuts = np.flatnonzero(np.diff(lengths)) + 1
    row = tok = 0
    for run_start, run_end in zip([0, *cuts.tolist()], [*cuts.tolist(), len(lengths)]):
        if run_end <= run_start:
            continue
        length = int(lengths[run_start])
        per = batch_rows(length, batch_size, token_budget)
        for start in range(run_start, run_end, per):
            size = min(per, run_end - start)
            batches.append(Batch(row, size, length, tok))
            row, tok = row + size, tok + size * length
    return batches


def gather_tokens(tokens: TokenizedChunk, positions: np.ndarray) -> np.ndarray:
    """The ids of sentences ``positions`` (into ``tokens``), concatenated in that order."""
    lengths = tokens.lengths[positions]
    if lengths.size == 0:
        return np.zeros(0, dtype=np.int64)
    starts = tokens.offsets[positions]
    ends = np.cumsum(lengths)
    # Output slot t of sentence j reads ids[starts[j] + (t - (ends[j] - lengths[j]))].
    shift = np.repeat(starts - (ends - lengths), lengths)
    return tokens.ids[shift + np.arange(int(ends[-1]))]


def pad_tokens(tokens: TokenizedChunk, positions: np.ndarray, width: int, pad_id: int) -> np.ndarray:
    """(len(positions), width) ids of sentences ``positions``, right-padded with ``pad_id``."""
    lengths = tokens.lengths[positions]
    out = np.full((len(positions), width), pad_id, dtype=np.int64)
    out[np.arange(width)[None, :] < lengths[:, None]] = gather_tokens(tokens, positions)
    return out


def _select_sentences(tokens: TokenizedChunk, positions: np.ndarray) -> TokenizedChunk:
    """Sentences ``positions`` of ``tokens``, in that order."""
    return TokenizedChunk(gather_tokens(tokens, positions), tokens.lengths[positions])


def _concat_chunks(a: TokenizedChunk, b: TokenizedChunk) -> TokenizedChunk:
    """The sentences of ``a`` followed by those of ``b``."""
    return TokenizedChunk(np.concatenate([a.ids, b.ids]), np.concatenate([a.lengths, b.lengths]))


def chunk_sizes(chunk_size: int) -> Iterator[int]:
    """Sentences per chunk, without end: 8192 at most first (encoding starts early), then doubling up to
    ``chunk_size`` (each chunk is tokenised while the one before it runs)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    size = min(chunk_size, _FIRST_CHUNK_SENTENCES)
    while True:
        yield size
        size = min(chunk_size, 2 * size)


def split_chunks(sentences: Sequence[str], chunk_size: int) -> Iterator[Sequence[str]]:
    """``sentences`` cut into consecutive slices of :func:`chunk_sizes`."""
    start = 0
    for size in chunk_sizes(chunk_size):
        if start >= len(sentences):
            return
        yield sentences[start:start + size]
        start += size


def stream_plans(sentences: Sequence[str], tokenize: Callable[[Sequence[str]], TokenizedChunk],
                 batch_size: int, token_budget: int | None = None, chunk_size: int = CPU_CHUNK_SENTENCES,
                 merge_tail: bool = False, pad_id: int = 0) -> Iterator[PlannedChunk]:
    """Plans covering every sentence exactly once, chunk by chunk (see :func:`plan_chunk`), the chunks
    cut by :func:`split_chunks`: :func:`plan_chunks` over the slices of one list."""
    return plan_chunks(split_chunks(sentences, chunk_size), tokenize, batch_size, token_budget, merge_tail, pad_id)


def plan_chunks(chunks: Iterable[Sequence[str]], tokenize: Callable[[Sequence[str]], TokenizedChunk],
                batch_size: int, token_budget: int | None = None, merge_tail: bool = False,
                pad_id: int = 0, read_ahead: int = 1) -> Iterator[PlannedChunk]:
    """Plans covering every sentence of ``chunks`` (consecutive lists, read lazily: a file streamed)
    exactly once; ``rows`` count sentences across all chunks (row i: the i-th sentence of the stream).

    The next chunk is read from ``chunks`` while the queued ones are tokenised, ``read_ahead`` chunks at
    a time in background threads, while the caller encodes the current one. Without ``merge_tail``
    partial batches are carried to the next chunk and only the last chunk (the one ``chunks`` ends
    after) keeps them; with it every chunk is planned whole (:func:`plan_chunk`'s ``final``). Held at a
    time: the sentences of one chunk read ahead, the ids of ``read_ahead + 1`` chunks, and the carried
    partial batches (under ``batch_size`` per token length).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if token_budget is not None and token_budget < 1:
        raise ValueError(f"token_budget must be positive or None, got {token_budget}")
    if read_ahead < 1:
        raise ValueError(f"read_ahead must be positive, got {read_ahead}")
    source = (chunk for chunk in chunks if len(chunk))
    carry_rows = np.zeros(0, dtype=np.int64)
    carry = TokenizedChunk(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
    queued: deque[tuple[int, int, Future]] = deque()  # (first row, end row, its tokens), oldest first
    with ThreadPoolExecutor(read_ahead, thread_name_prefix="mixsp-prefetch") as prefetch:
        chunk, lo = next(source, None), 0

        def whole_plan(start: int, chunk: Sequence[str]) -> PlannedChunk:  # merge_tail: nothing carried
            rows = np.arange(start, start + len(chunk), dtype=np.int64)
            return plan_chunk(rows, tokenize(chunk), batch_size, token_budget, True, True, pad_id)[0]

        def top_up() -> None:  # keep read_ahead chunks tokenising, the next one read meanwhile
            nonlocal chunk, lo
            while len(queued) < read_ahead and chunk is not None:
                # merge_tail: planned in the background thread too, the caller's thread only encodes
                task = prefetch.submit(whole_plan, lo, chunk) if merge_tail else prefetch.submit(tokenize, chunk)
                queued.append((lo, lo + len(chunk), task))
                lo += len(chunk)
                chunk = next(source, None)

        top_up()
        while queued:
            start, end, future = queued.popleft()
            result = future.result()
            top_up()  # the next chunks tokenise while this one is planned and encoded
            if merge_tail:
                yield result
                continue
            tokens = result
            final = chunk is None and not queued
            rows = np.concatenate([carry_rows, np.arange(start, end, dtype=np.int64)])
            tokens = _concat_chunks(carry, tokens)
            plan, left = plan_chunk(rows, tokens, batch_size, token_budget, final, merge_tail, pad_id)
            carry_rows, carry = rows[left], _select_sentences(tokens, left)
            yield plan
