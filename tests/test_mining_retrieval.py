"""Conan dynamic hard-negative mining and CoDiEmb's IR side: the multi-positive InfoNCE loss against hand-computed
values, the task sampler's exact sequence and share, mining on known vectors, IR metrics on known ranks, the
config fields, and tiny end-to-end runs (mining resumed mid-run; retrieval steps with the IR report)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from mixsp_core.cli import main
from mixsp_core.data.corpus import load_nli_triplets, nli_groups
from mixsp_core.errors import ConfigError
from mixsp_core.evaluate.ir import IRBenchmark, build_ir_benchmark, evaluate_ir, ir_metrics, rank_without_self
from mixsp_core.losses import InfoNCELoss, MultiPositiveInfoNCELoss
from mixsp_core.tracking.tracker import NullTracker
from mixsp_core.training.config import load_config
from mixsp_core.training.loop import run_training
from mixsp_core.training.mining import HardNegativeMiner, mine_hard_negatives, mining_pool
from mixsp_core.training.tasks import RETRIEVAL, STS, TaskSampler, batch_tensors, retrieval_groups
from tests.train_helpers import Interrupt, StopAt, one_thread, small_pairs, tiny_config

_one_thread = pytest.fixture(scope="module", autouse=True)(one_thread)


# --------------------------------------------------------------------------- the loss


def test_multi_positive_infonce_matches_hand_computed_values():
    queries = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # norms differ: the loss uses cosines
    candidates = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [-1.0, 0.0]])
    mask = torch.tensor([[True, True, False, False],  # query 0: two positives
                         [False, False, True, False]])  # query 1: one positive; candidate 3 its hard negative
    # cosines: query 0 -> [1, 0.6, 0, -1]; query 1 -> [0, 0.8, 1, 0]; T = 1
    e = math.exp
    loss0 = -math.log((e(1) + e(0.6)) / (e(1) + e(0.6) + e(0) + e(-1)))
    loss1 = -math.log(e(1) / (e(0) + e(0.8) + e(1) + e(0)))
    got = MultiPositiveInfoNCELoss(temperature=1.0)(queries, candidates, mask)
    assert got.item() == pytest.approx((loss0 + loss1) / 2, abs=1e-6)
    # T = 0.5 doubles every logit
    loss0 = -math.log((e(2) + e(1.2)) / (e(2) + e(1.2) + e(0) + e(-2)))
    loss1 = -math.log(e(2) / (e(0) + e(1.6) + e(2) + e(0)))
    assert MultiPositiveInfoNCELoss(0.5)(queries, candidates, mask).item() == pytest.approx((loss0 + loss1) / 2,
                                                                                            abs=1e-6)


def test_one_positive_each_is_the_plain_infonce_and_bad_masks_are_refused():
    g = torch.Generator().manual_seed(0)
    anchor, positive, negative = (torch.randn(3, 5, generator=g) for _ in range(3))
    mask = torch.zeros(3, 6, dtype=torch.bool)
    mask[torch.arange(3), torch.arange(3)] = True
    multi = MultiPositiveInfoNCELoss(0.05)(anchor, torch.cat([positive, negative]), mask)
    assert multi.item() == pytest.approx(InfoNCELoss(0.05)(anchor, positive, negative).item(), rel=1e-5)
    mask[1] = False
    with pytest.raises(ValueError, match="at least one positive"):
        MultiPositiveInfoNCELoss()(anchor, torch.cat([positive, negative]), mask)
    with pytest.raises(ValueError, match="must be"):
        MultiPositiveInfoNCELoss()(anchor, positive, torch.ones(3, 4, dtype=torch.bool))


def test_batch_tensors_mark_each_querys_own_positives(senteval_dir):
    groups = retrieval_groups(senteval_dir / "SNLI", "dev", max_positives=2, max_negatives=1)
    multi = next(g for g in groups if len(g.positives) == 2 and len(g.negatives) == 1)
    single = next(g for g in groups if len(g.positives) == 1 and len(g.negatives) == 0)
    queries, candidates, mask = batch_tensors([multi, single])
    assert queries == [multi.query, single.query]
    assert candidates == [*multi.positives, *multi.negatives, *single.positives]
    assert mask.tolist() == [[True, True, False, False], [False, False, False, True]]
    assert all(len(g.positives) >= 1 for g in groups) and len(groups) == 3074  # SNLI dev premises with entailment


# --------------------------------------------------------------------------- the task sampler


def test_task_sampler_exact_sequence_and_share():
    sampler = TaskSampler(0.3, seed=42)
    code = "".join("R" if t == RETRIEVAL else "." for t in sampler.tasks(40))
    assert code == "..RR.RR...R.R........R......RRRR......R."
    # 6 retrieval steps in every block of 20 (0.3 x 20), 30 in 100 steps
    tasks = sampler.tasks(100)
    assert [tasks[b * 20:(b + 1) * 20].count(RETRIEVAL) for b in range(5)] == [6] * 5
    assert tasks.count(RETRIEVAL) == 30 == sampler.retrieval_steps_before(100)
    # ordinals: each task's steps count 0, 1, 2, ... in order (the streams of each task advance by one)
    ordinals = [sampler.at(s) for s in range(100)]
    assert [o for t, o in ordinals if t == RETRIEVAL] == list(range(30))
    assert [o for t, o in ordinals if t == STS] == list(range(70))
    # a share that does not divide the block: floor(steps * share) after whole blocks, carried over blocks
    odd = TaskSampler(0.33, seed=1)
    assert [odd.retrieval_steps_before(20 * b) for b in range(1, 6)] == [6, 13, 19, 26, 33]
    assert TaskSampler(0.29, 0).retrieval_steps_before(100) == 29  # 0.29 * 100 is 28.999... in floating point
    # a function of (seed, step): same seed same order, another seed another order; share 0: STS only
    assert TaskSampler(0.3, 42).tasks(100) == tasks and TaskSampler(0.3, 43).tasks(100) != tasks
    assert set(TaskSampler(0.0, 42).tasks(50)) == {STS}


# --------------------------------------------------------------------------- mining


def _unit(*rows):
    return torch.nn.functional.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


def test_mining_skips_the_positive_and_its_near_duplicates():
    anchors = _unit([1, 0, 0], [0, 0, 1])
    positives = _unit([0.9, 0.1, 0], [0.1, 0, 0.9])
    pool = _unit([0.9, 0.1, 0],     # 0: anchor 0's positive itself (same text)
                 [0.9, 0.12, 0.01],  # 1: a near-duplicate of that positive (cosine > 0.99)
                 [0.8, 0.6, 0],     # 2: cosine to anchor 0 0.8, to its positive 0.86
                 [0.7, 0, 0.7],     # 3: 0.71 to anchor 0; 0.71 to anchor 1, 0.78 to its positive
                 [0, 1, 0],         # 4
                 [-1, 0, 0],        # 5
                 [0.1, 0, 0.9])     # 6: anchor 1's positive, but as another text: skipped as a near-duplicate
    result = mine_hard_negatives(anchors, pool, positives, [[0], [1]], [{0}, set()], count=2, threshold=0.95)
    # anchor 0 ranks 0, 1, 2, 3, ...: 0 is its positive, 1 a near-duplicate; anchor 1 ranks 6, 3, ...
    # anchor 1 ranks 6 (0.99: a near-duplicate of its positive), 3 (0.71), 1 (0.01), ...
    assert result.indices.tolist() == [[2, 3], [3, 1]]
    assert result.skipped_positives == 1 and result.skipped_duplicates == 2
    # a lower threshold also skips row 2 (cosine 0.86 to anchor 0's positive)
    strict = mine_hard_negatives(anchors[:1], pool, positives, [[0]], [{0}], count=2, threshold=0.85)
    assert strict.indices.tolist() == [[3, 6]] and strict.skipped_duplicates == 2
    # fewer survivors than asked: they repeat
    few = mine_hard_negatives(anchors[:1], pool[:3], positives, [[0]], [{0}], count=2, threshold=0.95)
    assert few.indices.tolist() == [[2, 2]]


def _triplets(senteval_dir, n=24):
    return load_nli_triplets(senteval_dir / "SNLI", "dev").head(n).reset_index(drop=True)


def test_pool_puts_hypotheses_first_and_the_miner_reloads_its_file(tiny_bert_dir, senteval_dir, tmp_path):
    triplets = _triplets(senteval_dir)
    hypotheses = set(triplets["positive"]) | set(triplets["hard_negative"])
    config = tiny_config(tiny_bert_dir, loss={"infonce": 0.5}, data={"nli": True},
                         train={"mine_every": 2, "mine_pool_size": len(hypotheses) + 10, "mine_negatives": 2})
    corpus = [f"corpus sentence number {i}" for i in range(30)]
    pool = mining_pool(config, triplets, corpus, None)
    assert len(pool) == len(hypotheses) + 10 == len(set(pool))
    assert set(pool[:len(hypotheses)]) == hypotheses and set(pool[len(hypotheses):]) <= set(corpus)
    assert mining_pool(config, triplets, corpus, None) == pool

    miner = HardNegativeMiner(config, triplets, pool)
    assert miner.negatives(np.array([0, 3])) == list(triplets["hard_negative"].iloc[[0, 3]])  # static before mining
    saved = np.tile(np.array([[5, 7]]), (len(triplets), 1))
    (tmp_path / "mined").mkdir()
    np.save(tmp_path / "mined" / "step-4.npy", saved)
    np.save(tmp_path / "mined" / "step-6.npy", saved + 1)  # after the resumed step: not read

    def refuse(model):
        raise AssertionError("mined again")

    miner.mine = refuse
    from mixsp_core.training.distributed import setup

    ctx = setup(torch.device("cpu"))
    miner.step(5, None, tmp_path, ctx, NullTracker())  # resumed at step 5: the step-4 mining, not step 6's
    assert miner.table_step == 4 and miner.negatives(np.array([1])) == [pool[5], pool[7]]
    with pytest.raises(AssertionError, match="mined again"):
        miner.step(6, None, tmp_path, ctx, NullTracker())


# --------------------------------------------------------------------------- IR metrics


def test_ir_metrics_on_known_ranks():
    ranked = np.array([[5, 3, 1, 0, 2, 4, 6, 8, 10, 11],
                       [0, 1, 2, 3, 4, 5, 6, 8, 9, 7],
                       [0, 1, 2, 3, 4, 5, 6, 8, 9, 10]])
    positives = [np.array([3, 9]), np.array([7]), np.array([7, 12])]
    metrics = ir_metrics(ranked, positives, k=10)
    assert metrics["recall@10"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    assert metrics["mrr@10"] == pytest.approx((1 / 2 + 1 / 10 + 0.0) / 3)
    assert ir_metrics(ranked, positives, k=2) == {"recall@2": pytest.approx(0.5 / 3), "mrr@2": pytest.approx(0.5 / 3)}


def test_search_leaves_the_query_out_and_evaluate_ir_scores_a_toy_corpus():
    angles = np.radians([0, 5, 20, 40, 60, 80, 100, 115, 130, 145, 160, 170, 180])  # distance from 0 grows
    corpus = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
    queries = corpus[[0, 4]]  # corpus rows 0 and 4 are the queries' own texts
    ranked = rank_without_self(corpus, queries, np.array([0, -1]), k=10)
    assert ranked[0].tolist() == list(range(1, 11))  # by angle from 0, itself left out
    assert ranked[1, 0] == 4  # not left out: -1 means the query text is not in the corpus

    texts = [f"s{i}" for i in range(len(corpus))]
    vectors = dict(zip(texts, corpus))

    class Lookup:
        def encode(self, sentences, batch_size=0, show_progress=False):
            return np.stack([vectors[s] for s in sentences])

    bench = IRBenchmark(texts, ["s0", "s1"], ["snli-test", "stsb-dev"], [np.array([2, 11]), np.array([0])],
                        np.array([0, 1]))
    result = evaluate_ir(Lookup(), bench)
    # query s0: s2 at rank 2, s11 at rank 11 (outside the top 10) -> recall 0.5, RR 1/2; query s1: s0 first
    assert result["recall@10"] == pytest.approx(0.75) and result["mrr@10"] == pytest.approx(0.75)
    assert result["snli-test"] == {"queries": 1, "recall@10": 0.5, "mrr@10": 0.5}
    assert result["corpus"] == 13 and result["queries"] == 2


def test_ir_benchmark_from_the_shared_data_and_the_cli(tiny_bert_dir, senteval_dir, tmp_path):
    full = build_ir_benchmark(senteval_dir)
    assert len(full.corpus) >= 100_000 and len(set(full.corpus)) == len(full.corpus)
    assert set(full.sources) == {"snli-test", "stsb-dev"} and all(len(p) for p in full.positives)
    snli_test = set(nli_groups(senteval_dir / "SNLI", "test"))
    assert {q for q, s in zip(full.queries, full.sources) if s == "snli-test"} <= snli_test
    assert all(q not in {full.corpus[i] for i in p} for q, p in zip(full.queries, full.positives))
    capped = build_ir_benchmark(senteval_dir, max_corpus=4000)
    assert len(capped.corpus) == 4000 and capped.queries == full.queries
    assert [[capped.corpus[i] for i in p] for p in capped.positives] == [[full.corpus[i] for i in p]
                                                                          for p in full.positives]
    out = tmp_path / "ir.json"
    assert main(["ir", "--model", str(tiny_bert_dir), "--max-corpus", "4000", "--json", str(out),
                 "--device", "cpu", "--batch-size", "256"]) == 0
    report = json.loads(out.read_text())
    assert report["corpus"] == 4000 and 0.0 <= report["mrr@10"] <= report["recall@10"] * 10
    assert main(["ir", "--model", str(tiny_bert_dir), "--max-corpus", "10", "--json", str(out)]) == 2


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize("overrides, field", [
    ({"train": {"mine_every": 5}}, "train.mine_every"),  # no InfoNCE term to mine for
    ({"loss": {"retrieval": 1.0}}, "train.retrieval_share"),
    ({"train": {"retrieval_share": 0.2}}, "loss.retrieval"),
    ({"loss": {"retrieval": 1.0}, "train": {"retrieval_share": 1.0}}, "train.retrieval_share"),
    ({"train": {"mine_duplicate_threshold": 0.0}}, "train.mine_duplicate_threshold"),
    ({"train": {"mine_negatives": 0}}, "train.mine_negatives"),
    ({"train": {"retrieval_batch_size": 1}}, "train.retrieval_batch_size"),
    ({"train": {"retrieval_eval_max_corpus": 5000}}, "train.retrieval_eval_max_corpus"),
    ({"loss": {"retrieval_temperature": 0.0}}, "loss.retrieval_temperature"),
    ({"data": {"nli_splits": ["train"]}}, "data.nli_splits"),
    ({"data": {"nli_splits": []}}, "data.nli_splits"),
])
def test_bad_settings_name_their_field(tiny_bert_dir, overrides, field):
    with pytest.raises(ConfigError) as err:
        tiny_config(tiny_bert_dir, **overrides)
    assert err.value.field == field


@pytest.mark.parametrize("name", ["bi_conan_mining", "bi_codiemb_ir"])
def test_the_configs_validate(name):
    config = load_config(Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml")
    assert config.model.encoder == "sentence-transformers/all-MiniLM-L6-v2" and config.train.retrieval_eval
    assert config.data.nli_splits == ["dev"] or not config.data.nli  # SNLI test is the IR benchmark's


# --------------------------------------------------------------------------- end to end


def test_mining_run_resumes_with_its_saved_negatives(tiny_bert_dir, senteval_dir, tmp_path):
    pairs = small_pairs(senteval_dir)
    triplets = _triplets(senteval_dir, 32)
    corpus = list(pd.unique(pairs["sentence1"]))[:30]
    config = tiny_config(tiny_bert_dir, loss={"infonce": 0.5}, data={"nli": True},
                         train={"nli_batch_size": 8, "mine_every": 2, "mine_pool_size": 60, "mine_negatives": 2,
                                "mine_duplicate_threshold": 0.98})
    full = NullTracker()
    run_training(config, pairs, corpus, out_dir=tmp_path / "full", tracker=full, triplets=triplets,
                 show_progress=False)
    mined = sorted(p.name for p in (tmp_path / "full" / "mined").iterdir())
    assert mined == ["step-2.npy", "step-4.npy", "step-6.npy"]
    table = np.load(tmp_path / "full" / "mined" / "step-4.npy")
    assert table.shape == (32, 2) and table.max() < 60
    assert [s for s, _ in full.series("mine/seconds")] == [2, 4, 6]
    # no anchor is given its own positive or anchor text
    pool = mining_pool(config, triplets, corpus, None)
    for row, (anchor, positive) in enumerate(zip(triplets["anchor"], triplets["positive"])):
        assert not {pool[i] for i in table[row]} & {anchor, positive}

    with pytest.raises(Interrupt):
        run_training(config, pairs, corpus, out_dir=tmp_path / "cut", tracker=StopAt(6), triplets=triplets,
                     show_progress=False)
    resumed = NullTracker()
    run_training(config, pairs, corpus, out_dir=tmp_path / "cut", tracker=resumed, triplets=triplets,
                 show_progress=False)
    # resumed at step 4 with the step-4 mining reloaded (not mined again), then the same trajectory
    assert [s for s, _ in resumed.series("mine/seconds")] == [6]
    assert resumed.series("train/loss") == [p for p in full.series("train/loss") if p[0] >= 5]
    assert np.array_equal(np.load(tmp_path / "cut" / "mined" / "step-6.npy"),
                          np.load(tmp_path / "full" / "mined" / "step-6.npy"))


def test_codiemb_run_trains_retrieval_steps_and_reports_ir(tiny_bert_dir, senteval_dir, tmp_path):
    pairs = small_pairs(senteval_dir)
    config = tiny_config(tiny_bert_dir, loss={"retrieval": 1.0}, data={"nli_dir": str(senteval_dir / "SNLI")},
                         train={"max_steps": 6, "eval_every": 3, "retrieval_share": 0.5, "retrieval_batch_size": 4,
                                "retrieval_eval": True, "retrieval_eval_max_corpus": 4000})
    tracker = NullTracker()
    result = run_training(config, pairs, out_dir=tmp_path / "c", tracker=tracker, show_progress=False)
    sampler = TaskSampler(0.5, config.seed)
    retrieval_steps = [s + 1 for s in range(6) if sampler.at(s)[0] == RETRIEVAL]
    assert retrieval_steps and [s for s, _ in tracker.series("train/retrieval")] == retrieval_steps
    assert [s for s, _ in tracker.series("train/cosent")] == [s for s in range(1, 7) if s not in retrieval_steps]
    report = json.loads((tmp_path / "c" / "metrics.json").read_text())
    assert report["ir"]["corpus"] == 4000 and set(report["ir"]) >= {"recall@10", "mrr@10", "snli-test", "stsb-dev"}
    assert report["ir"]["snli_test_in_training"] is False and "best" in report
    assert [s for s, _ in tracker.series("ir/recall@10")] == [6] and result.steps == 6
