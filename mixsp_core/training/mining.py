"""Conan-embedding's dynamic hard-negative mining for the NLI InfoNCE term.

Conan-embedding (Li et al. 2024, "Conan-embedding: General Text Embedding with More and Better Negative
Samples") re-mines hard negatives with the model being trained, during training, instead of fixing them once
before it. Followed: every ``train.mine_every`` steps the current model (eval mode, no gradient) encodes a
pool of candidate sentences, the NLI anchors and their positives; each anchor's ``train.mine_negatives``
top-ranked pool sentences by cosine become its hard negatives until the next mining, skipping the anchor's
own positives (every entailed hypothesis of that premise, by text) and their near-duplicates (cosine to a
positive >= ``train.mine_duplicate_threshold``), which are likely false negatives. Assumed: all of an anchor's
negatives are replaced at each mining (the paper replaces only those whose score fell below a fraction of
their first score); until the first mining (step ``mine_every``) the static SNLI contradictions serve; the
pool is the SNLI hypotheses of the triplets, then the corpus (``corpus`` given to the run, else SentEval's
MR/CR/SUBJ/MPQA/TREC/SST files beside the SNLI folder), shuffled with the seed and capped at
``train.mine_pool_size``.

Resume-safe: each mining writes ``<run>/mined/step-N.npy`` (pool indices per triplet row, atomically); a
resumed run reloads the latest one at or before its step instead of mining again with another model.
Under torchrun rank 0 mines and writes, the others read the file.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from mixsp_core.data.corpus import default_corpus_files, read_corpus_file
from mixsp_core.errors import DataError
from mixsp_core.io import replacing_file
from mixsp_core.training.config import RunConfig

log = logging.getLogger(__name__)

MINE_STREAM = 13  # seed stream of the pool's shuffle
MINED_DIR = "mined"
_STEP_FILE = re.compile(r"^step-(\d+)\.npy$")
_SCORE_BLOCK = 1024  # anchors scored against the pool at once


@dataclass(frozen=True)
class MinedNegatives:
    """``indices[a]``: anchor a's pool rows, best first; counts of candidates skipped on the way."""

    indices: np.ndarray  # (anchors, count) int64
    skipped_positives: int  # the anchor's own positives (by text)
    skipped_duplicates: int  # near-duplicates of a positive (cosine >= threshold)


def mine_hard_negatives(anchors: torch.Tensor, pool: torch.Tensor, positives: torch.Tensor,
                        positives_of: Sequence[Sequence[int]], excluded: Sequence[set[int]], count: int,
                        threshold: float) -> MinedNegatives:
    """The ``count`` pool rows most cosine-similar to each anchor, skipping for anchor a the pool rows in
    ``excluded[a]`` (its positives' own texts) and rows whose cosine to any of its positives
    (``positives[positives_of[a]]``) is >= ``threshold``. Rows are unit-normalised here; when fewer than
    ``count`` rows survive, the survivors repeat (none at all is a ``DataError``)."""
    anchors, pool, positives = (torch.nn.functional.normalize(t.float(), dim=-1) for t in (anchors, pool, positives))
    first = min(len(pool), 4 * count + 16)  # enough in almost every case; the rest falls back to a full sort
    out = np.empty((len(anchors), count), dtype=np.int64)
    skipped_positives = skipped_duplicates = 0
    for lo in range(0, len(anchors), _SCORE_BLOCK):
        scores = anchors[lo:lo + _SCORE_BLOCK] @ pool.T
        top = scores.topk(first, dim=1).indices.cpu().numpy()
        for j, candidates in enumerate(top):
            a = lo + j
            for attempt in (candidates, None):
                if attempt is None:  # too many skipped among the first candidates: rank the whole pool
                    attempt = scores[j].argsort(descending=True).cpu().numpy()
                kept, n_pos, n_dup = _filter(attempt, pool, positives[list(positives_of[a])], excluded[a], count,
                                             threshold)
                if len(kept) == count or len(attempt) == len(pool):
                    break
            if not kept:
                raise DataError("<mining pool>", f"every pool sentence is a positive or a near-duplicate of one "
                                f"for anchor {a}")
            out[a] = np.resize(np.asarray(kept), count)
            skipped_positives += n_pos
            skipped_duplicates += n_dup
    return MinedNegatives(out, skipped_positives, skipped_duplicates)


def _filter(candidates: np.ndarray, pool: torch.Tensor, positives: torch.Tensor, excluded: set[int], count: int,
            threshold: float) -> tuple[list[int], int, int]:
    """The first ``count`` candidates that are neither excluded nor near a positive, and the skip counts."""
    near = (pool[torch.as_tensor(candidates, device=pool.device)] @ positives.T).amax(dim=1) >= threshold \
        if len(positives) else torch.zeros(len(candidates), dtype=torch.bool)
    near = near.cpu().numpy()
    kept, n_pos, n_dup = [], 0, 0
    for c, is_near in zip(candidates.tolist(), near):
        if len(kept) == count:
            break
        if c in excluded:
            n_pos += 1
        elif is_near:
            n_dup += 1
        else:
            kept.append(c)
    return kept, n_pos, n_dup


