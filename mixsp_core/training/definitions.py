"""DefSent+ as an extra term of the training loop: definition sentences (WordNet 3.0 glosses) projected
into a space of dictionary-entry embeddings that the student itself builds as it trains.

Paper: Xiaodong Liu, "DefSent+: Improving sentence embeddings of language models by projecting definition
sentences into a quasi-isotropic or isotropic vector space of unlimited dictionary entries" (arXiv 2405.16153,
2024), after DefSent (Tsukagoshi et al., ACL 2021). DefSent predicts the defined word from the embedding of
its definition through the language model's frozen word-embedding matrix, which limits the entries to single
tokens of the vocabulary and leaves the (anisotropic) word space as it is. DefSent+ builds *entry embeddings*
instead: the embedding of an entry is the mean of the sentence embeddings of all its definitions, computed by
the model and rebuilt progressively as the model improves ("progressive separate training": the entries
come from an earlier state of the model, the definitions are encoded by the current one), so any entry
(multi-word ones too) can be predicted and the entry space grows more uniform in direction as training goes.

What is followed here, and what is assumed:

- Entries are the lemmas of the glosses (``Abraham_Lincoln`` -> ``abraham lincoln``; case-folded, so
  ``Turkey`` and ``turkey`` are one entry and never each other's negative). A word with several senses is
  one entry defined by several glosses, as in a dictionary.
- Entry embedding = mean of the (unit) student embeddings of the entry's glosses (``train.definition_entries:
  glosses``, the paper's), computed without gradient; ``lemma`` encodes the entry's own text instead (an
  alternative, not the paper's). The table is rebuilt at the first step and every
  ``train.definition_refresh_every`` steps, optionally blended with the previous one
  (``train.definition_entry_momentum`` m: table <- normalise(m * old + (1 - m) * new)). The paper's rounds of
  separate training become these refreshes inside the one loop; between two, the table is a fixed target,
  as DefSent's frozen word-embedding matrix is.
- The loss is :class:`~mixsp_core.losses.definition.DefinitionLoss`: softmax over cosine /
  ``loss.definition_temperature`` against every entry (``loss.definition_candidates: 0``, DefSent's softmax
  over the whole vocabulary) or the batch's own entries plus sampled ones up to that many. With
  ``loss.definition_center`` the table's mean is subtracted from both sides first (an assumption, off by
  default: a cheap step towards the "isotropic" space; the paper's own construction is not reproduced).
- The entries a gloss also defines (the other words of its WordNet synset share the gloss) are left out of
  its softmax: right answers, not negatives (an addition: with entries built from glosses, a synonym
  defined by this gloss alone would otherwise sit exactly on the gloss and be its hardest negative).
- The term is added to the STS terms of the same step (multi-task), not run as a separate first stage.

Gloss batches and sampled candidates are pure functions of (seed, step) like every stream of
:mod:`mixsp_core.training.batches`. A resumed run rebuilds the table from the resumed model at its first
step (the table itself is not checkpointed), so with momentum > 0 or a resume between two refreshes it
does not repeat the uninterrupted run exactly. Under torchrun every rank builds the same table.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from mixsp_core.data.wordnet import read_glosses
from mixsp_core.errors import DataError
from mixsp_core.losses.definition import DefinitionLoss
from mixsp_core.training.batches import BatchStream
from mixsp_core.training.config import RunConfig

if TYPE_CHECKING:  # annotations only
    from mixsp_core.training.distributed import DistContext

log = logging.getLogger(__name__)

DEFINITION_STREAM = 16  # seed-stream number of the gloss batches (batches.py numbers its own from 0)


def entry_text(lemma: str) -> str:
    """The text an entry is encoded from: WordNet's underscores as spaces, case-folded."""
    return " ".join(lemma.split("_")).casefold()


