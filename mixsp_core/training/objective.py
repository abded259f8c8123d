"""The optimisation side of a run: the weighted loss of one step (:class:`Objective`, fed by
:func:`step_terms`), AdamW with its learning-rate schedule, and the update (:func:`optimizer_step`)."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mixsp_core.losses import (
    CoSENTLoss,
    DistillLoss,
    InfoNCELoss,
    ListwiseRankLoss,
    MultiPositiveInfoNCELoss,
    ModulusLoss,
    PearsonLoss,
    RankKLLoss,
    RoutingLoss,
    ScoreBCELoss,
    SimCSELoss,
    SimilarityDistillLoss,
)
from mixsp_core.losses.matryoshka import MatryoshkaLoss, alignment_loss, ese_pca, layer_weight
from mixsp_core.training.config import LOSS_TERMS, STS_TERMS, RunConfig

if TYPE_CHECKING:  # annotations only
    from mixsp_core.training.batches import TrainData
    from mixsp_core.training.distributed import DistContext


def make_optimizer(model: nn.Module, config: RunConfig) -> torch.optim.AdamW:
    """AdamW; no weight decay on biases and norms; the added layers may get their own ``head_lr``."""
    tc = config.train
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = defaultdict(list)
    for name, param in model.named_parameters():
        head = not name.startswith("encoder.")
        no_decay = name.endswith(".bias") or "norm" in name.lower()
        groups[(head, no_decay)].append(param)
    param_groups = [
        {"params": params, "weight_decay": 0.0 if no_decay else tc.weight_decay,
         "lr": (tc.head_lr or tc.lr) if head else tc.lr}
        for (head, no_decay), params in sorted(groups.items())
    ]
    return torch.optim.AdamW(param_groups, lr=tc.lr)


def linear_schedule(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from 0 over ``warmup`` steps, then linear decay to 0 at ``total``."""

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


Gather = Callable[[torch.Tensor], torch.Tensor]


def _no_gather(tensor: torch.Tensor) -> torch.Tensor:
    """One process holds the whole batch: nothing to gather."""
    return tensor


