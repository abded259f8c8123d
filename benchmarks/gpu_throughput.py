"""GPU end-to-end throughput, ours against sentence-transformers, with the profile of where time goes.

``python -m benchmarks.gpu_throughput --model minilm=DIR --model mpnet=DIR --out report.json``

For each model (a local sentence-transformers / HF folder) on the same corpus sentences (default 100k
of ``benchmarks/data/corpus-100k.txt.gz``): sentence-transformers' ``encode`` in fp32 and fp16
(``model.half()``) at each batch size of ``--st-batches`` (its best taken), and ``Encoder.encode``
(bf16, length-sorted batches, each chunk planned whole) with the tokeniser in threads of one process and
in a process pool (at each chunk size of ``--chunk-sizes``), each median of ``--repeats`` after a warm-up,
text in, normalised float32 vectors on the host out (``--st-batches ""``: ours only). The profile rows time the parts alone: tokenising (threads / pool), tokenise + plan, and the
forward passes over pre-made batches (the GPU's bound). Needs only torch, transformers and
sentence-transformers (what the H200 machine has).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from benchmarks.corpus import SHIPPED_CORPUS, read_sentences
from benchmarks.profile_encode import forward_passes
from benchmarks.profile_encode import timed as profile_timed
from mixsp_core.models.batching import CUDA_CHUNK_SENTENCES, BulkTokenizer, stream_plans
from mixsp_core.models.encoder import Encoder
from mixsp_core.models.tokenize_pool import TokenizerProcessPool


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: a smoke run of the script only


def timed(fn: Callable[[], Any], repeats: int) -> tuple[list[float], Any]:
    """:func:`benchmarks.profile_encode.timed`, CUDA synchronised where it runs."""
    return profile_timed(fn, repeats, DEVICE == "cuda")


def rate_row(model: str, what: str, n: int, seconds: list[float], **extra: Any) -> dict[str, Any]:
    rates = sorted(n / s for s in seconds)
    row = {"model": model, "what": what, "sentences": n, "seconds": seconds,
           "rate": {"median": statistics.median(rates), "min": rates[0], "max": rates[-1]}, **extra}
    print(f"| {model} | {what} | {row['rate']['median']:,.0f} ({rates[0]:,.0f}-{rates[-1]:,.0f}) |", flush=True)
    return row


def st_rows(key: str, folder: str, sentences: list[str], batches: list[int], repeats: int) -> list[dict]:
    from sentence_transformers import SentenceTransformer

    rows = []
    for precision in ("fp32", "fp16"):
        model = SentenceTransformer(folder, device=DEVICE, model_kwargs={"dtype": torch.float32})
        if precision == "fp16":
            model.half()
        sweep, part = {}, sentences[:20000]
        for b in batches:  # one pass per size on a slice, then the best size in full
            seconds, _ = timed(lambda b=b: model.encode(part, batch_size=b, normalize_embeddings=True,
                                                        convert_to_numpy=True), 1)
            sweep[b] = len(part) / seconds[0]
        best = max(sweep, key=sweep.get)
        seconds, vectors = timed(lambda: model.encode(sentences, batch_size=best, normalize_embeddings=True,
                                                      convert_to_numpy=True), repeats)
        rows.append(rate_row(key, f"st {precision} b{best}", len(sentences), seconds, sweep=sweep,
                             batch_size=best, side="st", precision=precision))
        if precision == "fp32":
            reference = np.asarray(vectors, dtype=np.float32)
        del model
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    return rows, reference


def mixsp_rows(key: str, folder: str, sentences: list[str], reference: np.ndarray, repeats: int,
               budgets: list[int], processes: int, chunk_sizes: list[int]) -> list[dict]:
    enc = Encoder(folder, device=DEVICE, show_progress=False)
    rows = []
    n = len(sentences)
    threads = BulkTokenizer(enc.tokenizer, enc.max_length, 8)
    pool = TokenizerProcessPool(enc.tokenizer, enc.max_length, processes)
    for name, tok in (("threads x8", threads), (f"pool x{processes}", pool)):
        seconds, _ = timed(lambda tok=tok: tok(sentences), repeats)
        rows.append(rate_row(key, f"profile: tokenise, {name}", n, seconds, side="profile"))
    pool.close()  # its processes not idle beside the encoder's own during the end-to-end runs
    for budget in budgets:
        enc.token_budget = budget
        enc.tokenize_processes = processes
        bulk = enc._bulk_tokenizer()
        seconds, plans = timed(lambda: list(stream_plans(sentences, bulk, 64, budget, chunk_size=enc.chunk_size,
                                                         merge_tail=enc.merge_tail)), repeats)
        nb = sum(len(p.batches) for p in plans)
        rows.append(rate_row(key, f"profile: tokenise+plan (pool), budget {budget}, {nb} batches", n, seconds,
                             side="profile"))
        seconds, _ = timed(forward_passes(enc.inference_model(), plans, DEVICE), repeats)
        rows.append(rate_row(key, f"profile: forward only (bound), budget {budget}", n, seconds, side="profile"))
        default_chunk = enc.chunk_size
        runs = [(0, default_chunk, "tokeniser threads")]
        runs += [(processes, c, f"pool x{processes}, chunks of {c}") for c in chunk_sizes]
        for processes_now, chunk, label in runs:
            enc.tokenize_processes, enc.chunk_size = processes_now, chunk
            seconds, vectors = timed(lambda: enc.encode(sentences), repeats)
            diff = cos = None
            if reference is not None:
                diff = float(np.abs(np.asarray(vectors) - reference).max())
                cos = float(np.min(np.sum(np.asarray(vectors) * reference, axis=1)))
            rows.append(rate_row(key, f"mixsp bf16 budget {budget}, {label}", n, seconds, side="mixsp",
                                 max_abs_diff_vs_st_fp32=diff, min_cosine_vs_st_fp32=cos, chunk_size=chunk))
        enc.chunk_size = default_chunk
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", action="append", required=True, help="KEY=FOLDER (repeatable)")
    parser.add_argument("--sentences", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--st-batches", default="64,128,256,512")
    parser.add_argument("--budgets", default="65536,131072")
    parser.add_argument("--processes", type=int, default=14)
    parser.add_argument("--chunk-sizes", default=str(CUDA_CHUNK_SENTENCES),
                        help="sentences per planned chunk for the pool runs (comma-separated sweep)")
    parser.add_argument("--out", default="gpu_throughput.json")
    args = parser.parse_args(argv)
    sentences = read_sentences(SHIPPED_CORPUS)[: args.sentences]
    report: dict[str, Any] = {"gpu": torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu", "torch": torch.__version__,
                              "sentences": len(sentences), "rows": []}
    for spec in args.model:
        key, folder = spec.split("=", 1)
        rows, reference = [], None
        if args.st_batches:  # "": ours only (a quicker sweep)
            rows, reference = st_rows(key, folder, sentences, [int(b) for b in args.st_batches.split(",")],
                                      args.repeats)
        report["rows"] += rows
        report["rows"] += mixsp_rows(key, folder, sentences, reference, args.repeats,
                                     [int(b) for b in args.budgets.split(",")], args.processes,
                                     [int(c) for c in args.chunk_sizes.split(",")])
        Path(args.out).write_text(json.dumps(report, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