@dataclass(frozen=True)
class DefinitionSet:
    """The glosses one run trains on: ``glosses[i]`` defines ``entries[entry_of[i]]``; ``texts`` are the
    distinct gloss texts (encoded once per refresh), ``text_of[i]`` the one of row i."""

    glosses: list[str]
    entries: list[str]
    entry_of: np.ndarray  # (n_glosses,) int64
    texts: list[str]
    text_of: np.ndarray  # (n_glosses,) int64

    @classmethod
    def from_table(cls, table: pd.DataFrame, max_glosses: int = 0, seed: int = 0) -> DefinitionSet:
        """From a gloss table (:func:`mixsp_core.data.wordnet.read_glosses`); ``max_glosses > 0`` keeps a
        seeded sample of that many rows. Rows repeating a (entry, gloss) pair are kept once."""
        frame = pd.DataFrame({"entry": table["lemma"].map(entry_text), "gloss": table["gloss"]})
        frame = frame.drop_duplicates(ignore_index=True)
        if max_glosses and len(frame) > max_glosses:
            frame = frame.sample(n=max_glosses, random_state=seed).reset_index(drop=True)
        codes, entries = pd.factorize(frame["entry"])
        text_of, texts = pd.factorize(frame["gloss"])
        return cls(list(frame["gloss"]), list(entries), codes.astype(np.int64), list(texts), text_of.astype(np.int64))

    @functools.cached_property
    def _entries_by_text(self) -> tuple[np.ndarray, np.ndarray]:
        """(entries sorted by gloss text, start of each text's run): the entries each gloss text defines."""
        order = np.argsort(self.text_of, kind="stable")
        return self.entry_of[order], np.searchsorted(self.text_of[order], np.arange(len(self.texts) + 1))

    def synonyms(self, row: int) -> np.ndarray:
        """The other entries that gloss row ``row``'s text defines (a synset's other words)."""
        entries, starts = self._entries_by_text
        text = self.text_of[row]
        found = entries[starts[text]:starts[text + 1]]
        return found[found != self.entry_of[row]]

    def entry_vectors(self, encode: Callable[[list[str]], np.ndarray],
                      device: torch.device | None = None) -> torch.Tensor:
        """The paper's entry embeddings: row e = the mean unit embedding of entry e's glosses."""
        vectors = F.normalize(torch.as_tensor(encode(self.texts), dtype=torch.float32, device=device), dim=-1)
        index = torch.as_tensor(self.entry_of, device=vectors.device)
        return entry_means(vectors[torch.as_tensor(self.text_of, device=vectors.device)], index, len(self.entries))


def entry_means(rows: torch.Tensor, entry_of: torch.Tensor, num_entries: int) -> torch.Tensor:
    """Mean of ``rows`` per entry (``entry_of[i]`` is row i's entry; every entry has at least one row)."""
    sums = torch.zeros(num_entries, rows.shape[1], dtype=rows.dtype, device=rows.device).index_add_(0, entry_of, rows)
    return sums / torch.bincount(entry_of, minlength=num_entries).unsqueeze(1).to(rows.dtype)


def load_definition_set(config: RunConfig) -> DefinitionSet:
    """``data.definitions`` (a parquet gloss table or a WordNet dict directory), sampled to
    ``data.definitions_max``; at least two entries, or there is nothing to tell apart."""
    path = Path(config.data.definitions)
    found = DefinitionSet.from_table(read_glosses(path), config.data.definitions_max, config.seed)
    if len(found.entries) < 2:
        raise DataError(path, f"{len(found.entries)} dictionary entries: the definition loss needs at least 2")
    return found


class EntryTable:
    """The progressively built entry embeddings, one row per entry computed by the model being trained
    (:meth:`DefinitionTerm.refresh_if_due` says how), rebuilt at the first step asked for and at every
    multiple of ``refresh_every``, blended with the old table by ``momentum`` (0: replaced). ``vectors``
    are unit rows; ``center`` their mean."""

    def __init__(self, entries: Sequence[str], refresh_every: int, momentum: float = 0.0):
        self.entries = list(entries)
        self.refresh_every = refresh_every
        self.momentum = momentum
        self.vectors: torch.Tensor | None = None
        self.center: torch.Tensor | None = None
        self.refreshed_at: list[int] = []  # the steps it was rebuilt at

    def due(self, step: int) -> bool:
        """Whether ``step`` rebuilds the table: the first step this table sees, then every multiple."""
        return self.vectors is None or (step % self.refresh_every == 0 and self.refreshed_at[-1] != step)

    def refresh(self, encode: Callable[[list[str]], np.ndarray | torch.Tensor], step: int,
                device: torch.device | None = None) -> None:
        """Fold ``encode(entries)`` (one row per entry, aligned) into the table."""
        new = F.normalize(torch.as_tensor(encode(self.entries), dtype=torch.float32, device=device), dim=-1)
        if self.vectors is not None and self.momentum > 0:
            new = F.normalize(self.momentum * self.vectors + (1.0 - self.momentum) * new, dim=-1)
        self.vectors, self.center = new, new.mean(dim=0)
        self.refreshed_at.append(step)


