"""Each loss against a value computed by hand (small numbers, closed forms)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mixsp_core.losses import (
    CoSENTLoss,
    DistillLoss,
    InfoNCELoss,
    ListwiseRankLoss,
    PearsonLoss,
    RankKLLoss,
    RoutingLoss,
    ScoreBCELoss,
    SimilarityDistillLoss,
    fit_pca_projection,
)

T = torch.tensor


def test_cosent_by_hand():
    cos, gold = T([0.9, 0.2, 0.5]), T([5.0, 1.0, 3.0])
    # ordered pairs (i, j) with gold_i > gold_j: (0,1), (0,2), (2,1); terms exp(20 (cos_j - cos_i))
    expected = math.log(1 + math.exp(20 * (0.2 - 0.9)) + math.exp(20 * (0.5 - 0.9)) + math.exp(20 * (0.2 - 0.5)))
    assert CoSENTLoss(20.0)(cos, gold).item() == pytest.approx(expected, rel=1e-4)


def test_cosent_penalises_inverted_order_and_ignores_ties():
    loss = CoSENTLoss(20.0)
    assert loss(T([0.1, 0.9]), T([5.0, 1.0])).item() == pytest.approx(math.log(1 + math.exp(16)), rel=1e-4)
    assert loss(T([0.1, 0.9]), T([2.0, 2.0])).item() == 0.0


def test_pearson_by_hand():
    cos, gold = T([1.0, 2.0, 4.0]), T([1.0, 2.0, 3.0])
    # x - mean = (-4/3, -1/3, 5/3); y - mean = (-1, 0, 1); r = 3 / (sqrt(42/9) * sqrt(2))
    r = 3.0 / (math.sqrt(42 / 9) * math.sqrt(2))
    assert PearsonLoss()(cos, gold).item() == pytest.approx(1 - r, rel=1e-4)
    assert PearsonLoss()(T([0.3, 0.1]), T([2.0, 2.0])).item() == 0.0


def test_rank_kl_by_hand():
    cos, gold, t = T([0.2, 0.4, 0.1]), T([1.0, 4.0, 4.0]), 0.5
    # average ranks (1 = lowest): [1, 2.5, 2.5] -> scaled (r - 1) / 2 = [0, 0.75, 0.75]
    ideal = np.array([0.0, 0.75, 0.75])
    p = np.exp(ideal / t) / np.exp(ideal / t).sum()
    q = np.exp(np.array([0.2, 0.4, 0.1]) / t)
    q /= q.sum()
    expected = float((p * np.log(p / q)).sum())
    assert RankKLLoss(t)(cos, gold).item() == pytest.approx(expected, rel=1e-4)
    # a prediction in the target's exact shape costs ~0
    assert RankKLLoss(t)(T(ideal * 1.0).float(), gold).item() == pytest.approx(0.0, abs=1e-6)


def test_listwise_by_hand():
    cos, gold, t = T([0.5, 0.2, 0.4]), T([3.0, 1.0, 2.0]), 1.0
    # k=0 (gold 3): lower j = 1 (w=2), 2 (w=1); w_top = 2 -> logits [0.5*2, 0.2*2, 0.4*1]
    # k=2 (gold 2): lower j = 1 (w=1) -> logits [0.4*1, 0.2*1]; k=1 has none
    def nll(logits):
        return -(logits[0] - math.log(sum(math.exp(v) for v in logits)))
    expected = (nll([1.0, 0.4, 0.4]) + nll([0.4, 0.2])) / 2
    assert ListwiseRankLoss(t)(cos, gold).item() == pytest.approx(expected, rel=1e-4)
    assert ListwiseRankLoss(t)(T([0.1, 0.2]), T([1.0, 1.0])).item() == 0.0


def test_routing_loss_by_hand():
    gate, upper = T([[0.0, 0.8], [0.6, 0.0]]), T([True, False])
    lower_n, upper_n = 3, 1
    w = [4 / 3, 4 / 1]  # total / count: pos_weight of column 0 (lower) and 1 (upper)

    def bce(x, y, pw):
        s = 1 / (1 + math.exp(-x))
        return -(pw * y * math.log(s) + (1 - y) * math.log(1 - s))

    terms = [bce(0.0, 0, w[0]), bce(0.8, 1, w[1]), bce(0.6, 1, w[0]), bce(0.0, 0, w[1])]
    assert RoutingLoss((lower_n, upper_n))(gate, upper).item() == pytest.approx(sum(terms) / 4, rel=1e-4)


def test_routing_loss_prefers_the_right_projector():
    loss = RoutingLoss((1, 1))
    right = loss(T([[0.0, 0.9]]), T([True]))
    wrong = loss(T([[0.9, 0.0]]), T([True]))
    assert right < wrong


def test_distill_mse_by_hand():
    assert DistillLoss()(T([[1.0, 2.0]]), T([[0.0, 4.0]])).item() == pytest.approx((1 + 4) / 2)


def test_similarity_distill_by_hand():
    # student cosines of the pairs (0,1), (0,2), (1,2): 0, 1/sqrt(2), 1/sqrt(2); teacher's: 1, 0, 0
    student, teacher = T([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), T([[1.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 3.0]])
    expected = (1 + 0.5 + 0.5) / 3
    assert SimilarityDistillLoss()(student, teacher).item() == pytest.approx(expected, abs=1e-6)


def test_similarity_distill_ignores_scale_and_basis_but_not_geometry():
    rng = np.random.default_rng(0)
    teacher = T(rng.normal(size=(8, 5)), dtype=torch.float32)
    rotation = T(np.linalg.qr(rng.normal(size=(5, 5)))[0], dtype=torch.float32)
    loss = SimilarityDistillLoss()
    assert loss(3.0 * teacher @ rotation, teacher).item() == pytest.approx(0.0, abs=1e-6)
    student = T(rng.normal(size=(8, 5)), dtype=torch.float32, requires_grad=True)
    value = loss(student, teacher)
    value.backward()
    assert value.item() > 0.01 and student.grad.abs().sum() > 0
    assert loss(student[:1], teacher[:1]).item() == 0.0  # one sentence: no pair


def test_fit_pca_projection_is_uncentred_svd():
    rng = np.random.default_rng(0)
    teacher = rng.normal(size=(50, 6)).astype(np.float32) + 3.0  # a large mean: centring would matter
    targets, comps = fit_pca_projection(teacher, 2)
    _, _, vt = np.linalg.svd(teacher.astype(np.float64), full_matrices=False)
    # same subspace as the top-2 right singular vectors of the raw (uncentred) matrix
    proj_ours = comps.T @ comps
    proj_svd = vt[:2].T @ vt[:2]
    assert np.allclose(proj_ours, proj_svd, atol=1e-4)
    assert np.allclose(targets, teacher @ comps.T, atol=1e-4)


def test_infonce_by_hand():
    a = T([[1.0, 0.0], [0.0, 1.0]])
    p = T([[1.0, 0.0], [0.0, 1.0]])
    n = T([[0.0, 1.0], [1.0, 0.0]])
    t = 0.5
    # anchor 0 vs candidates [p0, p1, n0, n1] cosines [1, 0, 0, 1]; target p0
    row = [1 / t, 0.0, 0.0, 1 / t]
    expected = -(row[0] - math.log(sum(math.exp(v) for v in row)))
    assert InfoNCELoss(t)(a, p, n).item() == pytest.approx(expected, rel=1e-4)


def test_score_bce_by_hand():
    logits, gold = T([0.0, 2.0]), T([5.0, 1.0])
    s = 1 / (1 + math.exp(-2.0))
    expected = (-math.log(0.5) - (0.2 * math.log(s) + 0.8 * math.log(1 - s))) / 2
    assert ScoreBCELoss()(logits, gold).item() == pytest.approx(expected, rel=1e-4)
