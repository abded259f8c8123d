"""Where the time of one fast-path encode goes: ``python -m benchmarks.profile_encode [--device cuda]``.

Times, on the same sentences: bulk tokenisation alone (at several thread counts), tokenisation plus
batch planning, the model's forward passes alone over pre-made batches, and the whole
``Encoder.encode`` at several token budgets. The gap between the parts and the whole is the host
overhead left to remove. Prints one markdown table; a diagnostic, not part of ``make bench``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.corpus import SHIPPED_CORPUS, read_sentences
from benchmarks.models import MODELS, random_init_dir
from mixsp_core.models.batching import BulkTokenizer, stream_plans
from mixsp_core.models.encoder import Encoder


def timed(fn, repeats: int, sync: bool) -> tuple[list[float], object]:
    """Seconds of each of ``repeats`` calls of ``fn`` (after one warm-up call) and the last result."""
    out = fn()
    times = []
    for _ in range(repeats):
        if sync:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if sync:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times, out


def forward_passes(model: torch.nn.Module, plans: list, device: str):
    """A function running ``model`` over the batches of ``plans`` (their ids already on ``device``, a
    padding mask for padded batches), the outputs dropped: the model's share of an encode alone."""
    on_device = [(torch.from_numpy(p.ids).to(device), p) for p in plans]

    def run() -> None:
        with torch.inference_mode():
            for ids, p in on_device:
                for b in p.batches:
                    x = ids[b.token_start:b.token_start + b.size * b.length].view(b.size, b.length)
                    mask = None
                    if b.padded:
                        lengths = torch.from_numpy(p.lengths[b.row_start:b.row_start + b.size]).to(device)
                        mask = (torch.arange(b.length, device=device)[None, :] < lengths[:, None]).long()
                    model(input_ids=x, attention_mask=mask).last_hidden_state

    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--models", default="minilm,mpnet")
    parser.add_argument("--sentences", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budgets", default="65536,131072,262144")
    parser.add_argument("--threads", default="1,8")
    args = parser.parse_args(argv)
    sentences = read_sentences(SHIPPED_CORPUS)[: args.sentences]
    n = len(sentences)
    cuda = args.device.startswith("cuda")
    rows: list[tuple[str, str, float]] = []

    def row(model: str, what: str, times: list[float]) -> None:
        seconds = statistics.median(times)
        rows.append((model, what, seconds))
        print(f"| {model} | {what} | {seconds * 1000:,.0f} ms | {n / seconds:,.0f} sent/s |", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        for key in args.models.split(","):
            folder = random_init_dir(MODELS[key], Path(tmp) / key)
            enc = Encoder(folder, device=args.device, show_progress=False)
            for threads in [int(t) for t in args.threads.split(",")]:
                bulk = BulkTokenizer(enc.tokenizer, enc.max_length, threads)
                seconds, tokens = timed(lambda bulk=bulk: bulk(sentences), args.repeats, False)
                row(key, f"tokenise, {threads} threads", seconds)
            lengths = tokens.lengths
            print(f"{key}: mean {lengths.mean():.1f} tokens, max {lengths.max()}, {len(np.unique(lengths))} lengths")
            for budget in [int(b) for b in args.budgets.split(",")]:
                bulk = enc._bulk_tokenizer()
                seconds, plans = timed(lambda: list(stream_plans(sentences, bulk, 64, budget, merge_tail=cuda)),
                                       args.repeats, False)
                batches = sum(len(p.batches) for p in plans)
                row(key, f"tokenise+plan, budget {budget} ({batches} batches)", seconds)
                seconds, _ = timed(forward_passes(enc.inference_model(), plans, args.device), args.repeats, cuda)
                row(key, f"forward only, budget {budget}", seconds)
                enc.token_budget = budget
                seconds, _ = timed(lambda: enc.encode(sentences), args.repeats, cuda)
                row(key, f"encode end to end, budget {budget}", seconds)
            del enc
            if cuda:
                torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
