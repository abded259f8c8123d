"""Issue 15, item 1: one writer per output. A second writer of an output another process holds is refused
at once, naming the holder (pid, host, command, start time); the CLI says so in one line with exit 2; a
killed holder blocks nobody; a thread may nest its own lock; only rank 0 of a training run takes it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import yaml

from mixsp_core.cli import main
from mixsp_core.errors import MixSPError, OutputBusyError
from mixsp_core.io import lock_path, output_lock, read_holder

REPO = Path(__file__).resolve().parents[1]


class Holder:
    """A separate Python process holding ``output_lock(target)`` until it is stopped or killed."""

    def __init__(self, target: Path, what: str = "test holder"):
        code = textwrap.dedent(f"""
            import sys, time
            from mixsp_core.io import output_lock
            with output_lock({str(target)!r}, {what!r}):
                print("locked", flush=True)
                time.sleep(120)
        """)
        self.proc = subprocess.Popen([sys.executable, "-c", code, "--holder-flag"], cwd=REPO,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        assert line.strip() == "locked", (line, self.proc.stderr.read() if self.proc.poll() is not None else "")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def __enter__(self) -> Holder:
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.kill()


def _refused_elsewhere(target: Path) -> bool:
    """Whether another process is refused ``target``'s lock right now."""
    code = f"from mixsp_core.io import output_lock\nwith output_lock({str(target)!r}, 'probe'): pass"
    other = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert other.returncode == 0 or "OutputBusyError" in other.stderr, other.stderr
    return other.returncode != 0


def test_a_second_writer_is_refused_at_once_naming_the_holder(tmp_path):
    target = tmp_path / "models" / "compressed"
    with Holder(target, "compress stage") as holder:
        started = time.perf_counter()
        with pytest.raises(OutputBusyError) as caught:
            with output_lock(target, "second compress"):
                pytest.fail("the second writer got the lock")
        assert time.perf_counter() - started < 5  # refused, not waiting
        message = str(caught.value)
        assert isinstance(caught.value, MixSPError)
        assert str(target) in message and f"pid {holder.pid}" in message and "compress stage" in message
        assert "--holder-flag" in message and "second compress refused" in message and "\n" not in message
        assert caught.value.holder["pid"] == holder.pid and caught.value.holder["started"]
        # the lock file is a hidden sibling of the output, never inside it
        lock = lock_path(target)
        assert lock == target.parent / ".compressed.lock" and lock.is_file() and not target.exists()


def test_a_killed_holder_blocks_nobody_and_its_stale_record_is_not_trusted(tmp_path):
    target = tmp_path / "out"
    with Holder(target) as holder:
        holder.kill()
        # the record the killed holder wrote stays in the file, but names a dead pid: ignored
        assert json.loads(lock_path(target).read_text())["pid"] == holder.pid
        assert read_holder(lock_path(target)) == {}
        with output_lock(target, "after the kill") as lock:
            assert read_holder(lock)["pid"] == os.getpid()
            assert read_holder(lock)["what"] == "after the kill"
    assert lock_path(target).read_text() == ""  # released: no record left for the next reader


def test_the_lock_is_free_again_after_a_clean_release(tmp_path):
    target = tmp_path / "out"
    with output_lock(target, "first"):
        pass
    with Holder(target):  # another process gets it
        pass
    with output_lock(target, "again"):
        pass


def test_a_thread_nests_its_own_lock_but_another_thread_is_refused(tmp_path):
    target = tmp_path / "run"
    errors: list[BaseException] = []

    def other_thread() -> None:
        try:
            with output_lock(target, "other thread"):
                pass
        except BaseException as err:  # noqa: BLE001 - handed to the test
            errors.append(err)

    with output_lock(target, "stage"):
        with output_lock(target, "loop inside the stage"):  # the stage, then the training loop
            pass
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
        assert len(errors) == 1 and isinstance(errors[0], OutputBusyError)
        assert f"pid {os.getpid()}" in str(errors[0])
        assert _refused_elsewhere(target)  # the inner block's exit did not release the outer lock
    assert not _refused_elsewhere(target)


def test_a_forked_child_does_not_hold_its_parents_lock(tmp_path):
    target = tmp_path / "run"
    with output_lock(target, "parent"):
        pid = os.fork()
        if pid == 0:  # the child: it neither holds the lock nor may nest into it
            code = 0
            try:
                with output_lock(target, "child"):
                    code = 3
            except OutputBusyError:
                code = 0
            except BaseException:  # noqa: BLE001
                code = 4
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert _refused_elsewhere(target)  # the child's exit did not release the parent's lock
    assert not _refused_elsewhere(target)


def _params_file(tmp_path: Path) -> Path:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["root"] = str(tmp_path / "data")
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_cli_refuses_a_busy_output_with_one_line_and_exit_2(tmp_path, capsys):
    params = _params_file(tmp_path)
    compressed = tmp_path / "data" / "models" / "compressed"
    with Holder(compressed, "compress stage") as holder:
        assert main(["compress", "--config", str(params)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("mixsp compress: error: ") and "\n" not in err and "Traceback" not in err, err
        assert f"pid {holder.pid}" in err and str(compressed) in err
    # free again: the same command gets past the lock (and stops at the missing student, as before)
    assert main(["compress", "--config", str(params)]) == 2
    assert "no student checkpoint yet" in capsys.readouterr().err


def test_each_stage_takes_its_outputs_lock(tmp_path):
    """The stage functions (what the CLI, the Dagster assets and DVC call) refuse a held output."""
    from mixsp_core.params import load_params
    from mixsp_core.stages.compress import run_compress
    from mixsp_core.stages.evaluate import run_evaluate
    from mixsp_core.stages.merge import run_merge
    from mixsp_core.stages.prepare import run_corpus, run_pairs
    from mixsp_core.stages.promote import run_promote
    from mixsp_core.stages.teacher import run_teacher, run_teacher_merge
    from mixsp_core.stages.train import run_train

    params = load_params(_params_file(tmp_path))
    paths = params.paths
    for run, output in ((run_pairs, paths.pairs), (run_corpus, paths.corpus), (run_teacher, paths.teacher),
                        (run_teacher_merge, paths.teacher), (run_train, paths.student.root),
                        (run_compress, paths.compressed), (run_merge, paths.merged),
                        (run_evaluate, paths.reports), (run_promote, paths.champion)):
        with Holder(output) as holder:
            with pytest.raises(OutputBusyError, match=f"pid {holder.pid}"):
                run(params)


def test_a_training_run_into_a_held_directory_is_refused_before_it_writes(tmp_path, tiny_bert_dir,
                                                                         senteval_dir):
    from mixsp_core.tracking.tracker import NullTracker
    from mixsp_core.training.loop import run_training
    from tests.train_helpers import small_pairs, tiny_config

    run = tmp_path / "run"
    with Holder(run):
        with pytest.raises(OutputBusyError):
            run_training(tiny_config(tiny_bert_dir), small_pairs(senteval_dir), out_dir=run,
                         tracker=NullTracker(), show_progress=False)
    assert not run.exists()  # nothing of the refused run (not even run_config.yaml) was written


def test_only_rank_0_takes_the_training_lock(tmp_path, monkeypatch):
    """Under torchrun every rank runs the stage in one directory: ranks > 0 never take (or wait for) it."""
    from mixsp_core.stages.train import _claim_run

    run = tmp_path / "run"
    with Holder(run):
        monkeypatch.setenv("RANK", "1")
        with _claim_run(run, "train stage"):
            pass
        monkeypatch.setenv("RANK", "0")
        with pytest.raises(OutputBusyError):
            with _claim_run(run, "train stage"):
                pass
