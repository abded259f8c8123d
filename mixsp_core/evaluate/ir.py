"""Retrieval evaluation (CoDiEmb's IR side): recall@10 and MRR@10 over a corpus of >= 100k sentences.

Corpus: every unique sentence of SNLI dev + test, SICK (train, trial), the SentEval classification sets
(MR, CR, SUBJ, MPQA, TREC, SST) and STS-B train + dev; never the STS12-16 / STS-B / SICK test sets.
Queries with known positives: SNLI *test* premises -> their entailed hypotheses, and STS-B dev pairs scored
>= 4 (sentence1 -> sentence2; a sentence1 of several such pairs has several positives). The query's own
text, which is in the corpus, is left out of its ranking.

Metrics (exact cosine search, :func:`mixsp_core.evaluate.retrieval.search_float`), each a mean over queries:
recall@k = |positives in the top k| / |positives| (BEIR's); MRR@k = 1 / rank of the first positive in the top
k, 0 when none is. Reported over all queries and per query source.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mixsp_core.data.corpus import default_corpus_files, nli_groups, read_corpus_file
from mixsp_core.data.senteval import read_sick_file, read_stsb_file, read_text_lines
from mixsp_core.errors import DataError
from mixsp_core.evaluate.retrieval import search_float

log = logging.getLogger(__name__)

K = 10
STSB_POSITIVE = 4.0  # STS-B dev pairs scored at least this are a query and its positive
SOURCES = ("snli-test", "stsb-dev")


@dataclass(frozen=True)
class IRBenchmark:
    """``corpus`` sentences; per query its text, its source, its positives' and its own corpus rows (-1: absent)."""

    corpus: list[str]
    queries: list[str]
    sources: list[str]
    positives: list[np.ndarray]
    own_rows: np.ndarray


def _queries(root: Path) -> dict[tuple[str, str], list[str]]:
    """(source, query) -> positives, in file order."""
    found: dict[tuple[str, str], list[str]] = {}
    for premise, (entailed, _) in nli_groups(root / "SNLI", "test").items():
        if entailed:
            found[("snli-test", premise)] = list(dict.fromkeys(entailed))
    dev = read_stsb_file(root / "STS" / "STSBenchmark" / "sts-dev.csv", "dev")
    for left, right in dev.loc[dev["score"] >= STSB_POSITIVE, ["sentence1", "sentence2"]].itertuples(index=False):
        positives = found.setdefault(("stsb-dev", left.strip()), [])
        if right.strip() not in positives:
            positives.append(right.strip())
    return {key: [p for p in positives if p != key[1]] for key, positives in found.items()
            if any(p != key[1] for p in positives)}


def _corpus_sentences(root: Path) -> list[str]:
    """Every corpus sentence (duplicates included), in a fixed order."""
    sentences: list[str] = []
    for split in ("dev", "test"):
        for premise, (entailed, contradicted) in nli_groups(root / "SNLI", split).items():
            sentences += [premise, *entailed, *contradicted]
        # neutral hypotheses are corpus sentences too (distractors); nli_groups drops them
        labels, hypotheses = (read_text_lines(root / "SNLI" / f"{name}.{split}") for name in ("labels", "s2"))
        sentences += [h for h, label in zip(hypotheses, labels) if label.strip() == "neutral"]
    for split, name in (("train", "SICK_train.txt"), ("dev", "SICK_trial.txt")):
        frame = read_sick_file(root / "SICK" / name, split)
        sentences += [*frame["sentence1"], *frame["sentence2"]]
    for file in default_corpus_files(root):
        sentences += read_corpus_file(file)
    for split, name in (("train", "sts-train.csv"), ("dev", "sts-dev.csv")):
        frame = read_stsb_file(root / "STS" / "STSBenchmark" / name, split)
        sentences += [*frame["sentence1"], *frame["sentence2"]]
    return [s.strip() for s in sentences if s.strip()]


