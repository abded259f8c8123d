"""Encode a sentence file into an ``.npy`` matrix in bounded memory: what ``mixsp encode`` runs.

The file (one sentence per line) is read twice: a cheap first pass counts and checks its lines (an empty
line or undecodable bytes are a ``DataError`` naming the file and line, before any model work), the
second reads it chunk by chunk as it is encoded. Each chunk's vectors go straight into the output, a
``.npy`` of the counted rows written atomically (:func:`mixsp_core.io.writing_npy_rows`: a temporary file
beside it, renamed over it when complete), so what stays in memory is one chunk's sentences, token ids
and vectors, whatever the file's length; no list of all sentences, no (n, dim) matrix. On the CPU the
allocator is tuned for a long run (:data:`STREAM_MMAP_THRESHOLD`), so that freed memory is reused or
returned rather than fragmenting the heap chunk after chunk.

An embedder with ``encode_stream`` (:class:`~mixsp_core.models.encoder.Encoder`) streams natively: its
plans carry partial batches across chunks exactly as ``encode`` does on the whole list, so the file gives
the very vectors (bitwise) of ``encode(all sentences)``. Any other embedder (a student, a saved transform,
a ``--dims`` prefix) is called with ``encode(chunk, batch_size)`` chunk by chunk: the same vectors up to
the batches that differ at the chunk ends (float rounding; an int8-weight copy quantises each batch's
activations on their own).
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from mixsp_core.data.corpus import sentence_lines
from mixsp_core.errors import DataError
from mixsp_core.io import writing_npy_rows
from mixsp_core.models.batching import CPU_CHUNK_SENTENCES, chunk_sizes
from mixsp_core.models.integrity import check_finite_vectors
from mixsp_core.models.malloc_tuning import tune_malloc
from mixsp_core.progress import stage_progress

CHUNK_SENTENCES = CPU_CHUNK_SENTENCES  # sentences per chunk when the embedder names no chunk size of its own
# glibc's mmap threshold while streaming on the CPU (tune_malloc): blocks from 4 MiB up (a chunk's buffers, the
# larger activations) are returned to the system when freed. With the encode's 1 GiB the heap fragments and
# grows chunk after chunk (all-MiniLM-L6-v2: 1.6 GB peak RSS at 200,000 sentences and rising); at 4 MiB it
# stays flat (about 0.8 GB) for some 5% more CPU time; at 8 MiB it still grows.
STREAM_MMAP_THRESHOLD = 4 << 20


class SentenceFile:
    """A text file of one sentence per line, read lazily; counted and checked when made.

    Lines are split as :func:`mixsp_core.data.senteval.iter_text_lines` splits them (on ``\\n`` only, a
    trailing ``\\r`` dropped, a byte-order mark ignored); each line is one sentence, as written.
    A missing file, undecodable bytes (with the line and byte offset) and a blank line raise
    ``DataError`` naming the file and line. ``len()`` is the number of sentences. ``encoding``: one where
    the byte ``\\n`` ends a line (UTF-8, Latin-1; not UTF-16), since lines are cut before decoding.
    """

    def __init__(self, path: str | os.PathLike[str], encoding: str = "utf-8"):
        self.path = Path(path)
        self.encoding = encoding
        self.count = sum(1 for _ in self.lines())  # the first pass: checks every line, keeps none

    def __len__(self) -> int:
        return self.count

    def lines(self) -> Iterator[str]:
        """The sentences in file order, each checked as it is read."""
        return sentence_lines(self.path, self.encoding)

    def chunks(self, sizes: Iterable[int]) -> Iterator[list[str]]:
        """Consecutive lists of ``sizes`` sentences (the last one shorter) covering the counted lines. A file
        that changed since it was counted is a ``DataError`` (its rows would not match the output's), raised
        when a line is missing or, after the last counted line, when asked for the next chunk: never a row
        past the count."""
        lines, left = self.lines(), self.count
        for size in sizes:
            if not left:
                break
            chunk = list(itertools.islice(lines, min(size, left)))
            if len(chunk) < min(size, left):
                self._changed(self.count - left + len(chunk))
            left -= len(chunk)
            yield chunk
        # every counted line handed out: one more is a changed file (sizes that ran out first: a caller done early)
        if not left and next(lines, None) is not None:
            self._changed(self.count + 1 + sum(1 for _ in lines))

    def _changed(self, read: int) -> NoReturn:
        raise DataError(self.path, f"changed while it was encoded: {self.count} lines when counted, "
                                   f"{read} when read")


def encode_file_streaming(embedder: Any, source: SentenceFile | str | os.PathLike[str],
                          output: str | os.PathLike[str], batch_size: int = 64, chunk_sentences: int | None = None,
                          show_progress: bool = True, where: str | None = None) -> tuple[int, int]:
    """Encode every line of ``source`` into ``output``, a float32 ``.npy`` matrix (row i: line i), written
    atomically: on any error (a NaN vector, a failing model, a full disk, an interrupt) ``output`` stays as it
    was and no partial file is left. Returns the matrix's shape.

    ``chunk_sentences``: sentences read and encoded at a time (default: the embedder's ``chunk_size``,
    else 16,384); what stays in memory scales with it, not with the file. ``where``: who produced the
    vectors, for the error a non-finite vector raises (:func:`check_finite_vectors`; nothing is written).
    """
    if batch_size < 1 or (chunk_sentences is not None and chunk_sentences < 1):
        raise ValueError(f"batch_size and chunk_sentences must be positive, got {batch_size}, {chunk_sentences}")
    source = source if isinstance(source, SentenceFile) else SentenceFile(source)
    n = len(source)
    where = where or f"model {type(embedder).__name__}"
    if str(getattr(embedder, "device", "cpu")).startswith("cpu"):
        tune_malloc(STREAM_MMAP_THRESHOLD)  # the first tuning of a process holds: `mixsp encode`'s is this one
    with stage_progress("encode", show=show_progress), contextlib.closing(
            _blocks(embedder, source, batch_size, chunk_sentences, show_progress)) as blocks:
        block = next(blocks, None)
        if block is None:  # an empty file: the model still says how wide its (0, dim) matrix is
            width = np.asarray(embedder.encode([], batch_size=batch_size)).shape[-1]
        else:
            width = np.shape(block[1])[1]
        finite = np.ones(n, dtype=bool)
        written = 0
        with writing_npy_rows(output, (n, width), "float32") as write:
            while block is not None:
                rows, vectors = block
                vectors = np.asarray(vectors, dtype=np.float32)
                finite[rows] = np.isfinite(vectors).all(axis=1)
                write(rows, vectors)
                written += len(vectors)
                del block, rows, vectors  # not held while the next chunk is encoded
                block = next(blocks, None)
            if written != n:
                raise RuntimeError(f"{where}: gave {written} vectors for {n} sentences; nothing was written")
            if not finite.all():  # the rows' verdicts, in the one message of a whole-matrix check
                check_finite_vectors(np.where(finite, 0.0, np.nan).astype(np.float32)[:, None], where)
    return n, width


def _blocks(embedder: Any, source: SentenceFile, batch_size: int, chunk_sentences: int | None,
            show_progress: bool) -> Iterator[tuple[Any, np.ndarray]]:
    """``(rows, vectors)`` blocks covering every line of ``source`` once."""
    if getattr(type(embedder), "encode_stream", None) is not None:  # the class's own, not a wrapper's forward
        sizes = chunk_sizes(chunk_sentences or int(getattr(embedder, "chunk_size", CHUNK_SENTENCES)))
        yield from embedder.encode_stream(source.chunks(sizes), batch_size=batch_size,
                                          show_progress=show_progress, total=len(source))
        return
    start = 0
    for chunk in source.chunks(itertools.repeat(chunk_sentences or CHUNK_SENTENCES)):
        vectors = np.asarray(embedder.encode(chunk, batch_size=batch_size))
        if vectors.ndim != 2 or len(vectors) != len(chunk):
            raise RuntimeError(f"{type(embedder).__name__}.encode gave shape {vectors.shape} for "
                               f"{len(chunk)} sentences")
        start += len(chunk)
        yield slice(start - len(chunk), start), vectors
        del chunk, vectors  # not held while the next chunk is encoded
