"""DVC history: a run's outputs committed and pushed, the lock logged to its MLflow training run, and any
earlier run brought back bit-identically (`mixsp restore`), on a tiny git + DVC repository of its own
(one stage that writes a champion and a training run directory from params.yaml's seed)."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mixsp_core.errors import HistoryError
from mixsp_core.tracking.dvc_history import (
    commit_outputs,
    configured_remote,
    lock_outputs,
    push_outputs,
    restore_run,
    tree_sha256,
)

REPO = Path(__file__).resolve().parents[1]
DVC = str(Path(sys.executable).parent / "dvc")
GIT = ["git", "-c", "user.email=test@example.com", "-c", "user.name=test"]

# The stage: a champion and a student run directory whose bytes depend on the seed; last/ and snapshots/
# are the scratch that the repository's .dvcignore keeps out of the output.
STAGE_SCRIPT = """\
import pathlib, random, yaml
seed = yaml.safe_load(open("params.yaml"))["seed"]
rng = random.Random(seed)
def write(path, data):
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
write("data/models/champion/model.safetensors", rng.randbytes(4096))
write("data/models/champion/config.json", b'{"seed": %d}' % seed)
write("data/models/student/best/model.safetensors", rng.randbytes(4096))
write("data/models/student/metrics.json", b'{"dev": %d}' % seed)
write("data/models/student/last/optimizer.safetensors", rng.randbytes(8192))
write("data/models/student/snapshots/step-1/model.safetensors", rng.randbytes(4096))
"""


def sh(repo: Path, *argv: str) -> str:
    return subprocess.run(argv, cwd=repo, check=True, capture_output=True, text=True,
                          env={**os.environ, "DVC_NO_ANALYTICS": "1"}).stdout


@pytest.fixture
def tiny_repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A git + DVC repository with the project's .dvcignore, one stage, and a local remote ../remote (not
    created yet: the first push makes it)."""
    monkeypatch.delenv("MIXSP_DVC_REMOTE", raising=False)
    repo = tmp_path / "repo"
    (repo / "code" / "pkg").mkdir(parents=True)
    (repo / "code" / "pkg" / "stage.py").write_text(STAGE_SCRIPT)
    (repo / "params.yaml").write_text("seed: 1\n")
    stages = {"stages": {"train": {"cmd": f"{sys.executable} code/pkg/stage.py", "deps": ["code"],
                                   "params": ["seed"],
                                   "outs": ["data/models/student", "data/models/champion"]}}}
    (repo / "dvc.yaml").write_text(yaml.safe_dump(stages))
    (repo / ".gitignore").write_text("/data/\n")
    sh(repo, *GIT, "init", "-q")
    sh(repo, DVC, "init", "-q")
    shutil.copy(REPO / ".dvcignore", repo / ".dvcignore")
    sh(repo, DVC, "remote", "add", "-d", "local", "../remote")
    sh(repo, *GIT, "add", "-A")
    sh(repo, *GIT, "commit", "-qm", "pipeline")
    return repo


def produce(repo: Path, seed: int) -> str:
    """Run the stage with ``seed`` (dvc repro) and return the champion's tree sha256."""
    (repo / "params.yaml").write_text(f"seed: {seed}\n")
    sh(repo, DVC, "repro", "-q")
    return tree_sha256(repo / "data" / "models" / "champion")


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def in_remote(remote: Path, digest: str) -> bool:
    return (remote / "files" / "md5" / digest[:2] / digest[2:]).is_file()


