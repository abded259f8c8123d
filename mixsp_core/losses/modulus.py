"""JTCSE's tensor-modulus constraint on positive pairs (Zong et al., 2025, "JTCSE: Joint Tensor-Modulus
Constraints and Cross-Attention for Unsupervised Contrastive Learning of Sentence Embeddings"; the modulus
term itself is TNCSE's, Zong et al., AAAI 2025).

A cosine loss only sees the angle between two representations; their moduli (norms) are free. TNCSE's
term for a positive pair (h, h+) with ``||h+|| = k ||h||`` and ``cos(h, h+) = t`` is the Euclidean distance
relative to the moduli::

    l_TN(h, h+) = ||h - h+|| / (||h|| + ||h+||) = sqrt(1 + k^2 - 2 k t) / (1 + k)

which lies in [0, 1], is 0 only for h == h+ and, for a fixed angle, is smallest at k = 1: it pulls the two
moduli *together* (towards each other's, not towards a fixed target modulus) as well as the directions.
JTCSE's released code (``LTN_loss``) multiplies it by the angular term ``-log(cos)``, with the cosine
floored at a small positive value: the pair's loss is large only when both the angle and the moduli differ.
That code takes the cosine on the [CLS] states and the moduli on BERT's pooler outputs; here both come from
the one embedding the STS loss sees (before L2 normalisation). Positive pairs are the caller's: in this
project STS pairs with gold >= ``data.upper_threshold`` and NLI (anchor, entailment) pairs, where the
unsupervised paper has two dropout views of one sentence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MODULUS_FORMS = ("joint", "distance", "ratio")


class ModulusLoss(nn.Module):
    """Mean over the positive pairs of a batch of one of (``form``):

    * ``joint`` (JTCSE, as its released code): ``-log(max(cos(a, b), eps)) * ||a - b|| / (||a|| + ||b||)``;
      the code's extra constant factor 1/2 is left to the term's weight;
    * ``distance`` (TNCSE's l_TN alone): ``||a - b|| / (||a|| + ||b||)``;
    * ``ratio`` (the moduli only, no angle): ``| ||a|| - ||b|| | / (||a|| + ||b||)``.

    Expects ``a``, ``b`` ``[batch, k]``: the two sides' representations *before* L2 normalisation (the
    student's ``StudentOutput.embedding``; a normalised vector has modulus 1 and the term is then only
    angular), and ``positive`` ``[batch]`` (bool; None: every pair is positive). A batch without a positive
    pair gives 0 (still connected to the graph, so the backward pass is unchanged). ``eps`` floors the cosine
    inside the log (JTCSE floors negative cosines at 1e-4) and the moduli in the denominator.
    """

    def __init__(self, form: str = "joint", eps: float = 1e-4):
        super().__init__()
        if form not in MODULUS_FORMS:
            raise ValueError(f"form must be one of {', '.join(MODULUS_FORMS)}, got {form!r}")
        self.form, self.eps = form, eps

    def forward(self, a: torch.Tensor, b: torch.Tensor, positive: torch.Tensor | None = None) -> torch.Tensor:
        a, b = a.float(), b.float()
        if positive is not None:
            keep = positive.to(a.device).bool().reshape(-1)
            a, b = a[keep], b[keep]
        if a.shape[0] == 0:
            return a.sum() * 0.0
        norm_a, norm_b = a.norm(dim=-1), b.norm(dim=-1)
        moduli = (norm_a + norm_b).clamp_min(self.eps)
        if self.form == "ratio":
            return ((norm_a - norm_b).abs() / moduli).mean()
        # sqrt of a floored square: a pair of identical vectors (the same sentence twice) has distance 0,
        # where the norm's gradient is 0/0
        relative = ((a - b).pow(2).sum(dim=-1).clamp_min(self.eps ** 4)).sqrt() / moduli
        if self.form == "distance":
            return relative.mean()
        cos = F.cosine_similarity(a, b, dim=-1, eps=self.eps).clamp_min(self.eps)
        return (-torch.log(cos) * relative).mean()
