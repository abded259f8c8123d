"""CoDiEmb's IR side: single-task steps (STS pairs or retrieval) in a balanced, seeded order, and the retrieval
batches (SNLI premises -> their entailed hypotheses) they draw.

CoDiEmb (Zhang et al. 2025, "CoDiEmb: A Collaborative yet Distinct Framework for Unified Representation
Learning in Information Retrieval and Semantic Textual Similarity") trains STS and IR with task-specific
losses on single-task batches and balances the updates per task. Followed: every step is one task's batch
(``TaskSampler``), the fraction of retrieval steps is exactly ``train.retrieval_share`` per block of
``TASK_BLOCK`` steps (rounded down, carried over blocks), and retrieval steps train only the multi-positive
InfoNCE term (:class:`~mixsp_core.losses.multi_positive_infonce.MultiPositiveInfoNCELoss`). Assumed (data at
hand): the retrieval training set is SNLI dev, a premise as the query, its entailed hypotheses as positives
and its contradicting ones as hard negatives; the STS steps keep the usual STS (and NLI / distillation) terms.
The paper's per-task gradient and data-balancing details beyond the step share are not reproduced.

Like :mod:`mixsp_core.training.batches`, everything is a pure function of (seed, step): a resumed run draws
the same task and batch at every step. STS steps count their own ordinal (the STS streams advance only on
STS steps), retrieval steps theirs.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from mixsp_core.data.corpus import nli_groups
from mixsp_core.errors import ConfigError, DataError
from mixsp_core.training.batches import BatchStream, snli_folder
from mixsp_core.training.config import RunConfig

if TYPE_CHECKING:  # annotations only
    from mixsp_core.training.distributed import DistContext

STS, RETRIEVAL = "sts", "retrieval"
TASK_STREAM, RETRIEVAL_STREAM = 11, 12  # seed streams, apart from batches.py's (0-2)
TASK_BLOCK = 20  # steps per block: the share is exact (to one step) in every block
RETRIEVAL_SPLIT = "dev"  # SNLI test stays held out for mixsp_core.evaluate.ir


def _floor(x: float) -> int:
    return math.floor(x + 1e-9)  # 0.29 * 100 is 28.999999999999996 in floating point


@dataclass(frozen=True)
class TaskSampler:
    """Which task step ``step`` trains, and its ordinal among that task's steps.

    Block b (of ``block`` steps) holds ``floor((b + 1) * block * share) - floor(b * block * share)`` retrieval
    steps at positions drawn from (seed, b); the rest are STS steps. So after any number of whole blocks the
    retrieval count is ``floor(steps * share)``, and inside a block the order is random.
    """

    share: float
    seed: int
    block: int = TASK_BLOCK

    def _count_before_block(self, b: int) -> int:
        return _floor(b * self.block * self.share)

    @functools.lru_cache(maxsize=4)  # noqa: B019 - frozen and hashable: caching per block is safe
    def _retrieval_slots(self, b: int) -> np.ndarray:
        count = self._count_before_block(b + 1) - self._count_before_block(b)
        slots = np.zeros(self.block, dtype=bool)
        slots[np.random.default_rng([self.seed, TASK_STREAM, b]).permutation(self.block)[:count]] = True
        return slots

    def retrieval_steps_before(self, step: int) -> int:
        b, position = divmod(step, self.block)
        return self._count_before_block(b) + int(self._retrieval_slots(b)[:position].sum())

    def at(self, step: int) -> tuple[str, int]:
        """(task, ordinal): ``("retrieval", r)`` for the r-th retrieval step, ``("sts", s)`` for the s-th STS step."""
        b, position = divmod(step, self.block)
        before = self.retrieval_steps_before(step)
        return (RETRIEVAL, before) if self._retrieval_slots(b)[position] else (STS, step - before)

    def tasks(self, steps: int) -> list[str]:
        return [self.at(s)[0] for s in range(steps)]


@dataclass(frozen=True)
class RetrievalGroup:
    query: str
    positives: tuple[str, ...]
    negatives: tuple[str, ...]


def retrieval_groups(snli_dir, split: str = RETRIEVAL_SPLIT, max_positives: int = 4,
                     max_negatives: int = 4) -> list[RetrievalGroup]:
    """SNLI ``split`` premises with >= 1 entailed hypothesis: (premise, first ``max_positives`` entailed,
    first ``max_negatives`` contradicting hypotheses), in file order."""
    groups = [RetrievalGroup(premise, tuple(entailed[:max_positives]), tuple(contradicted[:max_negatives]))
              for premise, (entailed, contradicted) in nli_groups(snli_dir, split).items() if entailed]
    if len(groups) < 2:
        raise DataError(snli_dir, f"SNLI {split}: {len(groups)} premises with an entailed hypothesis; retrieval "
                        "training needs at least 2")
    return groups


@dataclass(frozen=True)
class RetrievalBatches:
    """Retrieval batch r: ``batch_size`` groups (a :class:`BatchStream` over the groups, its own seed stream)."""

    groups: tuple[RetrievalGroup, ...]
    stream: BatchStream

    def batch(self, r: int) -> list[RetrievalGroup]:
        return [self.groups[i] for i in self.stream.indices(r)]


def batch_tensors(groups: list[RetrievalGroup]) -> tuple[list[str], list[str], torch.Tensor]:
    """(queries, candidates, positive_mask): candidates are every group's positives then hard negatives, in
    group order; ``positive_mask[i, c]`` marks group i's own positives."""
    queries, candidates, owners = [], [], []
    for i, group in enumerate(groups):
        queries.append(group.query)
        candidates += [*group.positives, *group.negatives]
        owners += [i] * len(group.positives) + [-1] * len(group.negatives)
    mask = torch.arange(len(groups))[:, None] == torch.tensor(owners)[None, :]
    return queries, candidates, mask


def task_streams(config: RunConfig) -> dict[str, TaskSampler | RetrievalBatches | None]:
    """``TrainData``'s ``tasks`` and ``retrieval`` fields: None unless ``train.retrieval_share > 0``."""
    tc = config.train
    if tc.retrieval_share == 0:
        return {"tasks": None, "retrieval": None}
    groups = tuple(retrieval_groups(snli_folder(config), RETRIEVAL_SPLIT, tc.retrieval_max_positives,
                                    tc.retrieval_max_negatives))
    if len(groups) < tc.retrieval_batch_size:
        raise ConfigError("train.retrieval_batch_size", f"exceeds the {len(groups)} retrieval queries")
    return {"tasks": TaskSampler(tc.retrieval_share, config.seed),
            "retrieval": RetrievalBatches(groups, BatchStream(len(groups), tc.retrieval_batch_size, config.seed,
                                                              RETRIEVAL_STREAM))}


def retrieval_terms(objective: torch.nn.Module, model: torch.nn.Module, retrieval: RetrievalBatches, r: int,
                    ctx: DistContext, forward: Callable | None = None) -> dict[str, torch.Tensor]:
    """The one term of retrieval step r (one process: its candidate count varies, so it is not gathered)."""
    if ctx.enabled:
        raise ConfigError("loss.retrieval", "retrieval steps run in one process only (not under torchrun)")
    queries, candidates, mask = batch_tensors(retrieval.batch(r))
    emb = (forward or model)(model.tokenize(queries + candidates)).embedding
    n = len(queries)
    return {"retrieval": objective.retrieval(emb[:n], emb[n:], mask.to(emb.device))}
