"""Augmented SBERT "silver pairs": unlabeled corpus sentences paired up and scored by the teacher.

The fine-tuned teacher generalises better than the student, so the student gains from training its STS loss
on many more pairs than the gold ones, scored by the teacher. :func:`silver_pairs` builds them; with
``data.silver_pairs > 0`` :meth:`mixsp_core.training.batches.TrainData.build` appends them to the training
pairs as task ``silver`` (their own batches under ``train.batch_by_task``). They never reach the dev sets,
which :func:`~mixsp_core.training.batches.select_pairs` takes from the pairs table only.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from mixsp_core.data.corpus import check_sentences
from mixsp_core.data.table import make_pairs
from mixsp_core.errors import ConfigError, DataError
from mixsp_core.training.neighbours import nearest_neighbours

SILVER_TASK = "silver"
MAX_COSINE = 0.98  # teacher cosine above which two sentences count as near-duplicates


def silver_pairs(sentences: Sequence[str], teacher: np.ndarray, gold: np.ndarray, count: int,
                 neighbour_ranks: Sequence[int], random_fraction: float, seed: int) -> pd.DataFrame:
    """At most ``count`` teacher-scored pairs of ``sentences``, as a pairs frame (``PAIR_COLUMNS``) of
    task ``silver``, split ``train``, source ``silver``; ``subset`` says how the partner was chosen
    (``rank-R`` or ``random``), ``line`` is the anchor's 1-based corpus row.

    Expects ``teacher``: the teacher's rows of ``sentences``, aligned and at full width (the raw
    embeddings, not a PCA projection: the cosines are the teacher's own); ``gold``: the gold training
    scores, whose distribution the silver scores take. A pure function of its arguments.

    ``count`` anchors are drawn at random (without replacement while ``count`` allows: whole
    permutations of the corpus, repeated). Each anchor's partner is, with probability
    ``random_fraction``, a uniformly drawn other sentence (mostly unrelated: the low scores), else its
    neighbour at a rank drawn uniformly from ``neighbour_ranks`` (1 = nearest by teacher cosine: the
    related pairs that random pairing almost never gives). Near-duplicates (teacher cosine above
    :data:`MAX_COSINE`, or the same text up to whitespace and case) are skipped, since they teach
    nothing but "identical is similar"; a pair repeating an earlier one (either order) is dropped. Skipped
    anchors are not replaced, so fewer than ``count`` rows may come back.

    Score: the teacher cosine mapped onto the gold distribution by quantiles (the pair whose cosine has
    quantile q among the silver pairs gets ``np.quantile(gold, q)``; tied cosines share their mean rank).
    That keeps the teacher's order, all CoSENT uses, and puts the scores on the gold scale, so the routing
    loss's threshold (``data.upper_threshold``) sees a realistic class balance.
    """
    sentences = check_sentences(sentences)
    n = len(sentences)
    teacher = np.asarray(teacher, dtype=np.float32)
    if teacher.ndim != 2 or teacher.shape[0] != n:
        raise DataError("<teacher embeddings>", f"shape {teacher.shape} does not match {n} corpus sentences")
    if not np.isfinite(teacher).all():
        raise DataError("<teacher embeddings>", "holds NaN or infinite values")
    gold = np.asarray(gold, dtype=np.float64).reshape(-1)
    if not len(gold) or not np.isfinite(gold).all():
        raise DataError("<training pairs>", "silver scores need finite gold scores of at least one training pair")
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 0:
        raise ConfigError("data.silver_pairs", f"must be an integer >= 0, got {count!r}")
    if not 0.0 <= random_fraction <= 1.0:  # NaN fails too
        raise ConfigError("data.silver_random_fraction", f"must lie in [0, 1], got {random_fraction}")
    ranks = np.asarray(list(neighbour_ranks), dtype=np.int64)
    if count == 0:
        return make_pairs([])
    if n < 2:
        raise DataError("<corpus>", f"silver pairs need at least 2 corpus sentences, got {n}")
    if not len(ranks) or ranks.min() < 1 or (random_fraction < 1.0 and ranks.max() > n - 1):
        raise ConfigError("data.silver_neighbour_ranks", f"must be integers between 1 and {n - 1} (the corpus "
                          f"sentences less one), at least one, got {ranks.tolist()}")

    # every draw has a fixed size, so the result depends on (seed, count, corpus size) only
    rng = np.random.default_rng(seed)
    anchors = np.concatenate([rng.permutation(n) for _ in range(-(-count // n))])[:count]
    random_partner = rng.random(count) < random_fraction
    rank = rng.choice(ranks, size=count)
    offset = rng.integers(1, n, size=count)  # (anchor + offset) % n: uniform over the other sentences

    partners = (anchors + offset) % n
    near = np.flatnonzero(~random_partner)
    if len(near):
        wanted = np.unique(anchors[near])
        table = nearest_neighbours(teacher, int(ranks.max()), rows=wanted)  # one row per wanted anchor
        partners[near] = table[np.searchsorted(wanted, anchors[near]), rank[near] - 1]

    unit = teacher / np.maximum(np.linalg.norm(teacher, axis=1, keepdims=True), 1e-12)
    cosine = np.einsum("ij,ij->i", unit[anchors], unit[partners]).astype(np.float64)
    normal = [" ".join(s.split()).lower() for s in sentences]
    seen: set[tuple[str, str]] = set()
    kept = []
    for i, (a, b) in enumerate(zip(anchors.tolist(), partners.tolist())):
        key = tuple(sorted((normal[a], normal[b])))
        if cosine[i] > MAX_COSINE or key[0] == key[1] or key in seen:
            continue
        seen.add(key)
        kept.append(i)
    if not kept:
        return make_pairs([])
    kept = np.asarray(kept)
    scores = quantile_scores(cosine[kept], gold)
    return make_pairs({
        "sentence1": sentences[anchors[i]],
        "sentence2": sentences[partners[i]],
        "score": float(score),
        "task": SILVER_TASK,
        "subset": "random" if random_partner[i] else f"rank-{rank[i]}",
        "split": "train",
        "source": SILVER_TASK,
        "line": int(anchors[i]) + 1,
    } for i, score in zip(kept, scores))


def quantile_scores(values: np.ndarray, gold: np.ndarray) -> np.ndarray:
    """``values`` mapped onto the distribution of ``gold`` by quantiles: the value of (mean) rank r among m
    gets ``np.quantile(gold, (r - 1) / (m - 1))`` (one value: the median). Order-preserving."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 1:
        return np.array([np.quantile(gold, 0.5)])
    q = (pd.Series(values).rank(method="average").to_numpy() - 1.0) / (len(values) - 1)
    return np.quantile(np.asarray(gold, dtype=np.float64), q)
