"""`mixsp`'s pipeline subcommands: the DVC path (`mixsp <stage> --config params.yaml`, stage by stage, as
dvc.yaml runs them) on tiny data and tiny random models, and `mixsp evaluate --grid`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from mixsp_core.cli import _is_params_file, build_parser, main
from tests.pipeline_helpers import tiny_sections, write_tiny_senteval

REPO = Path(__file__).resolve().parents[1]


def test_params_file_and_training_config_are_told_apart():
    assert _is_params_file(REPO / "params.yaml")
    assert not _is_params_file(REPO / "configs" / "bi_single.yaml")
    for stage in ("compress", "merge", "promote"):
        assert build_parser().parse_args([stage]).config == "params.yaml"


def test_dvc_stage_commands_run_the_chain(tmp_path, senteval_dir, tiny_teacher_dir, tiny_bert_dir, monkeypatch,
                                          capsys):
    source = write_tiny_senteval(senteval_dir, tmp_path / "senteval", pairs_per_file=30, corpus_lines=40)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for name, values in tiny_sections(source, tiny_teacher_dir, tiny_bert_dir).items():
        params[name].update(values)
    params["data"]["root"] = str(tmp_path / "data")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():  # dvc.yaml's own commands, in its order
        argv = stage["cmd"].split()
        assert argv[0] == "mixsp" and argv[-2:] == ["--config", "params.yaml"]
        assert main([*argv[1:-1], str(tmp_path / "params.yaml")]) == 0, name
    printed = capsys.readouterr().out
    assert "mixsp-student version 1" in printed and "promoted to champion" in printed

    data = tmp_path / "data"
    report = json.loads((data / "reports" / "evaluation.json").read_text())
    assert set(report["variants"]) == {"student", "compressed/pca8", "compressed/int8", "merged"}
    champion = json.loads((data / "reports" / "champion.json").read_text())
    assert champion["model_name"] == report["best"] and champion["promoted"] is True
    sentences = tmp_path / "s.txt"
    sentences.write_text("One sentence.\nAnother one.\n")
    assert main(["encode", "--model", str(data / "models" / "champion"), "--input", str(sentences),
                 "--output", str(tmp_path / "v.npy"), "--device", "cpu"]) == 0
    assert np.load(tmp_path / "v.npy").shape == (2, report["variants"][report["best"]]["dims"])

    # Below the dev floor: refused like the Dagster model check refuses it; the champion stays.
    before = (data / "reports" / "champion.json").read_text()
    params["evaluate"]["min_dev_spearman"] = 1000.0
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert main(["promote", "--config", str(tmp_path / "params.yaml")]) == 1
    assert "min_dev_spearman" in capsys.readouterr().err
    assert (data / "reports" / "champion.json").read_text() == before

    # The params file names its field when wrong.
    params["merge"]["p"] = -1
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert main(["merge", "--config", str(tmp_path / "params.yaml")]) == 2  # a user error
    assert "merge.p" in capsys.readouterr().err


def test_evaluate_grid_writes_table_json_and_plot(tmp_path, senteval_dir, tiny_bert_dir):
    source = write_tiny_senteval(senteval_dir, tmp_path / "senteval", pairs_per_file=30, corpus_lines=10)
    out = tmp_path / "grid"
    assert main(["evaluate", "--model", str(tiny_bert_dir), "--data", f"senteval:{source}", "--grid",
                 "--grid-dims", "8,16", "--vector-types", "float32,int8", "--output-dir", str(out),
                 "--device", "cpu"]) == 0
    grid = json.loads((out / "grid.json").read_text())
    assert {(c["dims"], c["vector_type"]) for c in grid["cells"]} == {(8, "float32"), (8, "int8"),
                                                                        (16, "float32"), (16, "int8")}
    assert {c["bytes_per_vector"] for c in grid["cells"] if c["vector_type"] == "int8"} == {8, 16}
    assert (out / "grid.png").is_file() and (out / "grid.md").is_file()


def test_evaluate_needs_model_and_data_or_config(capsys):
    assert main(["evaluate", "--model", "x"]) == 2
    assert "--config params.yaml" in capsys.readouterr().err


def test_encode_precision_quantize_and_token_budget(tmp_path, tiny_bert_dir, capsys):
    import torch

    from mixsp_core.models.checkpoint import save_checkpoint
    from mixsp_core.models.student import BiStudent
    from mixsp_core.training.config import ModelConfig

    torch.manual_seed(0)
    config = ModelConfig(kind="bi", encoder=str(tiny_bert_dir), projector_mult=2, output_dim=16, max_length=32)
    ckpt = save_checkpoint(BiStudent.from_config(config), tmp_path / "student")
    sentences = tmp_path / "s.txt"
    sentences.write_text("A man plays a guitar.\nTwo dogs run in the snow.\nHi.\n")

    def encode(*options: str) -> np.ndarray:
        out = tmp_path / "v.npy"
        assert main(["encode", "--model", str(ckpt), "--input", str(sentences), "--output", str(out),
                     "--device", "cpu", *options]) == 0
        return np.load(out)

    ref = encode("--precision", "fp32")
    assert ref.shape == (3, 16)
    np.testing.assert_allclose(encode("--token-budget", "16"), ref, atol=1e-5)
    assert np.abs(encode("--precision", "bf16") - ref).max() < 0.05
    assert (encode("--quantize", "int8") * ref).sum(1).min() > 0.95
    np.testing.assert_allclose(encode("--dims", "8", "--precision", "fp32"),
                               ref[:, :8] / np.linalg.norm(ref[:, :8], axis=1, keepdims=True), atol=1e-5)
    capsys.readouterr()
    assert main(["encode", "--model", str(ckpt), "--input", str(sentences), "--output", str(tmp_path / "x.npy"),
                 "--device", "cpu", "--quantize", "int8", "--precision", "bf16"]) == 2
    assert "int8" in capsys.readouterr().err and not (tmp_path / "x.npy").exists()
    for bad in (["--token-budget", "0"], ["--precision", "fp8"], ["--quantize", "int4"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["encode", "--model", "m", "--input", "i", "--output", "o", *bad])