def mining_pool(config: RunConfig, triplets: pd.DataFrame, corpus: Sequence[str] | None,
                senteval_dir: Path | None) -> list[str]:
    """The candidate sentences: the triplets' hypotheses, then the corpus (or SentEval's text files under
    ``senteval_dir``), unique, shuffled with the seed, at most ``train.mine_pool_size``."""
    if corpus is None:
        files = default_corpus_files(senteval_dir) if senteval_dir is not None and senteval_dir.is_dir() else []
        corpus = [s for file in files for s in read_corpus_file(file)]
    hypotheses = list(dict.fromkeys([*triplets["positive"], *triplets["hard_negative"]]))
    known = set(hypotheses)
    rest = [s for s in dict.fromkeys(corpus) if s not in known]
    unique = hypotheses + rest
    order = np.random.default_rng([config.seed, MINE_STREAM]).permutation(len(unique))
    # hypotheses first (in-domain negatives), each part in seeded order
    ranked = [i for i in order if i < len(hypotheses)] + [i for i in order if i >= len(hypotheses)]
    return [unique[i] for i in ranked[:config.train.mine_pool_size]]


@dataclass
class HardNegativeMiner:
    """The mining state of one run: the pool, the anchors, and the current mined table (None: static)."""

    config: RunConfig
    triplets: pd.DataFrame
    pool: list[str]
    table: np.ndarray | None = None  # (triplet rows, mine_negatives) pool indices
    table_step: int = -1  # the step whose mining ``table`` holds
    started: bool = False
    anchors: list[str] = field(init=False)
    anchor_of_row: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.anchors = list(dict.fromkeys(self.triplets["anchor"]))
        index = {a: i for i, a in enumerate(self.anchors)}
        self.anchor_of_row = np.array([index[a] for a in self.triplets["anchor"]], dtype=np.int64)

    def negatives(self, rows: np.ndarray) -> list[str]:
        """The hard negatives of triplet ``rows`` (positions): mined ones (``mine_negatives`` per row), or the
        static contradiction per row before the first mining."""
        if self.table is None:
            return list(self.triplets["hard_negative"].iloc[rows])
        return [self.pool[i] for r in rows for i in self.table[r]]

    def step(self, step: int, model: torch.nn.Module, run_root: Path, ctx, tracker) -> None:
        """Before training step ``step``: on the first call reload the latest saved mining at or before it;
        at every ``mine_every``-th step (not 0) mine with the current model unless that mining is loaded."""
        every = self.config.train.mine_every
        directory = Path(run_root) / MINED_DIR
        if not self.started:
            self.started = True
            saved = [(int(m.group(1)), p) for p in directory.glob("step-*.npy") if (m := _STEP_FILE.match(p.name))]
            saved = [(n, p) for n, p in saved if 0 < n <= step and n % every == 0]
            if saved:
                self._load(*max(saved))
        if step == 0 or step % every or step == self.table_step:
            return
        target = directory / f"step-{step}.npy"
        if ctx.is_main:
            started = time.perf_counter()
            result = self.mine(model)
            table = result.indices[self.anchor_of_row]
            directory.mkdir(parents=True, exist_ok=True)
            with replacing_file(target) as tmp, open(tmp, "wb") as handle:
                np.save(handle, table)
            seconds = time.perf_counter() - started
            log.info("mined %d hard negatives for %d anchors from %d pool sentences in %.1fs at step %d; skipped "
                     "%d positives and %d near-duplicates (cosine >= %.2f)", result.indices.size, len(self.anchors),
                     len(self.pool), seconds, step, result.skipped_positives, result.skipped_duplicates,
                     self.config.train.mine_duplicate_threshold)
            tracker.log_metrics({"mine/seconds": seconds, "mine/skipped_duplicates": result.skipped_duplicates,
                                 "mine/skipped_positives": result.skipped_positives}, step)
        ctx.barrier()
        self._load(step, target)

    def _load(self, step: int, path: Path) -> None:
        table = np.load(path, allow_pickle=False)
        want = (len(self.triplets), self.config.train.mine_negatives)
        if table.shape != want or table.min() < 0 or table.max() >= len(self.pool):
            raise DataError(path, f"mined table of shape {table.shape} (max {table.max()}) does not fit "
                            f"{want[0]} triplets x {want[1]} negatives over a pool of {len(self.pool)}")
        self.table, self.table_step = table, step

    @torch.no_grad()
    def mine(self, model: torch.nn.Module) -> MinedNegatives:
        """Encode pool, anchors and positives with ``model`` (eval mode) and mine every anchor's negatives."""
        tc = self.config.train
        positives = list(dict.fromkeys(self.triplets["positive"]))
        pos_index = {p: i for i, p in enumerate(positives)}
        pool_index: dict[str, int] = {}
        for i, s in enumerate(self.pool):
            pool_index.setdefault(s, i)
        positives_of: list[list[int]] = [[] for _ in self.anchors]
        for a, p in zip(self.anchor_of_row, self.triplets["positive"]):
            if pos_index[p] not in positives_of[a]:
                positives_of[a].append(pos_index[p])
        # the anchor's own text and its positives' texts are never its negatives
        excluded = [{pool_index[t] for t in (self.anchors[a], *(positives[p] for p in rows)) if t in pool_index}
                    for a, rows in enumerate(positives_of)]
        device = next(model.parameters()).device

        def encode(sentences: list[str]) -> torch.Tensor:
            return torch.as_tensor(model.encode(sentences, batch_size=tc.mine_batch_size, show_progress=False),
                                   device=device)

        return mine_hard_negatives(encode(self.anchors), encode(self.pool), encode(positives), positives_of,
                                   excluded, tc.mine_negatives, tc.mine_duplicate_threshold)


def negative_miner(config: RunConfig, triplets: pd.DataFrame | None, corpus: Sequence[str] | None,
                   senteval_dir: Path | None) -> HardNegativeMiner | None:
    """``TrainData.mined``: None unless ``train.mine_every > 0``."""
    if not config.train.mine_every or triplets is None:
        return None
    return HardNegativeMiner(config, triplets, mining_pool(config, triplets, corpus, senteval_dir))
