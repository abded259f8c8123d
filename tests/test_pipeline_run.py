"""`make run`'s entry point (python -m pipelines.run) end to end in a subprocess: params from a
params.yaml of its own (tiny data, tiny teacher), run history in its DAGSTER_HOME, outputs printed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from pipelines.testing import CORPUS_FILE, corrupt_pairs, write_tiny_senteval

REPO = Path(__file__).resolve().parents[1]


def run_pipeline(tmp_path: Path, source: Path, teacher: Path) -> subprocess.CompletedProcess:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(spec=f"senteval:{source}", corpus_files=[str(source / CORPUS_FILE)],
                          max_corpus_sentences=100, root=str(tmp_path / "data"))
    params["teacher"].update(model=str(teacher), batch_size=16, device="cpu")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "MIXSP_PARAMS": str(tmp_path / "params.yaml"),
           "DAGSTER_HOME": str(tmp_path / "dagster_home"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    return subprocess.run([sys.executable, "-m", "pipelines.run"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


def test_run_materialises_graph_into_dagster_home(tmp_path, senteval_dir, tiny_teacher_dir):
    source = write_tiny_senteval(senteval_dir, tmp_path / "senteval", pairs_per_file=20, corpus_lines=30)
    done = run_pipeline(tmp_path, source, tiny_teacher_dir)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert ": SUCCESS" in done.stdout
    assert str(tmp_path / "data" / "pairs" / "pairs.parquet") in done.stdout
    assert (tmp_path / "data" / "teacher" / "embeddings.npy").is_file()
    assert "telemetry" in (tmp_path / "dagster_home" / "dagster.yaml").read_text()

    from dagster import AssetKey, DagsterInstance

    with DagsterInstance.from_config(str(tmp_path / "dagster_home")) as instance:
        runs = instance.get_runs()
        assert [run.job_name for run in runs] == ["mixsp_full"]
        assert instance.get_latest_materialization_event(AssetKey("teacher_embeddings"))

    # Bad source data: exit 1, the failing expectation printed, nothing downstream run.
    corrupt_pairs(source)
    failed = run_pipeline(tmp_path, source, tiny_teacher_dir)
    assert failed.returncode == 1
    assert "FAILED check sts_pairs:pairs_valid" in failed.stderr
    assert "sentence_corpus" in failed.stderr.split("not run")[-1]