def test_restore_by_git_commit_brings_back_the_first_champion_bit_identically(tiny_repo: Path):
    repo, remote = tiny_repo, tiny_repo.parent / "remote"
    first = produce(repo, 1)
    assert commit_outputs(repo) == ""  # dvc status clean
    target = configured_remote(repo)
    assert target is not None and Path(target.url) == remote.resolve() and not remote.exists()
    assert "pushed" in push_outputs(target, repo) and remote.is_dir()  # the first push creates the remote
    sh(repo, *GIT, "add", "dvc.lock", "params.yaml")
    sh(repo, *GIT, "commit", "-qm", "run 1")
    commit_one = sh(repo, "git", "rev-parse", "HEAD").strip()

    # The training run's scratch is no part of the output: neither hashed, cached nor pushed.
    student = repo / "data" / "models" / "student"
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    out = next(o for o in lock["stages"]["train"]["outs"] if o["path"] == "data/models/student")
    assert out["nfiles"] == 2  # best/model.safetensors, metrics.json
    assert in_remote(remote, md5(student / "best" / "model.safetensors"))
    assert not in_remote(remote, md5(student / "last" / "optimizer.safetensors"))
    assert not in_remote(remote, md5(student / "snapshots" / "step-1" / "model.safetensors"))
    # Bytecode written into a code folder a stage depends on leaves `dvc status` clean (.dvcignore).
    (repo / "code" / "pkg" / "__pycache__").mkdir()
    (repo / "code" / "pkg" / "__pycache__" / "stage.cpython-311.pyc").write_bytes(b"\0bytecode")
    assert sh(repo, DVC, "status", "--json").strip() == "{}"

    second = produce(repo, 2)
    assert second != first
    commit_outputs(repo)
    push_outputs(target, repo)
    sh(repo, *GIT, "commit", "-qam", "run 2")
    shutil.rmtree(repo / ".dvc" / "cache")  # only the remote holds the runs now

    umask = os.umask(0o077)  # DVC's checkout copies honour the umask; restored artifacts are shared anyway
    try:
        result = restore_run(commit_one[:10], repo=repo / "code")  # from a subfolder: the DVC root is found
    finally:
        os.umask(umask)
    assert result.pulled and result.source == f"git commit {commit_one[:12]}"
    assert result.champion_sha256 == first == tree_sha256(repo / "data" / "models" / "champion")
    assert yaml.safe_load((repo / "params.yaml").read_text()) == {"seed": 1}
    weights = repo / "data" / "models" / "champion" / "model.safetensors"
    assert stat.S_IMODE(weights.stat().st_mode) == 0o644
    assert stat.S_IMODE(weights.parent.stat().st_mode) == 0o755
    assert sh(repo, DVC, "status", "--json").strip() == "{}"
    assert "git checkout -- dvc.lock params.yaml && dvc checkout" in result.summary()

    assert restore_run("HEAD", repo=repo).champion_sha256 == second  # and forward again


def test_restore_refuses_uncommitted_outputs_and_unknown_refs(tiny_repo: Path):
    repo = tiny_repo
    produce(repo, 1)
    commit_outputs(repo)
    sh(repo, *GIT, "add", "dvc.lock", "params.yaml")
    sh(repo, *GIT, "commit", "-qm", "run 1")
    produce(repo, 2)  # dvc repro committed these outputs to the cache: a restore may replace them
    lock_two = (repo / "dvc.lock").read_text()
    (repo / "data" / "models" / "champion" / "model.safetensors").write_bytes(b"edited by hand")
    with pytest.raises(HistoryError, match="dvc commit"):
        restore_run("HEAD", repo=repo)
    assert (repo / "dvc.lock").read_text() == lock_two  # nothing touched
    with pytest.raises(HistoryError, match="neither a git commit"):
        restore_run("no-such-ref", repo=repo, tracking_uri=f"sqlite:///{repo.parent / 'mlflow.db'}")
    (repo / "dvc.lock").unlink()
    sh(repo, *GIT, "rm", "-q", "--cached", "dvc.lock")
    sh(repo, *GIT, "commit", "-qm", "no lock")
    with pytest.raises(HistoryError, match="has no dvc.lock"):
        restore_run("HEAD", repo=repo, force=True)


