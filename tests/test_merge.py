"""Model merging: uniform soup, greedy soup and delta-guided fusion, on tensors and checkpoint folders."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from mixsp_core.errors import CheckpointError, ConfigError
from mixsp_core.merging import (
    delta_fusion,
    greedy_soup,
    merge_checkpoints,
    read_state,
    uniform_soup,
)


def _finetuned(start: Path, out: Path, seed: int, scale: float = 0.01) -> Path:
    """A copy of the HF folder ``start`` with every float weight moved by seeded noise (a stand-in for
    a fine-tuned checkpoint from that start)."""
    shutil.copytree(start, out)
    state = load_file(str(start / "model.safetensors"))
    g = torch.Generator().manual_seed(seed)
    moved = {k: (v + scale * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone())
             for k, v in state.items()}
    save_file(moved, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.fixture()
def checkpoints(tiny_bert_dir, tmp_path) -> list[Path]:
    return [_finetuned(tiny_bert_dir, tmp_path / f"ckpt{i}", seed=i) for i in range(3)]


def _assert_states_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_soup_of_identical_checkpoints_returns_it(checkpoints):
    state = read_state(checkpoints[0])
    _assert_states_equal(uniform_soup([state, state, state]), state)
    merged, report = greedy_soup([state, state], score=lambda s: 1.0, scores=[1.0, 1.0])
    _assert_states_equal(merged, state)
    fused, _ = delta_fusion(read_state(checkpoints[1]), [state, state], p=2.0)
    _assert_states_equal(fused, state)


def test_fusion_of_one_checkpoint_returns_it(tiny_bert_dir, checkpoints):
    start, one = read_state(tiny_bert_dir), read_state(checkpoints[0])
    for p in (0.0, 1.0, 3.0):
        fused, info = delta_fusion(start, [one], p=p)
        _assert_states_equal(fused, one)
        assert info.keys_without_start == []


def test_fusion_formula_elementwise():
    start = {"w": torch.tensor([0.0, 1.0, 2.0, 5.0])}
    a = {"w": torch.tensor([1.0, 1.0, 2.0, 5.0])}  # moved by +1, 0, 0, 0
    b = {"w": torch.tensor([-3.0, 2.0, 2.0, 5.0])}  # moved by -3, +1, 0, 0
    fused, info = delta_fusion(start, [a, b], p=1.0)
    # element 0: w = (1/4, 3/4) -> 0 + 1/4 * 1 + 3/4 * (-3) = -2; element 1: only b moved -> 2
    torch.testing.assert_close(fused["w"], torch.tensor([-2.0, 2.0, 2.0, 5.0]))
    fused2, _ = delta_fusion(start, [a, b], p=2.0)  # w = (1/10, 9/10) -> 0.1 - 2.7 = -2.6
    torch.testing.assert_close(fused2["w"], torch.tensor([-2.6, 2.0, 2.0, 5.0]))
    assert info.mean_weights[1] > info.mean_weights[0]  # b moved more, on average it weighs more


def test_fusion_p0_is_uniform_soup_and_zero_deltas_stay(tiny_bert_dir, checkpoints):
    start = read_state(tiny_bert_dir)
    states = [read_state(c) for c in checkpoints]
    fused, _ = delta_fusion(start, states, p=0.0)
    soup = uniform_soup(states)
    for key in soup:
        torch.testing.assert_close(fused[key], soup[key], rtol=0, atol=1e-6)
    unmoved, _ = delta_fusion(start, [start, start], p=1.0)
    _assert_states_equal(unmoved, start)
    with pytest.raises(ConfigError, match="merge.p"):
        delta_fusion(start, states, p=-1.0)


def test_fusion_without_start_value_falls_back_to_mean():
    a, b = {"enc": torch.ones(2), "head": torch.zeros(2)}, {"enc": 3 * torch.ones(2), "head": torch.ones(2)}
    fused, info = delta_fusion({"enc": torch.zeros(2)}, [a, b], p=1.0)
    assert info.keys_without_start == ["head"]
    torch.testing.assert_close(fused["head"], torch.full((2,), 0.5))
    torch.testing.assert_close(fused["enc"], torch.full((2,), 0.25 * 1 + 0.75 * 3))


def test_greedy_soup_keeps_only_what_helps():
    target = torch.tensor([1.0, 1.0])
    states = [{"w": torch.tensor([1.2, 0.8])}, {"w": torch.tensor([0.8, 1.2])}, {"w": torch.tensor([5.0, 5.0])}]

    def score(state):  # dev score: closeness to a target point
        return -float((state["w"] - target).norm())

    merged, report = greedy_soup(states, score)
    assert report.order[:2] in ([0, 1], [1, 0]) and report.order[2] == 2
    assert sorted(report.kept) == [0, 1]  # the far checkpoint would hurt: left out
    torch.testing.assert_close(merged["w"], target)
    assert report.final_score == pytest.approx(0.0, abs=1e-6)
    assert [t["kept"] for t in report.trajectory] == [True, True, False]


def test_incompatible_checkpoints_name_the_file(tiny_teacher_dir, checkpoints):
    with pytest.raises(CheckpointError, match=str(tiny_teacher_dir)):
        merge_checkpoints([checkpoints[0], tiny_teacher_dir], checkpoints[0].parent / "out", "uniform")
    with pytest.raises(ConfigError, match="merge.start"):
        merge_checkpoints(checkpoints, checkpoints[0].parent / "out", "fusion")


def test_merge_hf_folders_writes_a_loadable_model(tiny_bert_dir, checkpoints, tmp_path):
    from mixsp_core.models.encoder import Encoder

    result = merge_checkpoints(checkpoints, tmp_path / "fused", "fusion", start=tiny_bert_dir, p=1.0)
    record = json.loads((result.path / "merge.json").read_text())
    assert record["start"] == str(tiny_bert_dir) and record["method"] == "fusion"
    assert record["checkpoints"] == [str(c) for c in checkpoints]
    merged = read_state(result.path)
    expected, _ = delta_fusion(read_state(tiny_bert_dir), [read_state(c) for c in checkpoints], p=1.0)
    _assert_states_equal(merged, expected)
    vectors = Encoder(result.path, device="cpu").encode(["a merged model still embeds"], show_progress=False)
    assert vectors.shape == (1, 32) and np.isfinite(vectors).all()


def test_greedy_merge_of_directories_with_dev_callback(checkpoints, tmp_path):
    far = read_state(checkpoints[2])
    target = uniform_soup([read_state(checkpoints[0]), read_state(checkpoints[1])])

    def score_dir(path: Path) -> float:  # closeness to a known point, read from the written checkpoint
        state = read_state(path)
        return -sum(float((state[k] - target[k]).norm()) for k in target if target[k].is_floating_point())

    result = merge_checkpoints(checkpoints, tmp_path / "greedy", "greedy", start="seed-start", score_dir=score_dir)
    assert sorted(result.record["kept_checkpoints"]) == sorted(str(c) for c in checkpoints[:2])
    assert result.record["start"] == "seed-start"
    _assert_states_equal(read_state(result.path), target)
    assert not torch.equal(read_state(result.path)["embeddings.word_embeddings.weight"],
                           far["embeddings.word_embeddings.weight"])


def test_merge_project_checkpoints(tiny_bert_dir, tmp_path):
    """BiStudent checkpoints (keys ``encoder.*`` + heads) fused against the base HF folder as start."""
    from mixsp_core.models.checkpoint import load_checkpoint, save_checkpoint
    from mixsp_core.models.student import BiStudent
    from mixsp_core.training.config import ModelConfig

    config = ModelConfig(encoder=str(tiny_bert_dir), output_dim=16)
    dirs = []
    for seed in range(2):
        torch.manual_seed(seed)
        model = BiStudent.from_config(config)
        with torch.no_grad():
            for p in model.encoder.parameters():
                p.add_(0.01 * torch.randn_like(p))
        dirs.append(save_checkpoint(model, tmp_path / f"s{seed}", extra={"dev": 50.0 + seed}))
    result = merge_checkpoints(dirs, tmp_path / "merged", "fusion", start=tiny_bert_dir, p=2.0)
    heads = result.record["fusion"]["keys_without_start"]
    assert heads and all(not k.startswith("encoder.") for k in heads)  # heads: no start, merged uniformly
    meta = json.loads((result.path / "config.json").read_text())
    assert meta["merge"]["method"] == "fusion" and meta["training"] == {}
    model = load_checkpoint(result.path)
    out = model.encode(["one sentence", "another one"], show_progress=False)
    assert out.shape == (2, 16) and np.isfinite(out).all()
