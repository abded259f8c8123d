"""Training on a tiny random BERT: loss goes down, runs are deterministic, resume continues the run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mixsp_core.errors import CheckpointError, ConfigError
from mixsp_core.models.checkpoint import load_checkpoint, read_weights
from mixsp_core.paths import RunDir
from mixsp_core.tracking.tracker import NullTracker
from mixsp_core.training.batches import BatchStream, NeighbourBatches, distill_batches, nearest_neighbours, select_pairs
from mixsp_core.training.config import config_from_dict
from mixsp_core.training.loop import run_training
from mixsp_core.training.objective import Objective
from mixsp_core.training.resume import can_resume, resume_state
from tests.train_helpers import Interrupt, StopAt, one_thread, small_pairs, tiny_config

_one_thread = pytest.fixture(scope="module", autouse=True)(one_thread)


@pytest.fixture(scope="module")
def pairs(senteval_dir):
    return small_pairs(senteval_dir)


def _train_loss(model, config, pairs) -> float:
    """The objective's total over all training pairs, in eval mode (no dropout)."""
    train, _ = select_pairs(pairs, config)
    objective = Objective(config, (24, 24))
    model.eval()
    with torch.no_grad():
        terms = objective.pair_terms(model, list(train["sentence1"]), list(train["sentence2"]),
                                     torch.as_tensor(train["score"].to_numpy(np.float32)))
        return float(objective.total(terms))


def test_a_few_steps_lower_the_loss(tiny_bert_dir, senteval_dir, tmp_path):
    pairs = small_pairs(senteval_dir, n_train=16)
    config = tiny_config(tiny_bert_dir, train={"max_steps": 30, "eval_every": 15, "lr": 3e-3,
                                                "eval_at_start": True})
    from mixsp_core.models.checkpoint import build_model

    torch.manual_seed(config.seed)
    before = _train_loss(build_model(config.model), config, pairs)
    tracker = NullTracker()
    result = run_training(config, pairs, out_dir=tmp_path / "run", tracker=tracker, show_progress=False)
    after = _train_loss(load_checkpoint(result.output_dir / "last"), config, pairs)
    gold = select_pairs(pairs, config)[0]["score"].to_numpy()
    constant_level = np.log1p((gold[:, None] > gold[None, :]).sum())  # CoSENT when every cosine is equal
    assert after < 0.9 * before and after < constant_level - 0.3, (before, after, constant_level)
    assert result.steps == 30 and [s for s, _ in tracker.series("train/loss")][-1] == 30
    assert [row["step"] for row in result.history] == [0, 15, 30]
    assert {"STSBenchmark-dev", "SICK-trial", "primary"} <= set(result.best_metrics)
    assert set(result.class_metrics) == {"STSBenchmark-dev", "SICK-trial"}
    assert (result.output_dir / "plots" / "dev-spearman.png").is_file()
    assert (result.output_dir / "plots" / "classes-SICK-trial.png").is_file()
    assert tracker.params["model.num_projectors"] == 2 and tracker.status == "FINISHED"


def test_same_seed_same_run(tiny_bert_dir, pairs, tmp_path):
    config = tiny_config(tiny_bert_dir, train={"max_steps": 4, "eval_every": 4})
    runs = [NullTracker(), NullTracker()]
    for i, tracker in enumerate(runs):
        run_training(config, pairs, out_dir=tmp_path / f"r{i}", tracker=tracker, show_progress=False)
    assert runs[0].series("train/loss") == runs[1].series("train/loss")
    a, b = (read_weights(tmp_path / f"r{i}" / "best") for i in range(2))
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = tiny_config(tiny_bert_dir, train={"max_steps": 4, "eval_every": 4}, seed=8)
    tracker = NullTracker()
    run_training(other, pairs, out_dir=tmp_path / "r2", tracker=tracker, show_progress=False)
    assert tracker.series("train/loss") != runs[0].series("train/loss")


