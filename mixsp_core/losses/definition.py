"""DefSent+'s definition loss: the embedding of a definition sentence (a WordNet gloss) predicts its
dictionary entry among candidate entry embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DefinitionLoss(nn.Module):
    """Cross-entropy of each gloss against its entry, over cosine / temperature logits.

    Expects ``glosses`` ``[batch, dim]`` (the student's embeddings of the definition sentences, with
    gradient), ``entries`` ``[candidates, dim]`` (entry embeddings, treated as constants: the progressively
    built table, :mod:`mixsp_core.training.definitions`) and ``labels`` ``[batch]`` (the row of ``entries``
    that gloss i defines). With ``center`` ``[dim]`` (the table's mean) both sides are centred on it before
    the cosine: the entries' common direction is removed, so the logits compare entries in a roughly
    isotropic space rather than all scoring high on the direction every sentence embedding shares.
    ``exclude`` (row indices, column indices) takes those candidates out of their rows' softmax: entries that
    the gloss defines too (WordNet synonyms share one gloss) are right answers, not negatives.
    """

    def __init__(self, temperature: float = 0.05):
        super().__init__()
        self.temperature = temperature

    def forward(self, glosses: torch.Tensor, entries: torch.Tensor, labels: torch.Tensor,
                center: torch.Tensor | None = None,
                exclude: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        # fp32 even under autocast: bf16 cosines (8-bit mantissa) / 0.05 cannot rank 100k+ close candidates
        with torch.autocast(glosses.device.type, enabled=False):
            g, e = glosses.float(), entries.detach().float()
            if center is not None:
                g, e = g - center.float(), e - center.float()
            logits = F.normalize(g, dim=-1) @ F.normalize(e, dim=-1).T / self.temperature
            if exclude is not None and exclude[0].numel():
                logits = logits.index_put(exclude, torch.tensor(float("-inf"), device=logits.device))
            return F.cross_entropy(logits, labels)