class Objective(nn.Module):
    """The weighted sum of the configured loss terms for one step; returns the total and each term.

    Each ``*_terms`` method runs the forward pass on this process's rows and passes what the losses
    need through ``gather`` (identity in one process; :meth:`mixsp_core.training.distributed.DistContext.gather`
    under torchrun), so every term is computed on the global batch. ``forward`` is what runs the model
    (the DDP wrapper when distributed; ``model`` itself by default).

    Trained-in compression (bi only), with A = the weighted sum of the STS terms:
    ``matryoshka``: sum over prefix sizes k of A(e[:k]); ``ese_alignment``: ESE's D(e[:m], PCA_m(e));
    ``layers``: 2DMSE's layer-weighted [A(e_i) + prefixes + alignment] on the embedding from an earlier
    encoder layer i, drawn per step from (seed, step) (``layer_mode: sample``) or all layers averaged (``all``).
    """

    def __init__(self, config: RunConfig, class_counts: tuple[int, int]):
        super().__init__()
        lc = config.loss
        self.weights = {name: getattr(lc, name) for name in LOSS_TERMS if getattr(lc, name) > 0}
        self.threshold = config.data.upper_threshold
        self.seed = config.seed
        self.cosent = CoSENTLoss(lc.cosent_scale)
        self.pearson = PearsonLoss()
        self.rank_kl = RankKLLoss(lc.rank_kl_temperature)
        self.listwise = ListwiseRankLoss(lc.rank_kl_temperature)
        self.score_bce = ScoreBCELoss()
        self.routing = RoutingLoss(class_counts)
        self.distill = DistillLoss()
        self.distill_sim = SimilarityDistillLoss()
        self.infonce = InfoNCELoss(lc.infonce_temperature)
        self.retrieval = MultiPositiveInfoNCELoss(lc.retrieval_temperature)  # CoDiEmb's retrieval steps
        self.simcse = SimCSELoss(lc.simcse_temperature, lc.simcse_symmetric)  # 2-Tier SimCSE
        self.layer_mode, self.ese_dim = lc.layer_mode, lc.ese_dim
        # prefixes only: the full-width term is the STS terms themselves
        self.prefixes = MatryoshkaLoss(self.sts, lc.matryoshka_dims, full_weight=0.0, ese_dim=None)
        # one earlier layer's stack: full + (prefixes when matryoshka is on) + (alignment when ESE is on)
        self.layer_stack = MatryoshkaLoss(self.sts, lc.matryoshka_dims if lc.matryoshka > 0 else [],
                                          full_weight=1.0, ese_dim=lc.ese_dim if lc.ese_alignment > 0 else None)
        # JTCSE: the modulus constraint on positive pairs; the twin towers' terms (training.jtcse.TwinTerms) when set
        self.modulus = ModulusLoss(lc.modulus_form)
        self.twin_terms: Callable[..., dict[str, torch.Tensor]] | None = None

    def sts(self, cos: torch.Tensor, gold: torch.Tensor) -> torch.Tensor:
        """A(cos, gold): the weighted STS terms, the base loss of the Matryoshka and layer terms."""
        return sum(self.weights[name] * getattr(self, name)(cos, gold) for name in STS_TERMS if name in self.weights)

    def layers_for_step(self, step: int, num_layers: int) -> list[int]:
        """Earlier layers (1-based, below ``num_layers``) whose embeddings the ``layers`` term needs."""
        if "layers" not in self.weights or num_layers < 2:
            return []
        if self.layer_mode == "all":
            return list(range(1, num_layers))
        # a function of (seed, step), like the batches: every rank and a resumed run draw the same layer
        return [int(np.random.default_rng([self.seed, 3, step]).integers(1, num_layers))]

    def pair_terms(self, model: nn.Module, left: list[str], right: list[str], gold: torch.Tensor, step: int = 0,
                   forward: Callable | None = None, gather: Gather = _no_gather) -> dict[str, torch.Tensor]:
        """Terms on a batch of pairs: this process's ``left`` / ``right`` rows, ``gold`` of the global batch."""
        forward = forward or model
        upper = gold >= self.threshold
        terms: dict[str, torch.Tensor] = {}
        if model.kind == "cross":
            out = forward(model.tokenize_pairs(left, right))
            terms["score_bce"] = self.score_bce(gather(out.logits), gold)
            gates = (out.routing_a.gate, out.routing_b.gate)
        else:
            layers = self.layers_for_step(step, model.num_layers)
            out = forward(model.tokenize(left + right), layers=layers)
            n = len(left)
            a, b = gather(out.embedding[:n]), gather(out.embedding[n:])
            cos = F.cosine_similarity(a.float(), b.float(), dim=-1)
            for name in STS_TERMS:
                if name in self.weights:
                    terms[name] = getattr(self, name)(cos, gold)
            if "modulus" in self.weights:  # a, b: the embeddings before normalisation
                terms["modulus"] = self.modulus(a, b, upper)
            if "matryoshka" in self.weights:
                terms["matryoshka"] = self.prefixes(a, b, gold)
            if "ese_alignment" in self.weights and self.ese_dim < a.shape[-1]:
                both = torch.cat([a, b], dim=0)  # every sentence of the batch shapes the PCA target
                terms["ese_alignment"] = alignment_loss(both[:, : self.ese_dim], ese_pca(both, self.ese_dim))
            if layers:
                per_layer = [layer_weight(i) * self.layer_stack(gather(e[:n]), gather(e[n:]), gold)
                             for i, e in sorted(out.layer_embeddings.items())]
                terms["layers"] = sum(per_layer) / len(per_layer)
            gate = out.routing.gate
            gates = (gate[:n], gate[n:]) if gate is not None else (None, None)
        if "routing" in self.weights and gates[0] is not None:
            terms["routing"] = (self.routing(gather(gates[0]), upper) + self.routing(gather(gates[1]), upper)) / 2
        return terms

    def distill_terms(self, model: nn.Module, sentences: list[str], targets: torch.Tensor,
                      forward: Callable | None = None, gather: Gather = _no_gather) -> dict[str, torch.Tensor]:
        """HPD's MSE and/or the similarity MSE (whichever is weighted): this process's ``sentences``;
        ``targets`` of the global batch."""
        student = gather((forward or model)(model.tokenize(sentences)).embedding)
        terms = {}
        if "distill" in self.weights:
            terms["distill"] = self.distill(student, targets)
        if "distill_sim" in self.weights:
            terms["distill_sim"] = self.distill_sim(student, targets)
        return terms

    def nli_term(self, model: nn.Module, anchor: list[str], positive: list[str], negative: list[str],
                 forward: Callable | None = None, gather: Gather = _no_gather) -> torch.Tensor:
        """InfoNCE over the global batch: every rank's positives and hard negatives are candidates."""
        return self.nli_terms(model, anchor, positive, negative, forward, gather)["infonce"]

    def nli_terms(self, model: nn.Module, anchor: list[str], positive: list[str], negative: list[str],
                  forward: Callable | None = None, gather: Gather = _no_gather) -> dict[str, torch.Tensor]:
        """``infonce`` (as :meth:`nli_term`) and, when weighted, ``modulus_nli``: the modulus constraint on the
        (anchor, entailment) pairs."""
        n = len(anchor)
        emb = (forward or model)(model.tokenize(anchor + positive + negative)).embedding
        anchors, positives = gather(emb[:n]), gather(emb[n:2 * n])
        terms = {"infonce": self.infonce(anchors, positives, gather(emb[2 * n:]))}
        if "modulus_nli" in self.weights:
            terms["modulus_nli"] = self.modulus(anchors, positives)
        return terms

    def total(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(self.weights[name] * value for name, value in terms.items())


def step_terms(objective: Objective, model: nn.Module, net: nn.Module, data: TrainData, step: int,
               ctx: DistContext, distill: bool) -> dict[str, torch.Tensor]:
    """The loss terms of ``step``: its batch of pairs, plus its distillation batch (when ``distill``:
    ``loss.uses_teacher``) and its NLI batch (when ``data.nli`` is set); each rank encodes its slice of
    the global batches, ``net`` is what runs ``model`` (its DDP wrapper when distributed)."""
    if data.tasks is not None:  # CoDiEmb: one task per step; the STS streams advance on STS steps only
        from mixsp_core.training.tasks import RETRIEVAL, retrieval_terms

        task, step = data.tasks.at(step)
        if task == RETRIEVAL:
            return retrieval_terms(objective, model, data.retrieval, step, ctx, net)
    from mixsp_core.training.unsupervised import unsupervised_terms, uses_pairs  # 2-Tier SimCSE

    terms = unsupervised_terms(objective, model, net, data, step, ctx)
    if uses_pairs(objective.weights):  # a stage on SimCSE sentences or NLI triplets alone encodes no pairs
        idx = data.pairs.indices(step)
        local = ctx.shard(idx)
        gold = torch.as_tensor(data.gold[idx], device=ctx.device)
        left, right = list(data.train["sentence1"].iloc[local]), list(data.train["sentence2"].iloc[local])
        terms |= objective.pair_terms(model, left, right, gold, step, net, ctx.gather)
        if objective.twin_terms is not None:  # JTCSE twin towers (one process: the local rows are the batch)
            terms |= objective.twin_terms(objective, model, left, right, gold)
    if distill:
        rows = data.distill.indices(step)
        terms |= objective.distill_terms(
            model, [data.distill_sentences[i] for i in ctx.shard(rows)],
            torch.as_tensor(data.distill_targets[rows], device=ctx.device), net, ctx.gather)
    if data.nli is not None:
        local_rows = ctx.shard(data.nli.indices(step))
        rows = data.triplets.iloc[local_rows]
        # Conan: the latest mined negatives (train.mine_negatives per row) replace the static ones
        negatives = data.mined.negatives(local_rows) if data.mined is not None else list(rows["hard_negative"])
        terms |= objective.nli_terms(model, list(rows["anchor"]), list(rows["positive"]), negatives, net, ctx.gather)
    return terms


def optimizer_step(loss: torch.Tensor, model: nn.Module, optimizer: torch.optim.Optimizer,
                   scaler: torch.amp.GradScaler | None, ctx: DistContext, grad_clip: float) -> float:
    """Backpropagate ``loss``, clip and step; returns the gradient norm before clipping (logged: a
    check that every rank's update is the global batch's)."""
    optimizer.zero_grad(set_to_none=True)
    # every rank holds the same global loss but only its own slice's gradient: DDP averages the
    # slices, so scale by the world size to get the global loss's gradient
    scaled = loss * ctx.grad_scale if ctx.enabled else loss
    if scaler is not None:
        scaler.scale(scaled).backward()
        scaler.unscale_(optimizer)
    else:
        scaled.backward()
    grad_norm = float(nn.utils.clip_grad_norm_(model.parameters(), grad_clip or math.inf))
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return grad_norm
