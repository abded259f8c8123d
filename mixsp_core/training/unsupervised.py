"""Unlabeled-sentence training (the first tier of 2-Tier SimCSE): the SimCSE batches of corpus sentences, the
SimCSE term of a step, and what an epoch is for a run that trains on no pairs.

The SimCSE batch is encoded in one forward pass as ``sentences + sentences`` in train mode, as the official
SimCSE code does (it duplicates each batch): every row gets its own dropout mask, so the two copies of a
sentence are its two views. The sentences are the corpus handed to ``run_training`` (``corpus=``; the
pipeline's ``data/corpus/corpus.txt`` or ``data.corpus``), deduplicated in order, because a duplicate in a
batch would be a false negative.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from mixsp_core.errors import ConfigError
from mixsp_core.training.batches import BatchStream
from mixsp_core.training.config import LOSS_TERMS, RunConfig

if TYPE_CHECKING:  # annotations only
    from mixsp_core.training.batches import TrainData
    from mixsp_core.training.distributed import DistContext

SIMCSE_STREAM = 16  # seed-stream number of the SimCSE batches (beside batches.PAIR_STREAM etc.)
# weighted terms that do not read the batch of pairs: a run weighting none but these skips the pair forward
NON_PAIR_TERMS = frozenset({"distill", "distill_sim", "infonce", "simcse"})


@dataclass(frozen=True)
class SentenceBatches:
    """SimCSE's unlabeled sentences and their seeded batches (a pure function of (seed, step))."""

    sentences: list[str]
    stream: BatchStream

    def batch(self, step: int) -> np.ndarray:
        return self.stream.indices(step)


def simcse_batches(config: RunConfig, corpus: Sequence[str] | None) -> SentenceBatches | None:
    """The SimCSE batches of ``corpus`` when ``loss.simcse > 0``, else None."""
    if config.loss.simcse <= 0:
        return None
    sentences = list(dict.fromkeys(s for s in (corpus or []) if s.strip()))
    size = config.train.simcse_batch_size
    if len(sentences) < size:
        raise ConfigError("loss.simcse", f"needs at least train.simcse_batch_size ({size}) distinct corpus "
                          f"sentences, got {len(sentences)}: pass the corpus (data.corpus, or the pipeline's)")
    return SentenceBatches(sentences, BatchStream(len(sentences), size, config.seed, SIMCSE_STREAM))


def simcse_term(objective: nn.Module, model: nn.Module, sentences: list[str], forward: Callable,
                gather: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """SimCSE on this process's ``sentences``: both views in one forward pass, negatives over the global batch."""
    n = len(sentences)
    embedding = forward(model.tokenize(sentences + sentences)).embedding
    return objective.simcse(gather(embedding[:n]), gather(embedding[n:]))


def unsupervised_terms(objective: nn.Module, model: nn.Module, net: nn.Module, data: TrainData, step: int,
                       ctx: DistContext) -> dict[str, torch.Tensor]:
    """The SimCSE term of ``step`` (empty when the run has no SimCSE batches)."""
    if data.simcse is None:
        return {}
    rows = ctx.shard(data.simcse.batch(step))
    return {"simcse": simcse_term(objective, model, [data.simcse.sentences[i] for i in rows], net, ctx.gather)}


def uses_pairs(weights: dict[str, float]) -> bool:
    """Whether a weighted term reads the batch of pairs (else the step skips encoding it)."""
    return any(name not in NON_PAIR_TERMS for name in weights)


def epoch_batches(config: RunConfig, data: TrainData) -> int:
    """Batches per epoch of the run's main stream: the pairs when a term reads them; else the SimCSE
    sentences, else the NLI triplets (a stage that trains on those alone counts its epochs over them)."""
    if uses_pairs({name: w for name in LOSS_TERMS if (w := getattr(config.loss, name)) > 0}):
        return data.pairs.batches_per_epoch
    if data.simcse is not None:
        return data.simcse.stream.batches_per_epoch
    if data.nli is not None:
        return data.nli.batches_per_epoch
    return data.pairs.batches_per_epoch
