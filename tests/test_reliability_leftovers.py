"""Issue 15, item 7: what killed writes leave behind. A checkpoint swap cut short between its two renames is
put back (so training resumes from last/ instead of step 0); `.partial` work directories are swept by the
next writer of the output, under its lock; what lands is shared (0755 / 0644) whatever the umask."""

from __future__ import annotations

import json
import os
import stat
import unittest.mock as mock
from pathlib import Path

import pytest

from mixsp_core.io import old_path, output_lock, replace_dir, repair_swap, sweep_leftovers, writing_dir
from mixsp_core.paths import RunDir
from mixsp_core.tracking.tracker import NullTracker
from tests.train_helpers import Interrupt, StopAt


def _folder(path: Path, text: str) -> Path:
    path.mkdir(parents=True)
    (path / "model.safetensors").write_text(text)
    return path


def test_repair_swap_puts_back_a_target_left_only_as_old(tmp_path, caplog):
    target = tmp_path / "last"
    _folder(old_path(target), "weights at step 4")  # killed between the renames: target gone
    assert old_path(target).name == ".last.old"
    with caplog.at_level("WARNING", logger="mixsp_core.io"):
        assert repair_swap(target) is True
    assert (target / "model.safetensors").read_text() == "weights at step 4"
    assert not old_path(target).exists()
    assert "put back" in caplog.text and str(target) in caplog.text
    assert repair_swap(target) is False  # nothing left to do


def test_repair_swap_removes_the_old_when_the_swap_completed(tmp_path):
    target = _folder(tmp_path / "best", "new")
    _folder(old_path(target), "previous")  # killed after the swap, before the old one was removed
    assert repair_swap(target) is False
    assert (target / "model.safetensors").read_text() == "new" and not old_path(target).exists()


def test_replace_dir_finishes_an_interrupted_swap_first(tmp_path):
    target = tmp_path / "best"
    _folder(old_path(target), "previous")
    replace_dir(_folder(tmp_path / "work", "new"), target)
    assert (target / "model.safetensors").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]


def test_sweep_removes_partials_and_keeps_real_outputs(tmp_path):
    root = tmp_path / "models" / "student"
    best = _folder(root / "best", "best")
    _folder(root / "snapshots" / "step-4", "snap")
    (root / "metrics.json").write_text("{}")
    (root / ".hidden-but-real").mkdir()
    dead = [_folder(root / ".best.k2j4x1.partial", "half"),
            _folder(root / "snapshots" / ".step-8.a8c0.partial", "half"),
            _folder(tmp_path / "models" / ".student.zz91.partial", "half")]  # the root's own, beside it
    _folder(root / ".last.old", "step 4")  # a swap cut short: last/ missing
    _folder(root / ".best.old", "stale")  # a swap that completed: best/ present
    other = _folder(tmp_path / "models" / ".compressed.q1.partial", "another output's")

    with output_lock(root, "test"):
        found = sweep_leftovers(root)

    assert set(found) == {*dead, root / ".last.old", root / ".best.old"}
    assert not any(p.exists() for p in dead)
    assert (root / "last" / "model.safetensors").read_text() == "step 4"  # put back, not removed
    assert (best / "model.safetensors").read_text() == "best" and not (root / ".best.old").exists()
    assert (root / "snapshots" / "step-4" / "model.safetensors").is_file()
    assert (root / "metrics.json").is_file() and (root / ".hidden-but-real").is_dir()
    assert other.is_dir()  # beside the root but another output's: not this sweep's to remove
    assert sweep_leftovers(root) == []


def test_sweep_of_a_missing_output_does_nothing(tmp_path):
    assert sweep_leftovers(tmp_path / "nothing" / "here") == []


def test_writing_dir_shares_a_model_directory_under_umask_077(tmp_path):
    before = os.umask(0o077)
    try:
        with writing_dir(tmp_path / "model") as work:
            (work / "1_Pooling").mkdir()
            (work / "1_Pooling" / "config.json").write_text("{}")
            (work / "model.safetensors").write_bytes(b"\0" * 8)
    finally:
        os.umask(before)
    target = tmp_path / "model"
    modes = {p.relative_to(tmp_path).as_posix(): stat.S_IMODE(p.stat().st_mode)
             for p in [target, *target.rglob("*")]}
    assert modes == {"model": 0o755, "model/1_Pooling": 0o755, "model/1_Pooling/config.json": 0o644,
                     "model/model.safetensors": 0o644}


# --- a training run whose last/ a kill left as .last.old -------------------------------------------


@pytest.fixture(scope="module")
def pairs(senteval_dir):
    from tests.train_helpers import small_pairs

    return small_pairs(senteval_dir)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    from tests.train_helpers import one_thread

    yield from one_thread()


def test_a_run_whose_last_was_left_as_old_resumes_at_the_saved_step(tiny_bert_dir, pairs, tmp_path):
    from mixsp_core.training.loop import run_training
    from mixsp_core.training.resume import can_resume
    from tests.train_helpers import tiny_config

    config = tiny_config(tiny_bert_dir)  # 8 steps, a checkpoint every 4
    run = RunDir(tmp_path / "cut")
    with pytest.raises(Interrupt):
        run_training(config, pairs, out_dir=run.root, tracker=StopAt(6), show_progress=False)
    # killed between replace_dir's two renames while saving last/, plus a work folder of that save
    os.replace(run.last, old_path(run.last))
    _folder(run.root / ".last.x81hq0.partial", "half-written")
    assert not run.last.exists()

    assert can_resume(config, run)  # the stage's question: last/ is put back first
    os.replace(run.last, old_path(run.last))  # cut again: now the loop itself must find it
    resumed = NullTracker()
    result = run_training(config, pairs, out_dir=run.root, tracker=resumed, show_progress=False)
    steps = [s for s, _ in resumed.series("train/loss")]
    assert steps[0] == 5 and steps[-1] == 8 and result.steps == 8  # resumed at step 4, not from 0
    assert not old_path(run.last).exists() and not (run.root / ".last.x81hq0.partial").exists()


def test_the_train_stage_resumes_a_run_whose_last_was_left_as_old(tiny_bert_dir, senteval_dir, tmp_path):
    """The pipeline's train stage decides resume-or-retrain (can_resume) before training: a last/ left as
    .last.old must not make it start over and delete the run's snapshots."""
    import yaml

    from mixsp_core.params import load_params
    from mixsp_core.stages import train as train_stage

    params_yaml = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    params_yaml["data"]["root"] = str(tmp_path / "data")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params_yaml))
    params = load_params(tmp_path / "params.yaml")
    run = params.paths.student
    seen = {}

    def fake_training(config, pairs, corpus, teacher, out_dir, tracker, **kwargs):
        seen["resume"] = config.train.resume
        raise _Stop

    class _Stop(Exception):
        pass

    state = {"step": 4, "total_steps": 8, "config": train_stage.student_config(params).to_dict()}
    _folder(old_path(run.last), "step 4")
    (old_path(run.last) / "trainer_state.json").write_text(json.dumps(state))
    _folder(run.snapshot(4), "snapshot")
    with mock.patch.object(train_stage, "run_training", fake_training), \
            mock.patch.object(train_stage, "training_inputs", lambda config, paths: (None, None, None)), \
            mock.patch.object(train_stage, "_tracker", lambda *a, **k: NullTracker()):
        with pytest.raises(_Stop):
            train_stage.run_train(params, show_progress=False)
    assert seen["resume"] is True
    assert (run.last / "trainer_state.json").is_file() and run.snapshot(4).is_dir()
