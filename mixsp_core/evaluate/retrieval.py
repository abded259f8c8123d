"""Retrieval check: do compressed variants find the same neighbours as the full model?

For each variant an exact (brute-force) index is built over the corpus in the variant's stored form
(float32, int8 codes, packed bits) and searched with the queries; recall@k is the overlap of its top-k
with the full-dimension float32 model's exact top-k (cosine). Queries per second (search only, numpy on
this machine, queries in blocks) and the index's memory are reported beside it.

Scoring per stored form: float32 by cosine (rows stored unit length); int8 by cosine against the
decoded vectors (asymmetric: float queries, int8 codes, as FAISS's SQ8; the decoded norms are kept
beside the codes); binary by Hamming distance between packed bits. Index memory counts the stored
vectors only (int8's norms add 4 bytes per vector, the quantiser's per-dim ranges 8 bytes per dim).
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


def _stream_top_k(n: int, n_queries: int, k: int, score_block: Callable[[int, int], np.ndarray],
                  row_bytes: int) -> np.ndarray:
    """Exact top-k (q, k) over corpus rows 0..n, best first, scored in blocks
    ``score_block(lo, hi) -> (q, hi - lo)`` (higher is better) and merged into a running best k per query,
    so memory stays bounded for any corpus. ``row_bytes``: working bytes per (query, row) cell.

    Selection uses ``torch.topk`` (multi-threaded on CPU), which dominates numpy's argpartition here.
    """
    import torch

    block = max(k, _BLOCK_BYTES // max(1, row_bytes * n_queries))
    best_scores = torch.empty((n_queries, 0), dtype=torch.float32)
    best_ids = torch.empty((n_queries, 0), dtype=torch.int64)
    for lo in range(0, n, block):
        hi = min(n, lo + block)
        scores = torch.from_numpy(np.ascontiguousarray(score_block(lo, hi), dtype=np.float32))
        values, ids = scores.topk(min(k, hi - lo), dim=1)
        values = torch.cat([best_scores, values], dim=1)
        ids = torch.cat([best_ids, ids + lo], dim=1)
        keep = values.topk(min(k, values.shape[1]), dim=1).indices
        best_scores, best_ids = values.gather(1, keep), ids.gather(1, keep)
    return best_ids.numpy()


def search_float(index: np.ndarray, queries: np.ndarray, k: int, normalized: bool = False) -> np.ndarray:
    """Exact cosine top-k (q, k) of each query over float32 ``index`` rows (``normalized``: the rows
    are already unit length, as an index stores them)."""
    index = as_matrix(index, "index") if normalized else _normalize(as_matrix(index, "index"))
    queries = _normalize(as_matrix(queries, "queries"))
    return _stream_top_k(len(index), len(queries), k, lambda lo, hi: queries @ index[lo:hi].T, 16)


def int8_norms(codes: np.ndarray, quantizer: Int8Quantizer) -> np.ndarray:
    """Norms of the decoded vectors, kept beside the codes (4 bytes per vector) for cosine search."""
    return np.concatenate([np.linalg.norm(quantizer.dequantize(codes[i:i + 65536]), axis=1)
                           for i in range(0, len(codes), 65536)]).astype(np.float32)


def search_int8(codes: np.ndarray, quantizer: Int8Quantizer, queries: np.ndarray, k: int,
                norms: np.ndarray | None = None) -> np.ndarray:
    """Exact cosine top-k against the decoded int8 vectors, computed from the codes block by block:
    q·decode(c) = (q * step)·c + q·(128 * step + low), divided by the decoded vector's norm
    (``norms`` from :func:`int8_norms`, computed here when not given)."""
    assert quantizer.step is not None and quantizer.low is not None
    queries = as_matrix(queries, "queries")
    inv_norms = 1.0 / np.maximum(int8_norms(codes, quantizer) if norms is None else norms, 1e-12)
    scaled = queries * quantizer.step
    offset = (queries @ (128.0 * quantizer.step + quantizer.low))[:, None]

    def score(lo: int, hi: int) -> np.ndarray:
        return (scaled @ codes[lo:hi].T.astype(np.float32) + offset) * inv_norms[None, lo:hi]

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

    columns = [np.ascontiguousarray(index[:, w]) for w in range(index.shape[1])]

    def score(lo: int, hi: int) -> np.ndarray:
        # One 64-bit word at a time: 2-D XOR + popcount, no (q, rows, words) cube.
        distance = np.zeros((len(queries), hi - lo), dtype=np.int32)
        for w, column in enumerate(columns):
            distance += np.bitwise_count(queries[:, w, None] ^ column[None, lo:hi])
        return -distance

    return _stream_top_k(len(index), len(queries), k, score, 32)


def _search_variant(variant: Variant, k: int) -> tuple[np.ndarray, float, int, int, str]:
    """(top-k ids, search seconds, index bytes, dims, vector type) of one variant."""
    chain = variant.chain
    if chain is None:
        index = _normalize(as_matrix(variant.corpus, f"{variant.name}.corpus"))
        start = time.perf_counter()
        ids = search_float(index, variant.queries, k, normalized=True)
        return ids, time.perf_counter() - start, index.nbytes, index.shape[1], "float32"
    head = chain.steps[:-1]
    last = chain.steps[-1]
    corpus, queries = variant.corpus, variant.queries
    for step in head:
        corpus, queries = step.apply(corpus), step.apply(queries)
    # Index build (not timed): what the index stores, plus int8's decoded norms.
    stored = last.store(corpus)
    if isinstance(last, Int8Quantizer):
        norms = int8_norms(stored, last)
        start = time.perf_counter()
        ids = search_int8(stored, last, queries, k, norms=norms)
    elif isinstance(last, BinaryQuantizer):
        start = time.perf_counter()
        ids = search_binary(stored, last.pack(queries), k)
    else:
        stored = _normalize(stored)
        start = time.perf_counter()
        ids = search_float(stored, last.apply(queries), k, normalized=True)
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