def test_resume_continues_from_the_saved_step(tiny_bert_dir, pairs, tmp_path):
    config = tiny_config(tiny_bert_dir)  # 8 steps, a checkpoint every 4
    full = NullTracker()
    run_training(config, pairs, out_dir=tmp_path / "full", tracker=full, show_progress=False)

    with pytest.raises(Interrupt):
        run_training(config, pairs, out_dir=tmp_path / "cut", tracker=StopAt(6), show_progress=False)
    resumed = NullTracker()
    result = run_training(config, pairs, out_dir=tmp_path / "cut", tracker=resumed, show_progress=False)
    steps = [s for s, _ in resumed.series("train/loss")]
    assert steps[0] == 5 and steps[-1] == 8 and result.steps == 8
    # the resumed run retraces the uninterrupted one: same losses, same final weights
    assert resumed.series("train/loss") == [p for p in full.series("train/loss") if p[0] >= 5]
    a = read_weights(tmp_path / "full" / "last")
    b = read_weights(tmp_path / "cut" / "last")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_resume_refuses_a_different_config(tiny_bert_dir, pairs, tmp_path):
    run_training(tiny_config(tiny_bert_dir, train={"max_steps": 4}), pairs, out_dir=tmp_path / "r",
                 tracker=NullTracker(), show_progress=False)
    changed = tiny_config(tiny_bert_dir, train={"max_steps": 4, "lr": 5e-4})
    with pytest.raises(CheckpointError, match="train.lr"):
        run_training(changed, pairs, out_dir=tmp_path / "r", tracker=NullTracker(), show_progress=False)


def test_can_resume_only_an_interrupted_run_of_the_same_config(tiny_bert_dir, pairs, tmp_path):
    config = tiny_config(tiny_bert_dir)  # 8 steps, a checkpoint every 4
    run = RunDir(tmp_path / "r")
    assert not can_resume(config, run) and resume_state(config, run) is None  # nothing saved yet
    with pytest.raises(Interrupt):
        run_training(config, pairs, out_dir=run.root, tracker=StopAt(6), show_progress=False)
    assert can_resume(config, run)
    # resume-free settings (how the run executes) and tracking.* may change
    assert can_resume(tiny_config(tiny_bert_dir, train={"log_every": 2, "eval_batch_size": 8},
                                  tracking={"experiment": "other"}), run)
    changed = tiny_config(tiny_bert_dir, train={"lr": 5e-4})
    assert not can_resume(changed, run)
    with pytest.raises(CheckpointError, match="train.lr"):
        resume_state(changed, run)

    # a field the saved run predates (here: dropped from its state) compares as its default
    saved = run.trainer_state.read_text(encoding="utf-8")
    state = json.loads(saved)
    del state["config"]["train"]["distill_neighbours"]
    run.trainer_state.write_text(json.dumps(state), encoding="utf-8")
    assert can_resume(config, run) and resume_state(config, run)[0]["step"] == 4
    other = tiny_config(tiny_bert_dir, train={"distill_neighbours": 1})
    assert not can_resume(other, run)
    run.trainer_state.write_text("{not json", encoding="utf-8")
    assert not can_resume(config, run)  # unreadable: start fresh
    run.trainer_state.write_text(saved, encoding="utf-8")

    run_training(config, pairs, out_dir=run.root, tracker=NullTracker(), show_progress=False)
    assert not can_resume(config, run)  # finished: a retrain trains again
    assert resume_state(config, run)[0]["step"] == 8  # ... while train.resume on a finished run only reports


def test_cross_model_trains(tiny_bert_dir, pairs, tmp_path):
    config = tiny_config(tiny_bert_dir, model={"kind": "cross", "output_dim": 0},
                         loss={"cosent": 0.0, "score_bce": 1.0, "routing": 0.1})
    result = run_training(config, pairs, out_dir=tmp_path / "x", tracker=NullTracker(), show_progress=False)
    model = load_checkpoint(result.best_checkpoint)
    scores = model.predict([("A man plays a guitar.", "A man is playing guitar."), ("a", "b")])
    assert scores.shape == (2,) and np.all((scores > 0) & (scores < 1))