def _training_run(uri: str, dagster_run_id: str, stage: str = "train") -> str:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("mixsp") or client.get_experiment(client.create_experiment("mixsp"))
    run = client.create_run(experiment.experiment_id, tags={"dagster.run_id": dagster_run_id, "mixsp.stage": stage})
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def test_sync_logs_the_lock_to_the_training_run_and_restore_finds_it_by_run_id(tiny_repo: Path,
                                                                                  monkeypatch: pytest.MonkeyPatch):
    from mlflow import MlflowClient

    from pipelines.dvc_sync import sync_run

    repo, remote = tiny_repo, tiny_repo.parent / "remote"
    uri = f"sqlite:///{repo.parent / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    first_dagster, second_dagster = "0a1b2c3d-0000-4000-8000-000000000001", "0a1b2c3d-0000-4000-8000-000000000002"

    first = produce(repo, 1)
    train_one = _training_run(uri, first_dagster)
    evaluate_one = _training_run(uri, first_dagster, stage="evaluate")
    report = sync_run(first_dagster, uri, repo / "data", repo)
    assert report.ok, report.errors
    assert report.mlflow_runs == [train_one]  # the training run only
    assert report.pushed and "pushed" in report.pushed and remote.is_dir()
    assert report.uncommitted == ["dvc.lock"]  # params.yaml still as committed (seed 1)
    tags = client.get_run(train_one).data.tags
    champion_md5 = lock_outputs((repo / "dvc.lock").read_text())["train"]["data/models/champion"]
    assert tags["dvc.train.data/models/champion"] == champion_md5
    assert not any(k.startswith("dvc.") for k in client.get_run(evaluate_one).data.tags)
    assert {a.path for a in client.list_artifacts(train_one, "dvc")} == {"dvc/dvc.lock", "dvc/params.yaml"}

    second = produce(repo, 2)
    train_two = _training_run(uri, second_dagster)
    monkeypatch.setenv("MIXSP_DVC_REMOTE", "none")
    report = sync_run(second_dagster, uri, repo / "data", repo)
    assert report.ok and report.pushed is None and report.mlflow_runs == [train_two]
    monkeypatch.setenv("MIXSP_DVC_REMOTE", "nowhere")
    report = sync_run(second_dagster, uri, repo / "data", repo)
    assert not report.ok and "nowhere" in report.errors[0]
    monkeypatch.delenv("MIXSP_DVC_REMOTE")
    assert sync_run(second_dagster, uri, repo / "data", repo).ok  # pushed now

    shutil.rmtree(repo / ".dvc" / "cache")
    restored = restore_run(train_one, repo=repo, tracking_uri=uri)  # an MLflow run id: no git commit needed
    assert restored.champion_sha256 == first and restored.pulled
    assert yaml.safe_load((repo / "params.yaml").read_text()) == {"seed": 1}
    assert restore_run(second_dagster, repo=repo, tracking_uri=uri).champion_sha256 == second  # a Dagster run id
    assert restore_run(evaluate_one, repo=repo, tracking_uri=uri).champion_sha256 == first  # a sibling run

    skipped = sync_run(first_dagster, uri, repo.parent / "elsewhere", repo)
    assert skipped.skipped and skipped.ok and "DVC: skipped" in skipped.lines()[0]


def test_the_repository_dvcignore_keeps_bytecode_and_training_scratch_out():
    """Importing the code writes __pycache__ into folders that DVC stages depend on: DVC must not see it;
    the student's scratch (optimizer state, snapshots) is not part of its output, best/ is."""
    from dvc.repo import Repo

    with Repo(str(REPO)) as repo:
        ignored = repo.dvcignore.is_ignored_file
        assert ignored(str(REPO / "mixsp_core" / "models" / "__pycache__" / "encoder.cpython-311.pyc"))
        assert ignored(str(REPO / "mixsp_core" / "compress" / "__pycache__" / "pca.cpython-312.pyc"))
        assert not ignored(str(REPO / "mixsp_core" / "models" / "encoder.py"))
        for scratch in ("last/optimizer.safetensors", "start/model.safetensors", "snapshots/step-9/model.safetensors"):
            assert ignored(str(REPO / "data" / "models" / "student" / scratch)), scratch
        for kept in ("best/model.safetensors", "metrics.json", "history.json", "plots/loss.png"):
            assert not ignored(str(REPO / "data" / "models" / "student" / kept)), kept


def test_package_does_not_pin_torch_exactly():
    """Users who install the package keep their own torch; requirements.txt pins what the Makefile installs."""
    import tomllib

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    torch = [d for d in deps if d.replace(" ", "").lower().startswith("torch")]
    assert torch and not any("==" in d for d in torch), torch
