"""Issue 15, items 4 and 6 (CLI): outputs written atomically to exactly the path given, never replacing a
directory or a device; every user error a one-line `mixsp <cmd>: error: ...` with exit 2 (the traceback only
with --debug); `mixsp validate` on invalid data and the other checks that say no keep exit 1."""

from __future__ import annotations

import errno
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mixsp_core.cli import _output_file, _write_json_output, _write_output, main
from mixsp_core.errors import MixSPError

REPO = Path(__file__).resolve().parents[1]


def _sentences(tmp_path: Path) -> Path:
    path = tmp_path / "s.txt"
    path.write_text("A man plays a guitar.\nTwo dogs run in the snow.\nHi.\n")
    return path


def _pairs_csv(tmp_path: Path, rows: list[tuple[str, str, float]], name: str = "pairs.csv",
               split: str = "test") -> Path:
    path = tmp_path / name
    path.write_text("sentence1,sentence2,score,split\n" + "".join(f"{a},{b},{s},{split}\n" for a, b, s in rows))
    return path


def _one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"mixsp {command}: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


GOOD_ROWS = [("A cat sits.", "A cat is sitting.", 4.5), ("A dog runs.", "A man sings.", 0.5),
             ("Kids play.", "Children are playing.", 4.0), ("It rains.", "The sun is out.", 1.0)]


# --- item 4: atomic outputs at exactly the path given --------------------------------------------


def test_encode_writes_exactly_the_output_path_given(tmp_path, tiny_bert_dir, capsys):
    out = tmp_path / "o11"  # no .npy suffix: np.save given a path would write o11.npy
    assert main(["encode", "--model", str(tiny_bert_dir), "--input", str(_sentences(tmp_path)),
                 "--output", str(out), "--device", "cpu"]) == 0
    assert out.is_file() and not (tmp_path / "o11.npy").exists()
    assert np.load(out).shape == (3, 32)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o11", "s.txt"]  # no temporary left beside it
    assert f"{out}: 3 x 32 float32" in capsys.readouterr().out


def test_a_failed_write_keeps_the_previous_file_and_leaves_nothing_partial(tmp_path):
    out = tmp_path / "v.npy"
    np.save(out, np.ones((2, 2), np.float32))
    before = out.read_bytes()

    def disk_full(fh) -> None:
        fh.write(b"\x93NUMPY half a header")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(MixSPError, match=r"v\.npy: could not write \(No space left on device\); the previous"):
        _write_output(out, disk_full)
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["v.npy"]


def test_a_file_size_limit_keeps_the_previous_file(tmp_path):
    out = tmp_path / "v.npy"
    np.save(out, np.ones((2, 2), np.float32))
    before = out.read_bytes()
    code = ("import numpy as np, sys; from pathlib import Path; from mixsp_core.cli import _write_output\n"
            f"_write_output(Path({str(out)!r}), lambda fh: np.save(fh, np.zeros((1000, 100), np.float32)))")

    def limit() -> None:  # 4 KiB: the 400 KB array cannot be written (Python turns SIGXFSZ into EFBIG)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    done = subprocess.run([sys.executable, "-c", code], preexec_fn=limit, capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert done.returncode != 0 and "could not write" in done.stderr
    assert out.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["v.npy"]


def test_outputs_that_are_devices_pipes_or_directories_are_refused(tmp_path, tiny_bert_dir, capsys):
    with pytest.raises(MixSPError, match=r"--output /dev/full is not a regular file"):
        _output_file("/dev/full", "--output")  # the check alone: nothing is written near /dev
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    sentences = _sentences(tmp_path)
    for target, says in ((fifo, "is not a regular file"), (tmp_path, "is a directory")):
        assert main(["encode", "--model", str(tiny_bert_dir), "--input", str(sentences), "--output", str(target),
                     "--device", "cpu"]) == 2
        assert says in _one_line_error(capsys, "encode")
    assert fifo.exists() and not fifo.is_file()  # still the pipe: never replaced
    data = _pairs_csv(tmp_path, GOOD_ROWS)
    assert main(["evaluate", "--model", str(tiny_bert_dir), "--data", f"file:{data}", "--json", str(tmp_path),
                 "--device", "cpu"]) == 2
    assert f"--json {tmp_path} is a directory" in _one_line_error(capsys, "evaluate")
    assert main(["evaluate", "--model", str(tiny_bert_dir), "--data", f"file:{data}", "--grid",
                 "--output-dir", str(data), "--device", "cpu"]) == 2
    assert "--output-dir" in _one_line_error(capsys, "evaluate")


@pytest.mark.filterwarnings("ignore::scipy.stats.ConstantInputWarning")
def test_evaluate_json_is_valid_json_with_null_for_undefined_correlations(tmp_path, tiny_bert_dir, monkeypatch):
    class Constant:  # constant vectors (as a NaN-corrupted model gives): every correlation is undefined
        def encode(self, sentences, batch_size=64):
            return np.ones((len(sentences), 4), np.float32)

    monkeypatch.setattr("mixsp_core.cli._load", lambda *args: Constant())
    data = _pairs_csv(tmp_path, GOOD_ROWS)
    out = tmp_path / "r.json"
    assert main(["evaluate", "--model", str(tiny_bert_dir), "--data", f"file:{data}", "--json", str(out)]) == 0

    def refuse(token: str):
        raise AssertionError(f"invalid JSON token {token}")

    result = json.loads(out.read_text(), parse_constant=refuse)
    assert result["tasks"]["pairs"]["spearman"] is None and result["tasks"]["pairs"]["pairs"] == 4
    _write_json_output(out, {"x": float("inf"), "y": [float("nan"), 1.5]})
    assert json.loads(out.read_text(), parse_constant=refuse) == {"x": None, "y": [None, 1.5]}


