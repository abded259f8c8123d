"""2-Tier SimCSE and Pcc-tuning's two stages: the SimCSE loss by hand, the dropout schedules' exact rates,
the stages config, and tiny multi-stage runs (the warm start, the run's result, resume)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from mixsp_core.errors import ConfigError
from mixsp_core.losses import SimCSELoss
from mixsp_core.models.checkpoint import build_model, read_weights
from mixsp_core.paths import RunDir
from mixsp_core.tracking.tracker import NullTracker
from mixsp_core.training.config import TrainConfig, config_from_dict, load_config
from mixsp_core.training.dropout import DropoutSchedule, dropout_rates, set_dropout
from mixsp_core.training.loop import run_training
from mixsp_core.training.config import stage_configs
from mixsp_core.training.resume import STAGE_RESULT_FILE
from mixsp_core.training.resume import can_resume
from tests.train_helpers import Interrupt, one_thread, small_pairs

_one_thread = pytest.fixture(scope="module", autouse=True)(one_thread)
REPO = Path(__file__).resolve().parents[1]
T = torch.tensor


# --------------------------------------------------------------------------- the SimCSE loss


def test_simcse_loss_by_hand():
    # cosines [[1, .6], [0, .8]] (rows: first views, columns: second views), T = 0.5 -> logits [[2, 1.2], [0, 1.6]]
    first, second = T([[2.0, 0.0], [0.0, 3.0]]), T([[1.0, 0.0], [0.6, 0.8]])  # norms do not matter
    row1 = -math.log(math.exp(2) / (math.exp(2) + math.exp(1.2)))
    row2 = -math.log(math.exp(1.6) / (math.exp(0) + math.exp(1.6)))
    assert SimCSELoss(0.5)(first, second).item() == pytest.approx((row1 + row2) / 2, rel=1e-5)
    col1 = -math.log(math.exp(2) / (math.exp(2) + math.exp(0)))
    col2 = -math.log(math.exp(1.6) / (math.exp(1.2) + math.exp(1.6)))
    symmetric = SimCSELoss(0.5, symmetric=True)(first, second).item()
    assert symmetric == pytest.approx(((row1 + row2) / 2 + (col1 + col2) / 2) / 2, rel=1e-5)


def test_simcse_loss_default_temperature():
    first, second = T([[1.0, 0.0], [0.0, 1.0]]), T([[1.0, 0.0], [0.8, 0.6]])
    # cosines [[1, .8], [0, .6]] / 0.05 -> logits [[20, 16], [0, 12]]
    expected = (math.log1p(math.exp(-4)) + math.log1p(math.exp(-12))) / 2
    assert SimCSELoss()(first, second).item() == pytest.approx(expected, rel=1e-4)


# --------------------------------------------------------------------------- dropout schedules


def _rates(schedule: DropoutSchedule, losses: list[float]) -> list[float | None]:
    out = []
    for step, loss in enumerate(losses):
        out.append(schedule.rate(step))
        schedule.observe(loss)
    return out


def test_standard_and_none_schedules():
    assert _rates(DropoutSchedule("standard", p=0.1, total_steps=4), [1.0] * 4) == [0.1] * 4
    assert _rates(DropoutSchedule("none", total_steps=4), [1.0] * 4) == [None] * 4


def test_curriculum_schedule_rises_linearly_to_the_last_step():
    rates = _rates(DropoutSchedule("curriculum", p_start=0.0, p_end=0.2, total_steps=5), [1.0] * 5)
    assert rates == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])


def test_adaptive_schedule_follows_the_loss():
    schedule = DropoutSchedule("adaptive", p_start=0.1, p_end=0.3, momentum=0.5, total_steps=6)
    losses = [4.0, 2.0, 2.0, 0.0, 8.0, 1.0]
    # averages after each step: 4, 3, 2.5, 1.25, 4.625; p = 0.1 + 0.2 * clip(1 - average / 4, 0, 1)
    assert _rates(schedule, losses) == pytest.approx([0.1, 0.1, 0.15, 0.175, 0.2375, 0.1])
    # the state a resumable checkpoint saves gives the same next rates
    resumed = DropoutSchedule("adaptive", p_start=0.1, p_end=0.3, momentum=0.5, total_steps=6)
    resumed.load_state_dict(json.loads(json.dumps(schedule.state_dict())))
    assert resumed.rate(6) == schedule.rate(6)


def test_dropout_rate_is_set_on_the_encoder_modules(tiny_bert_dir):
    config = _tiny(tiny_bert_dir)
    model = build_model(config.model)
    assert set(dropout_rates(model.encoder)) == {0.1}  # BERT's config
    schedule = DropoutSchedule.from_config(TrainConfig(dropout_schedule="standard", dropout_p=0.3), 10)
    assert schedule.apply(model, 0) == 0.3
    rates = dropout_rates(model.encoder)
    assert len(rates) >= 4 and set(rates) == {0.3}  # embeddings, attention and outputs of both layers
    batch = model.tokenize(["a man is playing a guitar", "two dogs run on the beach"])
    model.train()
    set_dropout(model.encoder, 0.0)  # no dropout: train-mode passes agree (attention dropout reads .p too)
    assert torch.equal(model(batch).embedding, model(batch).embedding)
    set_dropout(model.encoder, 0.3)
    assert not torch.allclose(model(batch).embedding, model(batch).embedding)


# --------------------------------------------------------------------------- config


def _tiny(encoder: Path, stages: list | None = None, **sections) -> object:
    raw = {
        "name": "tiny",
        "seed": 7,
        "model": {"kind": "bi", "encoder": str(encoder), "num_projectors": 1, "projector_mult": 2,
                  "output_dim": 16, "max_length": 32},
        "loss": {"cosent": 1.0},
        "train": {"max_steps": 4, "batch_size": 8, "lr": 1e-3, "eval_every": 2, "log_every": 1,
                  "warmup_ratio": 0.1, "eval_batch_size": 32, "simcse_batch_size": 8},
        "tracking": {"enabled": False},
    }
    for section, values in sections.items():
        raw[section].update(values)
    if stages is not None:
        raw["stages"] = stages
    return config_from_dict(raw)


SIMCSE_STAGE = {"name": "simcse", "overrides": {"loss": {"cosent": 0.0, "simcse": 1.0},
                                                  "train.dropout_schedule": "curriculum"}}


@pytest.mark.parametrize("stages, field", [
    ([{"name": "a/b"}], "stages[0].name"),
    ([{"name": ""}], "stages[0].name"),
    ([{"name": "a"}, {"name": "a"}], "stages[1].name"),
    ([{"name": "a", "init": "middle"}, {"name": "b"}], "stages[0].init"),
    ([{"name": "a", "overrides": {"model.output_dim": 8}}], "stages[0].overrides.model.output_dim"),
    ([{"name": "a", "overrides": {"tracking": {"experiment": "x"}}}], "stages[0].overrides.tracking.experiment"),
    ([{"name": "a", "overrides": {"train.resume": False}}], "stages[0].overrides.train.resume"),
    ([{"name": "a", "overrides": {"data.corpus": "x.txt"}}], "stages[0].overrides.data.corpus"),
    ([{"name": "a"}, {"name": "b", "overrides": {"train.init_checkpoint": "x"}}],
     "stages[1].overrides.train.init_checkpoint"),
    ([{"name": "a", "overrides": {"loss.simcsee": 1.0}}], "stages[0].overrides.loss.simcsee"),
    ([{"name": "a"}, {"name": "b", "overrides": {"train": {"lr": -1.0}}}], "stages[1].overrides.train.lr"),
    ([{"name": "a", "overrides": {"loss.cosent": 0.0}}], "stages[0].overrides.loss"),  # nothing to train
    ([{"name": "a", "overrides": {"train.dropout_schedule": "sometimes"}}],
     "stages[0].overrides.train.dropout_schedule"),
    ([{"name": "a", "overrides": {"train.save_last": False}}, {"name": "b", "init": "last"}], "stages[1].init"),
    ([{"name": "a", "overrides": ["loss.cosent=0"]}], "stages[0].overrides"),
    (["a"], "stages[0]"),
    ({"name": "a"}, "stages"),
    ([{"name": "a", "extra": 1}], "stages[0].extra"),
])
def test_bad_stages_name_the_field(tiny_bert_dir, stages, field):
    with pytest.raises(ConfigError) as err:
        _tiny(tiny_bert_dir, stages)
    assert err.value.field == field


@pytest.mark.parametrize("section, values, field", [
    ("train", {"dropout_schedule": "often"}, "train.dropout_schedule"),
    ("train", {"dropout_p": 1.0}, "train.dropout_p"),
    ("train", {"dropout_p_end": -0.1}, "train.dropout_p_end"),
    ("train", {"dropout_loss_momentum": float("nan")}, "train.dropout_loss_momentum"),
    ("train", {"simcse_batch_size": 1}, "train.simcse_batch_size"),
    ("loss", {"simcse_temperature": 0.0}, "loss.simcse_temperature"),
    ("loss", {"simcse": -1.0}, "loss.simcse"),
])
def test_bad_simcse_and_dropout_values_name_the_field(tiny_bert_dir, section, values, field):
    with pytest.raises(ConfigError) as err:
        _tiny(tiny_bert_dir, **{section: values})
    assert err.value.field == field


def test_simcse_is_for_the_bi_student_only():
    with pytest.raises(ConfigError) as err:
        config_from_dict({"model": {"kind": "cross"}, "loss": {"cosent": 0.0, "score_bce": 1.0, "simcse": 1.0}})
    assert err.value.field == "loss.simcse"


def test_stage_configs_apply_overrides_and_chain_checkpoints(tiny_bert_dir, tmp_path):
    config = _tiny(tiny_bert_dir, [SIMCSE_STAGE, {"name": "sts", "init": "last", "overrides": {"train.lr": 2e-4}}])
    first, second = stage_configs(config, tmp_path)
    assert (first.loss.simcse, first.loss.cosent, first.train.dropout_schedule) == (1.0, 0.0, "curriculum")
    assert (second.loss.simcse, second.loss.cosent, second.train.lr) == (0.0, 1.0, 2e-4)
    assert first.output_dir == str(tmp_path / "stages" / "simcse") and first.train.init_checkpoint == ""
    assert second.train.init_checkpoint == str(tmp_path / "stages" / "simcse" / "last")
    assert not first.stages and not second.tracking.log_checkpoint
    # dotted and nested overrides are the same thing
    nested = _tiny(tiny_bert_dir, [{"name": "a", "overrides": {"train": {"lr": 2e-4}}}])
    dotted = _tiny(tiny_bert_dir, [{"name": "a", "overrides": {"train.lr": 2e-4}}])
    assert stage_configs(nested) == stage_configs(dotted)


@pytest.mark.parametrize("name", ["bi_simcse_2tier", "bi_simcse_2tier_curriculum", "bi_simcse_2tier_adaptive",
                                  "bi_pcc_two_stage", "bi_pcc_one_stage"])
def test_the_configs_load(name):
    config = load_config(REPO / "configs" / f"{name}.yaml")
    stages = stage_configs(config)
    assert config.model.encoder == "sentence-transformers/all-MiniLM-L6-v2"
    if name == "bi_pcc_one_stage":
        assert not stages and config.loss.pearson > 0 and config.loss.cosent == 0
        return
    first, last = stages[0], stages[-1]
    if name.startswith("bi_simcse"):
        assert first.loss.simcse > 0 and first.loss.cosent == 0 and first.needs_corpus
        assert first.train.dropout_schedule == {"bi_simcse_2tier": "standard"}.get(name, name.rsplit("_", 1)[1])
        assert last.loss.cosent > 0 and last.loss.simcse == 0
    else:
        assert first.loss.infonce > 0 and first.data.nli and first.loss.cosent == 0
        assert last.loss.pearson > 0 and last.loss.infonce == 0 and last.loss.cosent == 0


# --------------------------------------------------------------------------- multi-stage runs


@pytest.fixture(scope="module")
def pairs(senteval_dir):
    return small_pairs(senteval_dir, n_train=16)


@pytest.fixture(scope="module")
def corpus(senteval_dir):
    return (senteval_dir / "MR" / "rt-polarity.pos").read_text(encoding="latin-1").splitlines()[:40]


class StopInStage(NullTracker):
    """Raises :class:`Interrupt` when stage ``stage`` logs step ``at``."""

    def __init__(self, stage: str, at: int):
        super().__init__()
        self.stage, self.at = stage, at

    def log_metrics(self, metrics, step):
        if step == self.at and any(k.startswith(f"{self.stage}/") for k in metrics):
            raise Interrupt
        super().log_metrics(metrics, step)


def _two_stage(tiny_bert_dir):
    return _tiny(tiny_bert_dir, [SIMCSE_STAGE, {"name": "sts", "overrides": {"train": {
        "max_steps": 8, "eval_every": 4, "snapshot_every": 4}}}])


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_stage_run_chains_the_weights_and_resumes(tiny_bert_dir, pairs, corpus, tmp_path):
    config = _two_stage(tiny_bert_dir)
    tracker = NullTracker()
    result = run_training(config, pairs, corpus, out_dir=tmp_path / "full", tracker=tracker, show_progress=False)
    run = RunDir(tmp_path / "full")
    simcse, sts = RunDir(run.root / "stages/simcse"), RunDir(run.root / "stages/sts")

    # stage 2 started from stage 1's best (its start/ is its step-0 model), which SimCSE moved off the encoder
    assert _same(read_weights(sts.start), read_weights(simcse.best))
    torch.manual_seed(config.seed)
    fresh = build_model(config.model).state_dict()
    assert not torch.equal(fresh["encoder.embeddings.word_embeddings.weight"],
                           read_weights(simcse.best)["encoder.embeddings.word_embeddings.weight"])
    # the run's result is the final stage's best
    assert result.best_checkpoint == run.best and _same(read_weights(run.best), read_weights(sts.best))
    report = json.loads(run.metrics.read_text())
    assert report["best"] == result.best_metrics == json.loads(sts.metrics.read_text())["best"]
    assert set(report["stages"]) == {"simcse", "sts"} and report["stages"]["sts"]["steps"] == 8
    assert [(row["stage"], row["step"]) for row in json.loads(run.history.read_text())] == [
        ("simcse", 2), ("simcse", 4), ("sts", 4), ("sts", 8)]
    assert result.steps == 12 and (run.plots / "dev-spearman.png").is_file() and run.config.is_file()
    # per-stage metrics carry the stage's prefix; the run's result is logged unprefixed
    assert [s for s, _ in tracker.series("simcse/train/simcse")] == [1, 2, 3, 4]
    dropout_p = tracker.series("simcse/train/dropout_p")  # curriculum 0.05 -> 0.15 over steps 0..3
    assert [p for _, p in dropout_p] == pytest.approx([0.05, 0.05 + 0.1 / 3, 0.05 + 0.2 / 3, 0.15])
    assert [s for s, _ in tracker.series("sts/train/cosent")] == list(range(1, 9))
    assert tracker.series("dev/mean")[-1][1] == pytest.approx(result.best_metrics["primary"])
    assert "simcse/loss.simcse" in tracker.params and "sts/loss.simcse" in tracker.params

    # interrupted in stage 2: the rerun skips stage 1 and resumes stage 2 on the same trajectory
    with pytest.raises(Interrupt):
        run_training(config, pairs, corpus, out_dir=tmp_path / "cut", tracker=StopInStage("sts", 6),
                     show_progress=False)
    assert (tmp_path / "cut/stages/simcse" / STAGE_RESULT_FILE).is_file()
    assert not (tmp_path / "cut/stages/sts" / STAGE_RESULT_FILE).is_file()
    assert can_resume(config, RunDir(tmp_path / "cut")) and not can_resume(config, RunDir(tmp_path / "none"))
    assert not can_resume(config, run)  # finished: a retrain trains again
    resumed = NullTracker()
    again = run_training(config, pairs, corpus, out_dir=tmp_path / "cut", tracker=resumed, show_progress=False)
    assert not any(k.startswith("simcse/train") for _, m in resumed.metrics for k in m)
    assert [s for s, _ in resumed.series("sts/train/loss")] == [5, 6, 7, 8]
    assert resumed.series("sts/train/loss") == [p for p in tracker.series("sts/train/loss") if p[0] >= 5]
    assert _same(read_weights(tmp_path / "cut/best"), read_weights(run.best))
    assert again.best_metrics == result.best_metrics

    # finished: both stages skipped, the same result
    third = NullTracker()
    assert run_training(config, pairs, corpus, out_dir=tmp_path / "cut", tracker=third,
                        show_progress=False).best_metrics == result.best_metrics
    assert not any(k.startswith(("simcse/train", "sts/train")) for _, m in third.metrics for k in m)


def test_pcc_two_stages_count_the_nli_epoch(tiny_bert_dir, pairs, tmp_path, monkeypatch):
    from mixsp_core.training.objective import Objective

    pair_batches = []
    original = Objective.pair_terms

    def counting(self, model, left, *args, **kwargs):
        pair_batches.append(len(left))
        return original(self, model, left, *args, **kwargs)

    monkeypatch.setattr(Objective, "pair_terms", counting)
    triplets = pd.DataFrame({"anchor": [f"a man plays {i}" for i in range(8)],
                             "positive": [f"someone plays {i}" for i in range(8)],
                             "hard_negative": [f"nobody sleeps {i}" for i in range(8)]})
    config = _tiny(tiny_bert_dir, [
        {"name": "nli", "overrides": {"loss": {"cosent": 0.0, "infonce": 1.0}, "data.nli": True,
                                      "train": {"max_steps": 0, "epochs": 2, "nli_batch_size": 4}}},
        {"name": "pcc", "overrides": {"loss": {"cosent": 0.0, "pearson": 1.0}, "train.max_steps": 2}},
    ])
    tracker = NullTracker()
    result = run_training(config, pairs, triplets=triplets, out_dir=tmp_path / "pcc", tracker=tracker,
                          show_progress=False)
    report = json.loads((tmp_path / "pcc" / "metrics.json").read_text())
    assert report["stages"]["nli"]["steps"] == 4  # 2 epochs of 8 triplets in batches of 4, not of pairs
    assert result.steps == 6 and [s for s, _ in tracker.series("pcc/train/pearson")] == [1, 2]
    assert pair_batches == [8, 8]  # the Pearson stage's 2 steps: the NLI stage, with no pair term, encodes no pairs


def test_training_inputs_read_the_corpus_for_simcse_without_a_teacher(tiny_bert_dir, pairs, tmp_path, monkeypatch):
    import mixsp_core.stages.train as train_stage
    from mixsp_core.paths import PipelinePaths

    paths = PipelinePaths(tmp_path)
    paths.corpus.parent.mkdir(parents=True)
    paths.corpus.write_text("one sentence\nanother sentence\n", encoding="utf-8")
    monkeypatch.setattr(train_stage, "read_pairs", lambda _: pairs)

    def no_teacher(*args, **kwargs):
        raise AssertionError("SimCSE needs no teacher")

    monkeypatch.setattr(train_stage, "encode_with_teacher", no_teacher)
    got_pairs, corpus, teacher = train_stage.training_inputs(_two_stage(tiny_bert_dir), paths)
    assert corpus == ["one sentence", "another sentence"] and teacher is None and got_pairs is pairs
    assert train_stage.training_inputs(_tiny(tiny_bert_dir), paths)[1:] == (None, None)
