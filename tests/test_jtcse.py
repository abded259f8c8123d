"""JTCSE: the modulus constraint against hand-computed values, the twin towers' cross-attention, their loss
terms, the configs, and tiny end-to-end runs whose best/ is one plain tower (mixsp and sentence-transformers)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from mixsp_core.errors import ConfigError
from mixsp_core.losses import ModulusLoss
from mixsp_core.models.checkpoint import load_checkpoint, load_embedder
from mixsp_core.models.twin import TWIN_DIR, CrossAttentionConfig, TowerCrossAttention, TwinTowers
from mixsp_core.paths import RunDir
from mixsp_core.tracking.tracker import NullTracker
from mixsp_core.training.config import apply_overrides, config_from_dict, load_config, read_yaml
from mixsp_core.training.jtcse import TwinTerms, build_twin
from mixsp_core.training.loop import run_training
from mixsp_core.training.objective import Objective
from tests.train_helpers import Interrupt, StopAt, one_thread, small_pairs, tiny_config

_one_thread = pytest.fixture(scope="module", autouse=True)(one_thread)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
JTCSE_CONFIGS = ("bi_jtcse_modulus.yaml", "bi_jtcse_twin.yaml", "bi_jtcse.yaml")


# --------------------------------------------------------------------------- the modulus loss


# three pairs: (3,0)-(0,4): moduli 3, 4, distance 5, cos 0 (floored); (1,0)-(2,0): moduli 1, 2, distance 1, cos 1;
# (1,1)-(1,0): moduli sqrt2, 1, distance 1, cos 1/sqrt2
A = torch.tensor([[3.0, 0.0], [1.0, 0.0], [1.0, 1.0]])
B = torch.tensor([[0.0, 4.0], [2.0, 0.0], [1.0, 0.0]])
R2 = math.sqrt(2)
EXPECTED = {
    "distance": [5 / 7, 1 / 3, 1 / (R2 + 1)],
    "ratio": [1 / 7, 1 / 3, (R2 - 1) / (R2 + 1)],
    "joint": [-math.log(1e-4) * 5 / 7, 0.0, 0.5 * math.log(2) / (R2 + 1)],
}


@pytest.mark.parametrize("form", sorted(EXPECTED))
def test_modulus_loss_matches_hand_computed_values(form):
    loss = ModulusLoss(form)
    assert float(loss(A, B)) == pytest.approx(np.mean(EXPECTED[form]), rel=1e-5)
    # only the positive pairs count
    positive = torch.tensor([False, True, True])
    assert float(loss(A, B, positive)) == pytest.approx(np.mean(EXPECTED[form][1:]), rel=1e-5)


def test_modulus_distance_is_tncse_formula_of_modulus_ratio_and_cosine():
    """l_TN = sqrt(1 + k^2 - 2kt) / (1 + k) with ||b|| = k ||a||, t = cos(a, b); smallest at k = 1 for fixed t."""
    torch.manual_seed(0)
    a = torch.randn(6, 5)
    direction = torch.nn.functional.normalize(torch.randn(6, 5), dim=-1)
    for k in (0.5, 1.0, 2.0):
        b = direction * k * a.norm(dim=-1, keepdim=True)
        t = torch.nn.functional.cosine_similarity(a, b, dim=-1)
        expected = torch.sqrt(1 + k ** 2 - 2 * k * t) / (1 + k)
        assert float(ModulusLoss("distance")(a, b)) == pytest.approx(float(expected.mean()), rel=1e-5)
    same_angle = [float(ModulusLoss("distance")(a, a * k)) for k in (0.5, 1.0, 2.0)]
    assert same_angle[1] == pytest.approx(0.0, abs=1e-3) and min(same_angle) == same_angle[1]


def test_modulus_loss_without_positive_pairs_is_zero_with_a_gradient():
    a = A.clone().requires_grad_()
    value = ModulusLoss()(a, B, torch.zeros(3, dtype=torch.bool))
    value.backward()
    assert float(value.detach()) == 0.0 and torch.equal(a.grad, torch.zeros_like(a))


def test_modulus_loss_of_identical_vectors_has_a_finite_gradient():
    a = A.clone().requires_grad_()
    ModulusLoss("distance")(a, A.clone()).backward()
    assert torch.isfinite(a.grad).all()


def test_modulus_loss_refuses_an_unknown_form():
    with pytest.raises(ValueError, match="form"):
        ModulusLoss("cosine")


# --------------------------------------------------------------------------- cross-attention


def _cross(layers: int = 2) -> TowerCrossAttention:
    torch.manual_seed(0)
    module = TowerCrossAttention(CrossAttentionConfig(hidden_dim=8, num_heads=2, num_layers=layers, dropout=0.0))
    with torch.no_grad():  # away from the identity initialisation, so attention shows
        for block in [*module.a_from_b, *module.b_from_a]:
            block.attention.out_proj.weight.normal_()
    return module.eval()


def test_cross_attention_shapes_and_padding():
    module = _cross()
    a, b = torch.randn(3, 5, 8), torch.randn(3, 5, 8)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    a2, b2 = module(a, b, mask)
    assert a2.shape == a.shape and b2.shape == b.shape
    assert not torch.allclose(a2, a) and not torch.allclose(b2, b)
    # padded positions of the other tower are never attended to: changing them changes nothing at real tokens
    b_noisy = b.clone()
    b_noisy[1, 3:] = 100.0
    b_noisy[2, 1:] = -100.0
    a3, _ = module(a, b_noisy, mask)
    real = mask.bool()
    assert torch.allclose(a3[real], a2[real], atol=1e-5)


def test_cross_attention_disabled_or_fresh_is_the_plain_towers():
    a, b, mask = torch.randn(2, 4, 8), torch.randn(2, 4, 8), torch.ones(2, 4, dtype=torch.long)
    module = _cross()
    module.enabled = False
    a2, b2 = module(a, b, mask)
    assert a2 is a and b2 is b
    fresh = TowerCrossAttention(CrossAttentionConfig(hidden_dim=8, num_heads=2)).eval()
    a3, b3 = fresh(a, b, mask)  # zero-initialised output projections: the identity at step 0
    assert torch.equal(a3, a) and torch.equal(b3, b)


def test_cross_attention_config_and_weights_round_trip(tmp_path):
    module = _cross(layers=3)
    module.save(tmp_path / "ca")
    loaded = TowerCrossAttention.load(tmp_path / "ca").eval()
    assert loaded.config == module.config and loaded.config.num_layers == 3
    a, b, mask = torch.randn(2, 4, 8), torch.randn(2, 4, 8), torch.ones(2, 4)
    assert all(torch.equal(x, y) for x, y in zip(module(a, b, mask), loaded(a, b, mask), strict=True))


# --------------------------------------------------------------------------- the loss terms on a tiny student


@pytest.fixture(scope="module")
def pairs(senteval_dir):
    return small_pairs(senteval_dir)


@pytest.fixture(scope="module")
def twin_config(tiny_bert_dir):
    return tiny_config(tiny_bert_dir, model={"twin_cross_attention": True, "twin_heads": 4},
                       loss={"cosent": 1.0, "modulus": 0.5, "twin_ensemble": 1.0, "twin_distill": 1.0})


def test_objective_modulus_terms_use_the_unnormalised_embeddings(tiny_bert_dir):
    from mixsp_core.models.checkpoint import build_model

    config = tiny_config(tiny_bert_dir, loss={"cosent": 1.0, "modulus": 1.0, "modulus_nli": 1.0, "infonce": 1.0},
                         data={"nli": True})
    model = build_model(config.model).eval()
    objective = Objective(config, (1, 1))
    left, right = ["A man plays.", "A dog runs.", "It rains."], ["A man is playing.", "A cat sleeps.", "Rain."]
    gold = torch.tensor([4.5, 1.0, 4.0])
    with torch.no_grad():
        terms = objective.pair_terms(model, left, right, gold)
        emb = model(model.tokenize(left + right)).embedding
        expected = ModulusLoss("joint")(emb[:3], emb[3:], torch.tensor([True, False, True]))
        assert float(terms["modulus"]) == pytest.approx(float(expected), rel=1e-5)
        nli = objective.nli_terms(model, left, right, ["No.", "Nothing.", "Sun."])
        expected_nli = ModulusLoss("joint")(emb[:3], emb[3:])
        assert float(nli["modulus_nli"]) == pytest.approx(float(expected_nli), rel=1e-5)
        assert float(nli["infonce"]) == pytest.approx(float(objective.nli_term(
            model, left, right, ["No.", "Nothing.", "Sun."])), rel=1e-6)
    assert (emb.norm(dim=-1) - 1).abs().max() > 1e-3  # the term really sees moduli, not unit vectors


def test_twin_terms_train_the_ensemble_and_distil_into_tower_a_only(twin_config):
    from mixsp_core.models.checkpoint import build_model

    torch.manual_seed(0)
    model = build_model(twin_config.model).train()
    twin = build_twin(twin_config, model, distributed=False)
    assert model.model_config.twin_cross_attention is False  # the saved student's config is a plain one
    objective = Objective(twin_config, (1, 1))
    terms_of = TwinTerms(twin)
    left, right = ["A man plays.", "A dog runs."], ["A man is playing.", "A cat sleeps."]
    gold = torch.tensor([4.5, 1.0])

    terms = terms_of(objective, model, left, right, gold)
    assert set(terms) == {"twin_ensemble", "twin_distill"}
    terms["twin_distill"].backward()
    assert all(p.grad is None for p in twin.parameters())  # the ensemble is the teacher: detached
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder.parameters())

    model.zero_grad()
    terms_of(objective, model, left, right, gold)["twin_ensemble"].backward()
    for part in (twin.tower.encoder, twin.tower.routed, twin.cross):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters()), part


def test_tower_b_differs_from_tower_a_by_its_heads(twin_config):
    from mixsp_core.models.checkpoint import build_model

    model = build_model(twin_config.model)
    twin = TwinTowers.build(model, seed=8)
    a, b = model.state_dict(), twin.tower.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("encoder."))  # no noise asked
    heads = [k for k in a if k.startswith("routed.")]
    assert heads and any(not torch.equal(a[k], b[k]) for k in heads)  # rebuilt from another seed
    noisy = build_model(twin_config.model)
    noisy.model_config.twin_encoder_noise = 0.05
    noisy_twin = TwinTowers.build(noisy, seed=8)
    assert not torch.equal(noisy.encoder.embeddings.word_embeddings.weight,
                           noisy_twin.tower.encoder.embeddings.word_embeddings.weight)


# --------------------------------------------------------------------------- configs


@pytest.mark.parametrize("name", JTCSE_CONFIGS)
def test_jtcse_configs_validate(name):
    config = load_config(CONFIGS / name)
    assert config.model.encoder == "sentence-transformers/all-MiniLM-L6-v2" and config.model.kind == "bi"
    twin = name != "bi_jtcse_modulus.yaml"
    assert config.model.twin_cross_attention is twin
    assert (config.loss.twin_ensemble > 0) is twin and (config.loss.twin_distill > 0) is twin
    assert (config.loss.modulus > 0) is (name != "bi_jtcse_twin.yaml")
    assert not config.needs_teacher  # nothing to carry but the STS-B and SICK files


@pytest.mark.parametrize(("overrides", "field"), [
    ({"loss.modulus_form": "cosine"}, "loss.modulus_form"),
    ({"loss.modulus": -0.1}, "loss.modulus"),
    ({"loss.twin_distill": 1.0}, "loss.twin_distill"),
    ({"loss.twin_ensemble": 1.0}, "loss.twin_ensemble"),
    ({"model.twin_cross_attention": True}, "loss.twin_ensemble"),
    ({"model.twin_cross_attention": True, "loss.twin_ensemble": 1.0, "loss.cosent": 0.0, "loss.infonce": 1.0,
      "data.nli": True}, "loss.twin_ensemble"),
    ({"loss.modulus_nli": 1.0}, "loss.modulus_nli"),
    ({"loss.modulus_nli": 1.0, "data.nli": True}, "loss.modulus_nli"),
    ({"model.twin_heads": 0}, "model.twin_heads"),
    ({"model.twin_layers": 0}, "model.twin_layers"),
    ({"model.twin_dropout": 1.0}, "model.twin_dropout"),
    ({"model.twin_encoder_noise": -0.01}, "model.twin_encoder_noise"),
    ({"model.kind": "cross", "loss.cosent": 0.0, "loss.score_bce": 1.0, "loss.modulus": 1.0}, "loss.modulus"),
])
def test_bad_jtcse_settings_name_the_field(overrides, field):
    raw = apply_overrides({"loss": {"cosent": 1.0}}, overrides)
    with pytest.raises(ConfigError) as err:
        config_from_dict(raw)
    assert err.value.field == field


def test_twin_heads_must_divide_the_encoder_width(tiny_bert_dir):
    from mixsp_core.models.checkpoint import build_model

    config = tiny_config(tiny_bert_dir, model={"twin_cross_attention": True, "twin_heads": 3},
                         loss={"cosent": 1.0, "twin_ensemble": 1.0})
    with pytest.raises(ConfigError) as err:
        build_twin(config, build_model(config.model), distributed=False)
    assert err.value.field == "model.twin_heads"
    with pytest.raises(ConfigError, match="one process"):
        build_twin(config, build_model(config.model), distributed=True)


# --------------------------------------------------------------------------- tiny end-to-end runs


def tiny_from_file(name: str, encoder: Path, **train) -> object:
    """``configs/NAME`` on the tiny BERT: every JTCSE setting of the file kept, the size cut down."""
    raw = apply_overrides(read_yaml(CONFIGS / name), {
        "model.encoder": str(encoder), "model.output_dim": 16, "model.projector_mult": 2, "model.max_length": 32,
        "train.max_steps": 4, "train.batch_size": 8, "train.eval_every": 2, "train.log_every": 1,
        "train.snapshot_every": 0, "train.patience": 0, "train.device": "cpu", "train.lr": 1e-3,
        "train.output_init_sentences": 64, "tracking.enabled": False, "data.train_tasks": ["STSBenchmark"],
        **{f"train.{k}": v for k, v in train.items()}})
    return config_from_dict(raw)


SENTENCES = ["A man is playing a guitar.", "A woman slices an onion.", "Two dogs run in the snow."]


@pytest.mark.parametrize("name", JTCSE_CONFIGS)
def test_tiny_run_of_each_config_saves_one_plain_tower(name, tiny_bert_dir, pairs, tmp_path):
    from mixsp_core.models.st_modules import load_sentence_transformer

    config = tiny_from_file(name, tiny_bert_dir)
    result = run_training(config, pairs, out_dir=tmp_path / "run", tracker=NullTracker(), show_progress=False)
    run = RunDir(result.output_dir)
    assert result.steps == 4 and np.isfinite(result.best_metrics["primary"])
    best = load_checkpoint(run.best)
    assert type(best).__name__ == "BiStudent" and best.model_config.twin_cross_attention is False
    plain = load_checkpoint(run.best).state_dict().keys()
    assert all(k.startswith(("encoder.", "routed.", "output.")) for k in plain)
    assert not (run.best / TWIN_DIR).exists()
    assert (run.last / TWIN_DIR / "tower").is_dir() is config.model.twin_cross_attention
    ours = load_embedder(run.best, device="cpu").encode(SENTENCES, batch_size=2, show_progress=False)
    st = load_sentence_transformer(run.best, device="cpu").encode(SENTENCES, batch_size=2)
    np.testing.assert_allclose(st, ours, atol=1e-5)


def test_loop_logs_each_jtcse_term(tiny_bert_dir, pairs, tmp_path):
    class Recorder(NullTracker):
        def __init__(self):
            super().__init__()
            self.names: set[str] = set()

        def log_metrics(self, metrics, step):
            self.names |= set(metrics)
            super().log_metrics(metrics, step)

    tracker = Recorder()
    run_training(tiny_from_file("bi_jtcse.yaml", tiny_bert_dir, max_steps=2), pairs, out_dir=tmp_path / "run",
                 tracker=tracker, show_progress=False)
    assert {"train/modulus", "train/twin_ensemble", "train/twin_distill", "train/cosent"} <= tracker.names


def test_twin_run_resumes_on_the_uninterrupted_trajectory(tiny_bert_dir, pairs, tmp_path):
    from mixsp_core.models.checkpoint import read_weights

    config = tiny_from_file("bi_jtcse.yaml", tiny_bert_dir)
    whole = NullTracker()
    run_training(config, pairs, out_dir=tmp_path / "whole", tracker=whole, show_progress=False)
    with pytest.raises(Interrupt):  # killed at step 3's log; last/ (and its twin) hold step 2
        run_training(config, pairs, out_dir=tmp_path / "cut", tracker=StopAt(3), show_progress=False)
    resumed = NullTracker()
    result = run_training(config, pairs, out_dir=tmp_path / "cut", tracker=resumed, show_progress=False)
    assert result.steps == 4 and [s for s, _ in resumed.series("train/loss")] == [3, 4]
    # the twin came back too: the same losses (its terms included) and the same weights as the whole run
    for name in ("train/loss", "train/twin_ensemble", "train/twin_distill"):
        expected = [p for p in whole.series(name) if p[0] >= 3]
        assert [s for s, _ in resumed.series(name)] == [s for s, _ in expected], name
        assert [v for _, v in resumed.series(name)] == pytest.approx([v for _, v in expected], rel=1e-5), name
    for part in ("", f"{TWIN_DIR}/tower"):
        a, b = read_weights(tmp_path / "whole" / "last" / part), read_weights(tmp_path / "cut" / "last" / part)
        assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a), part


def test_twin_resume_without_its_state_is_refused(tiny_bert_dir, pairs, tmp_path):
    import shutil

    from mixsp_core.errors import CheckpointError

    config = tiny_from_file("bi_jtcse_twin.yaml", tiny_bert_dir)
    with pytest.raises(Interrupt):
        run_training(config, pairs, out_dir=tmp_path / "cut", tracker=StopAt(3), show_progress=False)
    shutil.rmtree(tmp_path / "cut" / "last" / TWIN_DIR)
    with pytest.raises(CheckpointError, match="twin"):
        run_training(config, pairs, out_dir=tmp_path / "cut", tracker=NullTracker(), show_progress=False)