# --- item 6: one-line user errors, exit 2 --------------------------------------------------------


@pytest.mark.parametrize("options, says", [
    (["--batch-size", "0"], "argument --batch-size: expected a positive integer, got '0'"),
    (["--dims", "0"], "argument --dims: expected a positive integer, got '0'"),
    (["--device", "tpu"], "argument --device: expected cpu, cuda or cuda:N, got 'tpu'"),
])
def test_bad_encode_options_exit_2_with_one_line(tmp_path, options, says, capsys):
    with pytest.raises(SystemExit) as done:
        main(["encode", "--model", "m", "--input", "i", "--output", str(tmp_path / "o.npy"), *options])
    assert done.value.code == 2
    assert says in _one_line_error(capsys, "encode")


def test_cuda_without_cuda_is_refused(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit) as done:
        main(["encode", "--model", "m", "--input", "i", "--output", "o.npy", "--device", "cuda"])
    assert done.value.code == 2
    assert "CUDA is not available on this machine; use --device cpu" in _one_line_error(capsys, "encode")


@pytest.mark.parametrize("argv, command, says", [
    (["evaluate", "--model", "m", "--data", "file:x.csv", "--grid", "--grid-dims", "abc"], "evaluate",
     "argument --grid-dims: expected positive integers"),
    (["evaluate", "--model", "m", "--data", "file:x.csv", "--grid", "--layers", "2,0"], "evaluate",
     "argument --layers: expected positive integers"),
    (["soup", "a", "--out", "o", "--p", "nan"], "soup", "argument --p: expected a finite number >= 0"),
])
def test_bad_list_and_number_options_exit_2_with_one_line(argv, command, says, capsys):
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 2
    assert says in _one_line_error(capsys, command)


def test_broken_model_folders_are_one_line_errors_naming_the_file(tmp_path, capsys):
    sentences = _sentences(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    listed = tmp_path / "listed"
    listed.mkdir()
    (listed / "config.json").write_text("[1, 2]")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text('{"model_type": "bert"}')
    (pickled / "pytorch_model.bin").write_bytes(b"never unpickled")
    for folder, says in ((empty, f"{empty}: the model directory is empty"),
                         (listed, f"{listed / 'config.json'}: expected a JSON object (a model config), found a list"),
                         (pickled, f"{pickled}: only pytorch_model.bin, no model.safetensors")):
        assert main(["encode", "--model", str(folder), "--input", str(sentences),
                     "--output", str(tmp_path / "o.npy"), "--device", "cpu"]) == 2
        assert says in _one_line_error(capsys, "encode")
    assert not (tmp_path / "o.npy").exists()


@pytest.mark.parametrize("rows, split, says", [
    (GOOD_ROWS[:1], "test", "task pairs has 1 pair; a correlation needs at least 2"),
    ([(a, b, 3.0) for a, b, _ in GOOD_ROWS], "test", "task pairs: every gold score is 3; a correlation with a "
                                                      "constant is undefined"),
    (GOOD_ROWS, "train", "no dev or test pairs to evaluate (all 4 pairs are train"),
])
def test_pairs_that_cannot_be_scored_are_refused_before_the_model_loads(tmp_path, rows, split, says, capsys):
    data = _pairs_csv(tmp_path, rows, split=split)
    # the model does not exist: the data is refused before anything tries to load it
    assert main(["evaluate", "--model", str(tmp_path / "no-model"), "--data", f"file:{data}"]) == 2
    err = _one_line_error(capsys, "evaluate")
    assert says in err and str(data) in err


def test_debug_shows_the_traceback_before_or_after_the_command(tmp_path, capsys):
    data = _pairs_csv(tmp_path, GOOD_ROWS[:1])
    argv = ["evaluate", "--model", "m", "--data", f"file:{data}"]
    for debug in (["--debug", *argv], [*argv, "--debug"]):
        assert main(debug) == 2
        err = capsys.readouterr().err
        assert "Traceback (most recent call last)" in err and "DataError" in err
        assert err.strip().splitlines()[-1].startswith("mixsp evaluate: error: ")


def test_a_check_that_says_no_exits_1_a_user_error_2(tmp_path, capsys):
    bad = _pairs_csv(tmp_path, [*GOOD_ROWS, ("Too high.", "Way too high.", 9.0)], name="bad.csv")
    assert main(["validate", "--data", f"file:{bad}"]) == 1  # validation ran and failed: documented exit 1
    capsys.readouterr()
    params = tmp_path / "params.yaml"
    params.write_text(f"data: {{root: {tmp_path / 'data'}}}\nstudent: {{name: x}}\n")
    assert main(["prepare", "--config", str(params), "--data", f"file:{bad}"]) == 1  # so does prepare's suite
    assert "score is finite and within 0-5" in capsys.readouterr().err
    assert main(["validate", "--data", f"file:{tmp_path / 'missing.csv'}"]) == 2  # a user error
    assert "missing.csv: file not found" in _one_line_error(capsys, "validate")