def test_soft_routing_distillation_and_pca_init(tiny_bert_dir, pairs, tmp_path):
    corpus = list(dict.fromkeys(pairs["sentence1"]))[:40]
    teacher = np.random.default_rng(0).normal(size=(len(corpus), 24)).astype(np.float32)
    config = tiny_config(tiny_bert_dir, model={"routing": "soft", "output_init": "teacher"},
                         loss={"distill": 1.0}, train={"max_steps": 4, "distill_batch_size": 8,
                                                       "output_init_sentences": 40})
    tracker = NullTracker()
    run_training(config, pairs, corpus=corpus, teacher_targets=teacher, out_dir=tmp_path / "d",
                 tracker=tracker, show_progress=False)
    assert len(tracker.series("train/distill")) == 4
    assert np.load(tmp_path / "d" / "teacher_pca_components.npy").shape == (16, 24)


def test_similarity_distillation_alone_reads_teacher_targets(tiny_bert_dir, pairs, tmp_path):
    corpus = list(dict.fromkeys(pairs["sentence1"]))[:40]
    teacher = np.random.default_rng(1).normal(size=(len(corpus), 16)).astype(np.float32)
    config = tiny_config(tiny_bert_dir, loss={"distill_sim": 1.0}, train={"max_steps": 3, "distill_batch_size": 8})
    tracker = NullTracker()
    run_training(config, pairs, corpus=corpus, teacher_targets=teacher, out_dir=tmp_path / "s",
                 tracker=tracker, show_progress=False)
    assert len(tracker.series("train/distill_sim")) == 3 and not tracker.series("train/distill")
    with pytest.raises(ConfigError, match="loss.distill"):
        run_training(config, pairs, out_dir=tmp_path / "s2", tracker=NullTracker(), show_progress=False)


def test_nearest_neighbours_match_brute_force():
    vectors = np.random.default_rng(2).normal(size=(50, 6)).astype(np.float32)
    found = nearest_neighbours(vectors, 3, chunk=16)  # several chunks
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    sims = unit @ unit.T
    np.fill_diagonal(sims, -np.inf)
    assert np.array_equal(np.sort(found, axis=1), np.sort(np.argsort(-sims, axis=1)[:, :3], axis=1))
    with pytest.raises(ConfigError, match="train.distill_neighbours"):
        nearest_neighbours(vectors, 50)


def test_neighbour_batches_put_each_anchor_beside_its_neighbours():
    targets = np.random.default_rng(3).normal(size=(40, 8)).astype(np.float32)
    stream = distill_batches(targets, batch_size=12, neighbours=3, seed=0)
    assert isinstance(stream, NeighbourBatches)
    table = nearest_neighbours(targets, 3)
    batch = stream.indices(5).reshape(3, 4)  # 3 anchors, each + 3 neighbours
    for anchor, *near in batch:
        assert list(near) == list(table[anchor])
    assert isinstance(distill_batches(targets, 12, 0, 0), BatchStream)
    with pytest.raises(ConfigError, match="train.distill_batch_size"):
        config_from_dict({"train": {"distill_batch_size": 10, "distill_neighbours": 3}})


def test_similarity_distillation_on_neighbour_batches_trains(tiny_bert_dir, pairs, tmp_path):
    corpus = list(dict.fromkeys(pairs["sentence1"]))[:40]
    teacher = np.random.default_rng(4).normal(size=(len(corpus), 16)).astype(np.float32)
    config = tiny_config(tiny_bert_dir, loss={"distill_sim": 1.0},
                         train={"max_steps": 2, "distill_batch_size": 8, "distill_neighbours": 3})
    tracker = NullTracker()
    run_training(config, pairs, corpus=corpus, teacher_targets=teacher, out_dir=tmp_path / "n",
                 tracker=tracker, show_progress=False)
    assert len(tracker.series("train/distill_sim")) == 2


