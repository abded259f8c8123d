"""The published MixSP scorer (``cross`` kind), following the official code (KornWtp/MixSP).

Both sentences are encoded together as ``[CLS] s1 [SEP] s2 [SEP]`` (at most ``max_length`` = 64
tokens, longest-first truncation). For each sentence x, ``h_x`` is the mean of the last-layer token
states over its span (split at the separators). The router sees ``h_x + pooled`` (the encoder's pooled
[CLS] output, as published; the raw [CLS] state for encoders without a pooler), picks the top-1
projector and keeps its probability p un-renormalised: ``z_x = p * Projector_top(h_x)``. The score is
``sigmoid(Linear(2d, 1)(concat(z_1, z_2)))``, trained with BCE-with-logits against gold / 5.

It scores pairs; it cannot embed one sentence alone, so it has ``predict`` and no ``encode``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import BatchEncoding, PreTrainedModel

from mixsp_core.data.corpus import check_sentences
from mixsp_core.models.routing import RoutedProjector, RoutingOutput
from mixsp_core.models.student import autocast_for, check_max_length, pretrained_encoder
from mixsp_core.training.config import ModelConfig


@dataclass
class CrossOutput:
    """``logits``: ``[batch]`` (score = sigmoid(logits)); routing of the first and second sentence."""

    logits: torch.Tensor
    routing_a: RoutingOutput
    routing_b: RoutingOutput


def span_masks(input_ids: torch.Tensor, attention_mask: torch.Tensor, sep_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token masks ``[batch, tokens]`` of the first and second sentence of a joint encoding.

    The first span runs from after the leading special token to the first separator; the second from
    after the second-to-last separator to the last (this also covers RoBERTa/MPNet's double separator
    ``<s> A </s></s> B </s>``). Separators and padding belong to neither span.
    """
    is_sep = (input_ids == sep_id) & attention_mask.bool()
    seps_before = torch.cumsum(is_sep.int(), dim=1) - is_sep.int()  # separators strictly before
    n_sep = is_sep.sum(dim=1, keepdim=True)
    valid = attention_mask.bool() & ~is_sep
    position = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :]
    first = valid & (seps_before == 0) & (position > 0)
    second = valid & (seps_before == (n_sep - 1)) & (n_sep >= 2)
    return first, second


def span_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden`` ``[b, t, d]`` over the tokens where ``mask`` is true (zeros for empty spans)."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


class CrossScorer(nn.Module):
    """Joint-encoding MixSP scorer; ``num_projectors: 1`` gives the same model without routing."""

    kind = "cross"

    def __init__(self, config: ModelConfig, encoder: PreTrainedModel, tokenizer):
        super().__init__()
        if tokenizer.sep_token_id is None:
            raise ValueError(f"{config.encoder}: the tokenizer has no separator token; the cross model needs one")
        check_max_length(config, encoder, tokenizer)
        self.model_config = config
        self.encoder = encoder
        self.tokenizer = tokenizer
        d = int(encoder.config.hidden_size)
        self.hidden_dim = d
        self.routed = RoutedProjector(d, d, config.num_projectors, config.routing,
                                      config.projector_mult, config.projector_residual)
        self.head = nn.Linear(2 * d, 1)

    @classmethod
    def from_config(cls, config: ModelConfig) -> CrossScorer:
        encoder, tokenizer = pretrained_encoder(config.encoder)
        return cls(config, encoder, tokenizer)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def tokenize_pairs(self, left: Sequence[str], right: Sequence[str]) -> BatchEncoding:
        """Joint encodings of the pairs, truncated longest-first to ``max_length`` tokens."""
        batch = self.tokenizer([s.strip() for s in left], [s.strip() for s in right], padding=True,
                               truncation="longest_first", max_length=self.model_config.max_length,
                               return_tensors="pt")
        return batch.to(self.device)

    def forward(self, batch: BatchEncoding) -> CrossOutput:
        out = self.encoder(**batch)
        hidden = out.last_hidden_state
        pooled = getattr(out, "pooler_output", None)
        if pooled is None:
            pooled = hidden[:, 0]
        first, second = span_masks(batch["input_ids"], batch["attention_mask"], self.tokenizer.sep_token_id)
        h_a, h_b = span_mean(hidden, first), span_mean(hidden, second)
        routing_a = self.routed(h_a, h_a + pooled)
        routing_b = self.routed(h_b, h_b + pooled)
        logits = self.head(torch.cat([routing_a.z, routing_b.z], dim=-1)).squeeze(-1)
        return CrossOutput(logits, routing_a, routing_b)

    @torch.inference_mode()
    def predict(self, pairs: Sequence[tuple[str, str]], batch_size: int = 32,
                show_progress: bool = False) -> np.ndarray:
        """Similarity scores in (0, 1) for ``[(s1, s2), ...]`` (multiply by 5 for the gold scale)."""
        pairs = list(pairs)
        for i, pair in enumerate(pairs):
            if isinstance(pair, str) or len(pair) != 2:
                raise TypeError(f"pair {i} must be a (sentence1, sentence2) tuple, got {pair!r}")
        left = check_sentences([p[0] for p in pairs])
        right = check_sentences([p[1] for p in pairs])
        was_training = self.training
        self.eval()
        scores = np.empty(len(pairs), dtype=np.float32)
        try:
            with autocast_for(self.device), tqdm(total=len(pairs), desc="predict", unit="pair",
                                                 disable=not show_progress, leave=False) as bar:
                for start in range(0, len(pairs), batch_size):
                    stop = start + batch_size
                    logits = self(self.tokenize_pairs(left[start:stop], right[start:stop])).logits
                    scores[start:stop] = torch.sigmoid(logits.float()).cpu().numpy()
                    bar.update(len(left[start:stop]))
        finally:
            self.train(was_training)
        return scores

    def score_pairs(self, left: Sequence[str], right: Sequence[str], batch_size: int = 32,
                    show_progress: bool = False) -> np.ndarray:
        """``predict`` over two aligned lists of sentences."""
        return self.predict(list(zip(left, right)), batch_size=batch_size, show_progress=show_progress)
