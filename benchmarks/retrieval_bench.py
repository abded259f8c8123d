"""Retrieval at 128 vs full dimensions: exact top-10 over the benchmark's sample, with
:func:`mixsp_core.evaluate.retrieval.retrieval_check` (recall@10 against the full-dimension float32
reference, queries per second, index bytes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.corpus import REPO_ROOT

TEACHER_CACHE = REPO_ROOT / "data" / "teacher"


def teacher_vectors(sentences: list[str], cache_dir: Path = TEACHER_CACHE) -> np.ndarray | None:
    """The cached teacher embeddings of ``sentences`` when the pipeline's cache holds all of them."""
    if not (cache_dir / "embeddings.npy").is_file():
        return None
    from mixsp_core.teacher.cache import TeacherCache

    cache = TeacherCache(cache_dir, "sentence-transformers/all-mpnet-base-v2")
    if cache.missing(sentences):
        return None
    return cache.lookup(sentences)


def run_retrieval(vectors: dict[str, tuple[np.ndarray, np.ndarray]], reference: str, k: int = 10) -> dict[str, Any]:
    """``vectors``: name -> (corpus rows, query rows), all for the same sentences; ``reference`` names
    the full-dimension model whose exact float32 top-k is the truth. Adds a PCA-128 (float32 and
    int8) compression of the reference as variants. Returns retrieval_check's report (+ notes)."""
    try:
        from mixsp_core.compress import make_step
        from mixsp_core.compress.transform import TransformChain
        from mixsp_core.evaluate.retrieval import Variant, retrieval_check
    except ImportError as err:
        return {"note": f"mixsp_core.evaluate.retrieval is not available ({err})"}
    ref_corpus, ref_queries = vectors[reference]
    variants = [Variant(f"{name} ({c.shape[1]}-d)", c, q) for name, (c, q) in vectors.items() if name != reference]
    dims = 128
    if ref_corpus.shape[1] > dims and len(ref_corpus) > dims:
        for spec in (["pca:128"], ["pca:128", "int8"]):
            chain = TransformChain([make_step(s) for s in spec]).fit(ref_corpus)
            variants.append(Variant(f"{reference} {chain.name}", ref_corpus, ref_queries, chain))
    report = retrieval_check(ref_corpus, ref_queries, variants, k=k)
    report["reference_model"] = reference
    return report