def test_distillation_without_teacher_is_a_config_error(tiny_bert_dir, pairs, tmp_path):
    config = tiny_config(tiny_bert_dir, loss={"distill": 1.0})
    with pytest.raises(ConfigError, match="loss.distill"):
        run_training(config, pairs, out_dir=tmp_path / "e", tracker=NullTracker(), show_progress=False)


def test_encoder_kind_only_evaluates(tiny_bert_dir, pairs, tmp_path):
    config = config_from_dict({"name": "released", "model": {"kind": "encoder", "encoder": str(tiny_bert_dir)}})
    result = run_training(config, pairs, out_dir=tmp_path / "enc", tracker=NullTracker(), show_progress=False)
    assert result.best_checkpoint is None and result.steps == 0
    assert -100 <= result.best_metrics["primary"] <= 100


def test_batch_stream_is_a_function_of_step():
    stream = BatchStream(size=10, batch_size=4, seed=3, stream=0)
    assert stream.batches_per_epoch == 2
    epoch0 = np.concatenate([stream.indices(0), stream.indices(1)])
    assert len(set(epoch0)) == 8  # no repeats inside an epoch
    assert np.array_equal(stream.indices(1), BatchStream(10, 4, 3, 0).indices(1))
    assert not np.array_equal(stream.indices(0), stream.indices(2))  # a new permutation next epoch


def test_grouped_batches_never_mix_tasks():
    groups = tuple(["A"] * 10 + ["B"] * 7)
    stream = BatchStream(size=17, batch_size=3, seed=0, stream=0, groups=groups)
    assert stream.batches_per_epoch == 3 + 2
    seen = set()
    for step in range(stream.batches_per_epoch):
        rows = stream.indices(step)
        assert len(rows) == 3 and len({groups[i] for i in rows}) == 1
        seen.update(rows.tolist())
    assert len(seen) == 15  # every full batch of the epoch, no repeats
    assert np.array_equal(stream.indices(4), BatchStream(17, 3, 0, 0, groups).indices(4))


def test_snapshots_and_start_for_merging(tiny_bert_dir, pairs, tmp_path):
    from mixsp_core.merging import merge_checkpoints
    from mixsp_core.models.checkpoint import build_model

    config = tiny_config(tiny_bert_dir, train={"max_steps": 4, "eval_every": 4, "snapshot_every": 2})
    result = run_training(config, pairs, out_dir=tmp_path / "s", tracker=NullTracker(), show_progress=False)
    snaps = result.output_dir / "snapshots"
    assert sorted(p.name for p in snaps.iterdir()) == ["step-2", "step-4"]
    assert not (snaps / "step-2" / "trainer_state.json").exists()  # weights only
    # start/ is the step-0 model: the same seed builds the same randomly initialised heads
    torch.manual_seed(config.seed)
    fresh = build_model(config.model).state_dict()
    start = read_weights(result.output_dir / "start")
    assert start.keys() == fresh.keys() and all(torch.equal(start[k], fresh[k]) for k in start)
    last = read_weights(result.output_dir / "last")
    step4 = read_weights(snaps / "step-4")
    assert all(torch.equal(last[k], step4[k]) for k in last)
    assert not all(torch.equal(start[k], step4[k]) for k in start)
    merged = merge_checkpoints([snaps / "step-2", snaps / "step-4"], tmp_path / "fused", "fusion",
                               start=result.output_dir / "start")
    assert load_checkpoint(merged.path).kind == "bi" and merged.record["start"] == str(result.output_dir / "start")


