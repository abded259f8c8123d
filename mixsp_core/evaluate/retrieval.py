"""Retrieval check: do compressed variants find the same neighbours as the full model?

For each variant an exact (brute-force) index is built over the corpus in the variant's stored form
(float32, int8 codes, packed bits) and searched with the queries; recall@k is the overlap of its top-k
with the full-dimension float32 model's exact top-k (cosine). Queries per second (search only, numpy on
this machine, queries in blocks) and the index's memory are reported beside it.

Scoring per stored form: float32 by cosine; int8 by cosine against the decoded vectors (asymmetric:
float queries, int8 codes, as FAISS's SQ8); binary by Hamming distance between packed bits.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from mixsp_core.compress.quantize import BinaryQuantizer, Int8Quantizer
from mixsp_core.compress.transform import TransformChain, as_matrix

# Corpus rows scored per block: keeps the (queries, block) working arrays near 64 MB.
_BLOCK_BYTES = 64 * 2**20


@dataclass
class Variant:
    """One compressed form of the model: ``corpus`` / ``queries`` are the embedder's float vectors for
    this variant (for example from a model cut to fewer layers), and ``chain`` the fitted transform
    (projection and/or quantiser; None: float32 as is)."""

    name: str
    corpus: np.ndarray
    queries: np.ndarray
    chain: TransformChain | None = None


@dataclass
class VariantResult:
    name: str
    dims: int
    vector_type: str
    recall_at_k: float
    qps: float
    index_bytes: int
    bytes_per_vector: int


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Column indices of the k largest scores of each row, best first."""
    k = min(k, scores.shape[1])
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.take_along_axis(-scores, part, axis=1).argsort(axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


def _stream_top_k(n: int, n_queries: int, k: int, score_block: Callable[[int, int], np.ndarray],
                  row_bytes: int) -> np.ndarray:
    """Exact top-k over corpus rows 0..n, scored in blocks ``score_block(lo, hi) -> (q, hi - lo)``
    (higher is better), keeping a running best k per query: memory stays bounded for any corpus.
    ``row_bytes``: working bytes per (query, corpus row) cell, to size the blocks."""
    block = max(k, _BLOCK_BYTES // max(1, row_bytes * n_queries))
    best_scores = np.full((n_queries, 0), -np.inf, dtype=np.float32)
    best_ids = np.zeros((n_queries, 0), dtype=np.int64)
    for lo in range(0, n, block):
        hi = min(n, lo + block)
        scores = np.concatenate([best_scores, score_block(lo, hi).astype(np.float32)], axis=1)
        ids = np.concatenate([best_ids, np.broadcast_to(np.arange(lo, hi), (n_queries, hi - lo))], axis=1)
        keep = _top_k(scores, k)
        best_scores = np.take_along_axis(scores, keep, axis=1)
        best_ids = np.take_along_axis(ids, keep, axis=1)
    return best_ids


def search_float(index: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact cosine top-k (q, k) of each query over float32 ``index`` rows."""
    index = _normalize(as_matrix(index, "index"))
    queries = _normalize(as_matrix(queries, "queries"))
    return _stream_top_k(len(index), len(queries), k, lambda lo, hi: queries @ index[lo:hi].T, 16)


def search_int8(codes: np.ndarray, quantizer: Int8Quantizer, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact cosine top-k against the decoded int8 vectors, computed from the codes block by block:
    q·decode(c) = (q * step)·c + q·(128 * step + low), divided by the decoded vector's norm."""
    assert quantizer.step is not None and quantizer.low is not None
    queries = as_matrix(queries, "queries")
    scaled = queries * quantizer.step
    offset = (queries @ (128.0 * quantizer.step + quantizer.low))[:, None]

    def score(lo: int, hi: int) -> np.ndarray:
        block = codes[lo:hi].astype(np.float32)
        norms = np.linalg.norm((block + 128.0) * quantizer.step + quantizer.low, axis=1)
        return (scaled @ block.T + offset) / np.maximum(norms, 1e-12)[None, :]

    return _stream_top_k(len(codes), len(queries), k, score, 16)


def _as_words(packed: np.ndarray) -> np.ndarray:
    """Packed bytes viewed as uint64 words (zero-padded) so popcount runs on 8 bytes at a time."""
    pad = (-packed.shape[1]) % 8
    if pad:
        packed = np.pad(packed, ((0, 0), (0, pad)))
    return np.ascontiguousarray(packed).view(np.uint64)


def search_binary(packed_index: np.ndarray, packed_queries: np.ndarray, k: int) -> np.ndarray:
    """Exact Hamming top-k (smallest distance first) over packed bit rows."""
    index = _as_words(packed_index)
    queries = _as_words(packed_queries)

    def score(lo: int, hi: int) -> np.ndarray:
        distance = np.bitwise_count(queries[:, None, :] ^ index[None, lo:hi, :]).sum(axis=2, dtype=np.int32)
        return -distance

    return _stream_top_k(len(index), len(queries), k, score, 8 * index.shape[1] + 16)


def _search_variant(variant: Variant, k: int) -> tuple[np.ndarray, float, int, int, str]:
    """(top-k ids, search seconds, index bytes, dims, vector type) of one variant."""
    chain = variant.chain
    if chain is None:
        index = as_matrix(variant.corpus, f"{variant.name}.corpus")
        start = time.perf_counter()
        ids = search_float(index, variant.queries, k)
        return ids, time.perf_counter() - start, index.nbytes, index.shape[1], "float32"
    head = chain.steps[:-1]
    last = chain.steps[-1]
    corpus, queries = variant.corpus, variant.queries
    for step in head:
        corpus, queries = step.apply(corpus), step.apply(queries)
    stored = last.store(corpus)
    start = time.perf_counter()
    if isinstance(last, Int8Quantizer):
        ids = search_int8(stored, last, queries, k)
    elif isinstance(last, BinaryQuantizer):
        ids = search_binary(stored, last.pack(queries), k)
    else:
        ids = search_float(stored, last.apply(queries), k)
    return ids, time.perf_counter() - start, stored.nbytes, chain.output_dim, chain.vector_type


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries of |found ∩ truth| / k (rows of neighbour ids, k columns each)."""
    if found.shape != truth.shape:
        raise ValueError(f"found {found.shape} and truth {truth.shape} differ")
    hits = [len(np.intersect1d(f, t, assume_unique=True)) for f, t in zip(found, truth)]
    return float(np.mean(hits) / truth.shape[1])


def retrieval_check(reference_corpus: np.ndarray, reference_queries: np.ndarray, variants: Sequence[Variant],
                    k: int = 10) -> dict[str, Any]:
    """Recall@k of each variant against exact float32 search with the full model's vectors
    (``reference_corpus`` (n, d), ``reference_queries`` (q, d)), with QPS and index bytes.

    Returns ``{"k", "corpus", "queries", "reference": {...}, "variants": [VariantResult as dict]}``.
    """
    n = len(reference_corpus)
    if not 1 <= k <= n:
        raise ValueError(f"k must lie in 1..{n} (the corpus size), got {k}")
    for v in variants:
        if len(v.corpus) != n or len(v.queries) != len(reference_queries):
            raise ValueError(f"variant {v.name}: {len(v.corpus)} corpus / {len(v.queries)} query rows, "
                             f"expected {n} / {len(reference_queries)}")
    reference = Variant("full float32", reference_corpus, reference_queries, None)
    truth, seconds, nbytes, dims, _ = _search_variant(reference, k)
    results = [VariantResult(reference.name, dims, "float32", 1.0, len(truth) / max(seconds, 1e-9), nbytes,
                             nbytes // n)]
    for variant in tqdm(variants, desc="retrieval", unit="variant"):
        ids, seconds, nbytes, dims, vtype = _search_variant(variant, k)
        results.append(VariantResult(variant.name, dims, vtype, recall_at_k(ids, truth),
                                     len(ids) / max(seconds, 1e-9), nbytes, nbytes // n))
    return {"k": k, "corpus": n, "queries": len(reference_queries),
            "variants": [asdict(r) for r in results]}


def format_retrieval(report: dict[str, Any]) -> str:
    """A markdown table of :func:`retrieval_check`'s report."""
    k = report["k"]
    lines = [f"corpus {report['corpus']:,} sentences, {report['queries']:,} queries, exact search",
             "", f"| variant | dims | vector | recall@{k} | QPS | index MB | bytes/vec |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: |"]
    for r in report["variants"]:
        lines.append(f"| {r['name']} | {r['dims']} | {r['vector_type']} | {r['recall_at_k']:.3f} | "
                     f"{r['qps']:.0f} | {r['index_bytes'] / 2**20:.2f} | {r['bytes_per_vector']} |")
    return "\n".join(lines)
