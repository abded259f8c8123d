"""`mixsp soup`: several training runs from one seed merged, the best method on dev kept."""

from __future__ import annotations

import json

import pytest

from mixsp_core.cli import main
from mixsp_core.errors import CheckpointError, ConfigError
from mixsp_core.models.checkpoint import load_checkpoint
from mixsp_core.paths import PipelinePaths
from mixsp_core.stages.merge import run_soup
from mixsp_core.tracking.tracker import NullTracker
from mixsp_core.training.loop import run_training
from tests.train_helpers import one_thread, small_pairs, tiny_config

_one_thread = pytest.fixture(scope="module", autouse=True)(one_thread)


@pytest.fixture(scope="module")
def runs_and_paths(tiny_bert_dir, senteval_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("soup")
    pairs = small_pairs(senteval_dir)
    paths = PipelinePaths(root / "data")
    paths.pairs.parent.mkdir(parents=True)
    pairs.to_parquet(paths.pairs)
    runs = []
    for name, loss in (("cosent", {}), ("pearson", {"pearson": 1.0})):  # same seed: same start, other loss
        config = tiny_config(tiny_bert_dir, loss=loss, train={"max_steps": 4, "snapshot_every": 4})
        run_training(config, pairs, out_dir=root / name, tracker=NullTracker(), show_progress=False)
        runs.append(root / name)
    return runs, paths


def test_soup_keeps_the_best_method_on_dev(runs_and_paths, tmp_path):
    runs, paths = runs_and_paths
    result = run_soup(runs, tmp_path / "soup", paths, ["uniform", "greedy", "fusion"], batch_size=32)
    assert result.best_method == max(result.methods, key=result.methods.get)
    assert set(result.inputs) == {str(r / "best") for r in runs}
    report = json.loads((tmp_path / "soup" / "soup.json").read_text())
    assert report["best_method"] == result.best_method and report["start"].endswith("start")
    assert load_checkpoint(tmp_path / "soup").encode(["a sentence"], show_progress=False).shape == (1, 16)


def test_soup_needs_two_runs_with_checkpoints(runs_and_paths, tmp_path):
    runs, paths = runs_and_paths
    with pytest.raises(ConfigError, match="soup.runs"):
        run_soup(runs[:1], tmp_path / "one", paths, ["uniform"])
    with pytest.raises(CheckpointError, match="no best/ checkpoint"):
        run_soup([runs[0], tmp_path], tmp_path / "bad", paths, ["uniform"])
    assert not (tmp_path / "bad").exists()


def test_cli_soup_reports_an_error_without_a_traceback(tmp_path, capsys):
    assert main(["soup", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "o")]) == 2
    assert "no best/ checkpoint" in capsys.readouterr().err