@dataclass(frozen=True)
class DefinitionBatches:
    """Gloss rows of step ``step`` (a :class:`BatchStream`) and the entries they are scored against."""

    glosses: BatchStream
    num_entries: int
    candidates: int  # 0: every entry; else the batch's entries plus sampled ones up to this many

    def indices(self, step: int) -> np.ndarray:
        return self.glosses.indices(step)

    def candidate_rows(self, step: int, targets: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
        """(candidate entry rows, label of each target among them); rows None means the whole table
        (labels are then the entry rows themselves). Sampled rows are a function of (seed, step)."""
        if self.candidates == 0 or self.candidates >= self.num_entries:
            return None, targets
        own = np.unique(targets)
        extra = max(0, self.candidates - len(own))
        rng = np.random.default_rng([self.glosses.seed, self.glosses.stream, 1, step])
        pool = rng.choice(self.num_entries, size=min(self.num_entries, extra + len(own)), replace=False)
        rows = np.concatenate([own, pool[~np.isin(pool, own)][:extra]])
        return rows, np.searchsorted(own, targets)  # own is sorted and comes first


class DefinitionTerm:
    """The ``definition`` loss term of a run: its glosses, entry table, batches and loss."""

    def __init__(self, config: RunConfig, definitions: DefinitionSet, device: torch.device):
        tc, lc = config.train, config.loss
        self.definitions = definitions
        self.table = EntryTable(definitions.entries, tc.definition_refresh_every, tc.definition_entry_momentum)
        self.batches = DefinitionBatches(
            BatchStream(len(definitions.glosses), tc.definition_batch_size, config.seed, DEFINITION_STREAM),
            len(definitions.entries), lc.definition_candidates)
        self.loss = DefinitionLoss(lc.definition_temperature)
        self.center = lc.definition_center
        self.from_glosses = tc.definition_entries == "glosses"
        self.encode_batch_size = tc.eval_batch_size
        self.device = device

    @classmethod
    def build(cls, config: RunConfig, ctx: DistContext) -> DefinitionTerm | None:
        """The term when ``loss.definition > 0`` (None otherwise), its glosses read from ``data.definitions``."""
        if config.loss.definition <= 0:
            return None
        ctx.check_divisible("train.definition_batch_size", config.train.definition_batch_size)
        definitions = load_definition_set(config)
        log.info("definitions: %d glosses of %d entries from %s", len(definitions.glosses),
                 len(definitions.entries), config.data.definitions)
        return cls(config, definitions, ctx.device)

    def refresh_if_due(self, model: nn.Module, step: int) -> None:
        """Rebuild the entry table with ``model`` (eval mode, no gradient) when ``step`` is due: each entry
        the mean embedding of its glosses (``train.definition_entries: glosses``) or of its own text (``lemma``)."""
        if not self.table.due(step):
            return

        def encode(texts: list[str]) -> np.ndarray:
            return model.encode(texts, batch_size=self.encode_batch_size, show_progress=False)

        if self.from_glosses:
            self.table.refresh(lambda entries: self.definitions.entry_vectors(encode, self.device), step, self.device)
        else:
            self.table.refresh(encode, step, self.device)

    def terms(self, model: nn.Module, net: nn.Module, step: int, ctx: DistContext) -> dict[str, torch.Tensor]:
        """``{"definition": loss}`` of step ``step``: this rank's glosses encoded, the global batch scored."""
        rows = self.batches.indices(step)
        local = [self.definitions.glosses[i] for i in ctx.shard(rows)]
        glosses = ctx.gather(net(model.tokenize(local)).embedding)
        candidates, labels = self.batches.candidate_rows(step, self.definitions.entry_of[rows])
        entries = self.table.vectors if candidates is None else self.table.vectors[torch.as_tensor(
            candidates, device=self.device)]
        center = self.table.center if self.center else None
        exclude = tuple(torch.as_tensor(a, device=self.device) for a in synonym_cells(self.definitions, rows, candidates))
        return {"definition": self.loss(glosses, entries, torch.as_tensor(labels, device=self.device), center, exclude)}


def synonym_cells(definitions: DefinitionSet, rows: np.ndarray,
                  candidates: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(batch positions, candidate columns) of the entries each batch row's gloss also defines, to leave out
    of that row's softmax; ``candidates`` None means the columns are the entry rows themselves."""
    column = None if candidates is None else {int(e): i for i, e in enumerate(candidates)}
    at, cols = [], []
    for position, row in enumerate(rows):
        for entry in definitions.synonyms(int(row)):
            col = int(entry) if column is None else column.get(int(entry))
            if col is not None:
                at.append(position)
                cols.append(col)
    return np.asarray(at, dtype=np.int64), np.asarray(cols, dtype=np.int64)