def test_compression_terms_train_and_are_logged(tiny_bert_dir, pairs, tmp_path):
    config = tiny_config(tiny_bert_dir, loss={"matryoshka": 1.0, "matryoshka_dims": [4, 8, 32], "layers": 0.5,
                                              "ese_alignment": 0.5, "ese_dim": 4},
                         train={"max_steps": 4, "eval_every": 4})
    tracker = NullTracker()
    run_training(config, pairs, out_dir=tmp_path / "m", tracker=tracker, show_progress=False)
    for name in ("matryoshka", "layers", "ese_alignment", "cosent", "grad_norm"):
        values = [v for _, v in tracker.series(f"train/{name}")]
        assert len(values) == 4 and np.all(np.isfinite(values)) and max(values) > 0, name


def test_compression_terms_by_hand(tiny_bert_dir, pairs):
    from mixsp_core.losses import CoSENTLoss
    from mixsp_core.losses.matryoshka import alignment_loss, ese_pca, layer_weight
    from mixsp_core.models.checkpoint import build_model

    config = tiny_config(tiny_bert_dir, loss={"cosent": 1.0, "routing": 0.0, "matryoshka": 1.0,
                                              "matryoshka_dims": [4, 8, 64], "layers": 1.0, "layer_mode": "all",
                                              "ese_alignment": 1.0, "ese_dim": 4})
    train, _ = select_pairs(pairs, config)
    left, right = list(train["sentence1"][:8]), list(train["sentence2"][:8])
    gold = torch.as_tensor(train["score"][:8].to_numpy(np.float32))
    torch.manual_seed(0)
    model = build_model(config.model).eval()
    objective = Objective(config, (4, 4))
    assert objective.layers_for_step(0, model.num_layers) == [1]
    with torch.no_grad():
        terms = objective.pair_terms(model, left, right, gold)
        out = model(model.tokenize(left + right), layers=[1])
    cosent = CoSENTLoss()

    def cos(x, y):
        return torch.nn.functional.cosine_similarity(x, y, dim=-1)

    def stack(e):  # A(e) + prefixes 4 and 8 (64 >= width 16 is skipped) + ESE alignment at m = 4
        a, b = e[:8], e[8:]
        both = torch.cat([a, b])
        return (cosent(cos(a, b), gold) + sum(cosent(cos(a[:, :k], b[:, :k]), gold) for k in (4, 8))
                + alignment_loss(both[:, :4], ese_pca(both, 4)))

    e, e1 = out.embedding, out.layer_embeddings[1]
    prefixes = sum(cosent(cos(e[:8, :k], e[8:, :k]), gold) for k in (4, 8))
    torch.testing.assert_close(terms["matryoshka"], prefixes)
    torch.testing.assert_close(terms["ese_alignment"], alignment_loss(e[:, :4], ese_pca(e, 4)))
    torch.testing.assert_close(terms["layers"], layer_weight(1) * stack(e1))
    # sampled mode: one layer in 1..L-1, a function of (seed, step)
    sampled = Objective(tiny_config(tiny_bert_dir, loss={"layers": 1.0}), (4, 4))
    draws = [sampled.layers_for_step(s, 6) for s in range(50)]
    assert draws == [sampled.layers_for_step(s, 6) for s in range(50)]
    assert {d[0] for d in draws} == {1, 2, 3, 4, 5}


class _ThreadProbe(NullTracker):
    def log_metrics(self, metrics, step):
        self.threads = torch.get_num_threads()
        super().log_metrics(metrics, step)


def test_num_threads_is_applied_for_the_run_and_restored(tiny_bert_dir, pairs, tmp_path):
    before = torch.get_num_threads()
    probe = _ThreadProbe()
    config = tiny_config(tiny_bert_dir, train={"max_steps": 1, "eval_every": 1, "num_threads": before + 1})
    run_training(config, pairs, out_dir=tmp_path / "t", tracker=probe, show_progress=False)
    assert probe.threads == before + 1 and torch.get_num_threads() == before
