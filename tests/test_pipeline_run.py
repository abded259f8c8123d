"""`make run`'s entry point (python -m pipelines.run) end to end in a subprocess: params from a
params.yaml of its own (tiny data, tiny teacher), run history in its DAGSTER_HOME, outputs printed."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import yaml

from tests.pipeline_helpers import corrupt_pairs, tiny_sections, write_tiny_senteval

REPO = Path(__file__).resolve().parents[1]


def run_pipeline(tmp_path: Path, source: Path, teacher: Path, encoder: Path) -> subprocess.CompletedProcess:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for name, values in tiny_sections(source, teacher, encoder).items():
        params[name].update(values)
    params["data"]["root"] = str(tmp_path / "data")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "MIXSP_PARAMS": str(tmp_path / "params.yaml"),
           "DAGSTER_HOME": str(tmp_path / "dagster_home"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    return subprocess.run([sys.executable, "-m", "pipelines.run"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)


def test_run_materialises_graph_into_dagster_home(tmp_path, senteval_dir, tiny_teacher_dir, tiny_bert_dir):
    source = write_tiny_senteval(senteval_dir, tmp_path / "senteval", pairs_per_file=20, corpus_lines=30)
    done = run_pipeline(tmp_path, source, tiny_teacher_dir, tiny_bert_dir)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert ": SUCCESS" in done.stdout
    assert str(tmp_path / "data" / "pairs" / "pairs.parquet") in done.stdout
    assert (tmp_path / "data" / "teacher" / "embeddings.npy").is_file()
    assert (tmp_path / "data" / "models" / "champion" / "champion.json").is_file()
    assert "mixsp-student version 1" in done.stdout and "promoted to champion" in done.stdout
    assert "DVC: skipped" in done.stdout  # artifacts outside the repository's data/: dvc.lock untouched
    # The summary ends with the dev table and how to load the champion.
    tail = done.stdout.split("Dev table")[-1]
    assert "| variant | dev |" in tail and "SentenceTransformer(" in tail
    assert 'mlflow.pyfunc.load_model("models:/mixsp-student@champion")' in tail
    assert "telemetry" in (tmp_path / "dagster_home" / "dagster.yaml").read_text()

    from dagster import AssetKey, DagsterInstance

    with DagsterInstance.from_config(str(tmp_path / "dagster_home")) as instance:
        runs = instance.get_runs()
        assert [run.job_name for run in runs] == ["mixsp_full"]
        assert runs[0].tags["mixsp/dvc-sync"] == "inline"  # the dvc_sync_after_run sensor leaves it alone
        assert instance.get_latest_materialization_event(AssetKey("teacher_embeddings"))
        assert instance.get_latest_materialization_event(AssetKey("champion"))

    # Bad source data: exit 1, the failing expectation printed, nothing downstream run.
    corrupt_pairs(source)
    failed = run_pipeline(tmp_path, source, tiny_teacher_dir, tiny_bert_dir)
    assert failed.returncode == 1
    assert "FAILED check sts_pairs:pairs_valid" in failed.stderr
    assert "sentence_corpus" in failed.stderr.split("not run")[-1]


def test_run_pins_outputs_in_dvc_and_logs_hashes_to_mlflow(tmp_path, senteval_dir, tiny_teacher_dir, tiny_bert_dir):
    """In a scratch copy of the repository (its own git + DVC, ../shared linked), `python -m pipelines.run`
    leaves `dvc status` clean and every MLflow run of the Dagster run records dvc.lock's hashes."""
    import shutil

    scratch = tmp_path / "main"
    (tmp_path / "shared").symlink_to(REPO.parent / "shared")
    top = {".venv", "data", ".git", ".dagster_home", "mlflow.db", "mlartifacts", ".device", ".pytest_cache"}

    def ignore(folder: str, names: list[str]) -> set[str]:
        skip = {n for n in names if n == "__pycache__" or n.endswith(".egg-info")}
        if Path(folder) == REPO:
            skip |= top & set(names)
        if Path(folder) == REPO / ".dvc":
            skip |= {"cache", "tmp"} & set(names)
        return skip

    shutil.copytree(REPO, scratch, ignore=ignore, symlinks=True)
    git = ["git", "-C", str(scratch), "-c", "user.email=test@example.com", "-c", "user.name=test"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "scratch"], check=True)
    dvc = str(Path(sys.executable).parent / "dvc")
    remote = tmp_path / "remote"  # the documented way to point the remote elsewhere: .dvc/config.local
    subprocess.run([dvc, "remote", "modify", "--local", "local", "url", str(remote)], cwd=scratch, check=True)

    source = write_tiny_senteval(senteval_dir, tmp_path / "senteval", pairs_per_file=20, corpus_lines=30)
    params = yaml.safe_load((scratch / "params.yaml").read_text())
    for name, values in tiny_sections(source, tiny_teacher_dir, tiny_bert_dir).items():
        params[name].update(values)
    (scratch / "params.yaml").write_text(yaml.safe_dump(params))  # data.root stays data/: what dvc.yaml names
    uri = f"sqlite:///{scratch / 'mlflow.db'}"
    env = {**os.environ, "PYTHONPATH": str(scratch), "MIXSP_PARAMS": str(scratch / "params.yaml"),
           "DAGSTER_HOME": str(scratch / ".dagster_home"), "MLFLOW_TRACKING_URI": uri}
    done = subprocess.run([sys.executable, "-m", "pipelines.run"], cwd=scratch, env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "DVC: dvc.lock updated" in done.stdout
    assert f"DVC: pushed to remote local ({remote})" in done.stdout and remote.is_dir()
    assert "git add dvc.lock" in done.stdout  # make run tells the user to commit the lock

    status = subprocess.run([dvc, "status", "--json"], cwd=scratch, env=env, capture_output=True, text=True)
    assert status.returncode == 0 and status.stdout.strip() == "{}", status.stdout + status.stderr
    lock = yaml.safe_load((scratch / "dvc.lock").read_text())["stages"]
    assert list(lock) == list(yaml.safe_load((scratch / "dvc.yaml").read_text())["stages"])

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("mixsp").experiment_id])
    assert {run.data.tags["mixsp.stage"] for run in runs} == {"pipeline", "train", "evaluate", "promote"}
    student_md5 = next(o["md5"] for o in lock["train"]["outs"] if o["path"] == "data/models/student")
    train = [run for run in runs if run.data.tags["mixsp.stage"] == "train"]
    assert len(train) == 1 and train[0].data.tags["dvc.train.data/models/student"] == student_md5
    assert {a.path for a in client.list_artifacts(train[0].info.run_id, "dvc")} == {"dvc/dvc.lock", "dvc/params.yaml"}

    # Optimizer state and the merge's snapshots are scratch: in no cache and not on the remote.
    student = scratch / "data" / "models" / "student"
    scratch_files = [p for part in ("last", "snapshots", "start") for p in (student / part).rglob("*") if p.is_file()]
    assert any(p.name == "optimizer.safetensors" for p in scratch_files)
    cached = {p.parent.name + p.name for p in (remote / "files" / "md5").rglob("*") if p.is_file()}
    def md5(path: Path) -> str:
        return hashlib.md5(path.read_bytes()).hexdigest()

    best = [p for p in (student / "best").rglob("*") if p.is_file()]
    assert all(md5(p) in cached for p in best)
    only_scratch = {md5(p) for p in scratch_files} - {md5(p) for p in scratch.joinpath("data").rglob("*")
                                                        if p.is_file() and p not in scratch_files}
    assert only_scratch and not only_scratch & cached