def build_ir_benchmark(senteval_dir: str | Path, max_corpus: int = 0, seed: int = 0) -> IRBenchmark:
    """The benchmark of the module doc from a SentEval directory. ``max_corpus`` > 0 keeps every positive and
    fills the rest of the corpus with a seeded sample of the other sentences (for quick runs)."""
    root = Path(senteval_dir)
    if not (root / "SNLI").is_dir():
        raise DataError(root, "no SNLI folder: the IR benchmark needs SentEval's SNLI, SICK, STS-B and text sets")
    found = _queries(root)
    needed = list(dict.fromkeys(p for positives in found.values() for p in positives))
    known = set(needed)
    others = [s for s in dict.fromkeys(_corpus_sentences(root)) if s not in known]
    if max_corpus:
        if max_corpus < len(needed):
            raise DataError(root, f"--max-corpus {max_corpus} is below the {len(needed)} positives of the queries")
        keep = np.sort(np.random.default_rng(seed).permutation(len(others))[:max_corpus - len(needed)])
        others = [others[i] for i in keep]
    corpus = needed + others
    row = {s: i for i, s in enumerate(corpus)}
    keys = list(found)
    return IRBenchmark(corpus, [q for _, q in keys], [source for source, _ in keys],
                       [np.array([row[p] for p in found[key]], dtype=np.int64) for key in keys],
                       np.array([row.get(q, -1) for _, q in keys], dtype=np.int64))


def ir_metrics(ranked: np.ndarray, positives: list[np.ndarray], k: int = K) -> dict[str, float]:
    """Mean recall@k and MRR@k of ``ranked`` (queries, >= k) corpus rows, best first, against ``positives``."""
    recall, mrr = [], []
    for found, relevant in zip(ranked[:, :k], positives):
        hits = np.isin(found, relevant)
        recall.append(hits.sum() / len(relevant))
        mrr.append(1.0 / (1 + int(np.argmax(hits))) if hits.any() else 0.0)
    return {f"recall@{k}": float(np.mean(recall)), f"mrr@{k}": float(np.mean(mrr))}


def rank_without_self(corpus: np.ndarray, queries: np.ndarray, own_rows: np.ndarray, k: int = K) -> np.ndarray:
    """Exact cosine top-k corpus rows per query, the query's own row (``own_rows``, -1: none) left out."""
    if len(corpus) <= k:
        raise ValueError(f"the corpus needs more than k = {k} sentences, got {len(corpus)}")
    top = search_float(corpus, queries, k + 1)
    return np.stack([row[row != own][:k] for row, own in zip(top, own_rows)])


def evaluate_ir(embedder: Any, benchmark: IRBenchmark, batch_size: int = 128, k: int = K) -> dict[str, Any]:
    """Encode the corpus and queries with ``embedder`` (``.encode(sentences, batch_size=...)``) and score them."""
    corpus = embedder.encode(benchmark.corpus, batch_size=batch_size, show_progress=False)
    queries = embedder.encode(benchmark.queries, batch_size=batch_size, show_progress=False)
    ranked = rank_without_self(np.asarray(corpus, np.float32), np.asarray(queries, np.float32), benchmark.own_rows, k)
    sources = np.asarray(benchmark.sources)
    result: dict[str, Any] = {"corpus": len(benchmark.corpus), "queries": len(benchmark.queries),
                              **ir_metrics(ranked, benchmark.positives, k)}
    for source in SOURCES:
        rows = np.flatnonzero(sources == source)
        if len(rows):
            result[source] = {"queries": len(rows), **ir_metrics(ranked[rows], [benchmark.positives[i] for i in rows], k)}
    return result


def report_ir(model: Any, config: Any, run: Any, tracker: Any, step: int) -> dict[str, Any]:
    """``train.retrieval_eval``: the IR metrics of the best checkpoint ``model``, added to ``metrics.json``
    (key ``ir``) and logged as ``ir/recall@10`` and ``ir/mrr@10``."""
    import json

    from mixsp_core.io import write_json_atomic
    from mixsp_core.training.batches import snli_folder

    benchmark = build_ir_benchmark(snli_folder(config).parent, config.train.retrieval_eval_max_corpus, config.seed)
    result = evaluate_ir(model, benchmark, config.train.eval_batch_size)
    # SNLI test triplets in training would make the snli-test queries seen (data.nli_splits)
    result["snli_test_in_training"] = bool(config.data.nli and "test" in config.data.nli_splits)
    report = json.loads(Path(run.metrics).read_text(encoding="utf-8"))
    report["ir"] = result
    write_json_atomic(run.metrics, report)
    tracker.log_metrics({f"ir/{name}": result[name] for name in (f"recall@{K}", f"mrr@{K}")}, step)
    log.info("IR (%d corpus, %d queries): recall@%d %.4f, MRR@%d %.4f", result["corpus"], result["queries"], K,
             result[f"recall@{K}"], K, result[f"mrr@{K}"])
    return result
