"""The sharded teacher stage on dagster-celery with a real broker: a private redis-server on 127.0.0.1 and two
`dagster-celery worker` processes (concurrency 1 each) sharing one DAGSTER_HOME, the job chosen onto Celery the
way `make run` would be (``MIXSP_EXECUTOR=celery`` over make run's own multiprocess run config). Skipped, with
the reason, only where redis-server is missing or does not start. Plus the executor choice without a broker."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import numpy as np
import pytest

from mixsp_core.teacher.cache import TeacherCache
from tests.pipeline_helpers import teacher_shard_names, tiny_run_config
from tests.test_distributed import _free_port
from tests.test_teacher_shards_pipeline import DATA, materialize, meta, source  # noqa: F401 (source: a fixture)

REPO = Path(__file__).resolve().parents[1]
WORKERS = ("mixsp-w1", "mixsp-w2")
STARTUP_SECONDS = 90  # two workers importing Dagster and Celery on a busy 2-core machine


def _stop(process: subprocess.Popen) -> None:
    """End ``process`` and what it started (its own session: the worker CLI, celery and its pool child)."""
    for sig, seconds in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:  # the whole group has exited already
            return
        try:
            process.wait(timeout=seconds)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(path: Path, lines: int = 25) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.is_file() else ""


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    """A private, non-persistent redis-server on a free localhost port; skips where it cannot run."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not on PATH (Debian: apt-get install redis-server): no Celery broker")
    import redis

    port = _free_port()
    log = tmp_path / "redis.log"
    with open(log, "w") as out:
        server = subprocess.Popen([binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly",
                                   "no", "--dir", str(tmp_path), "--daemonize", "no"],
                                  stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        client = redis.Redis(host="127.0.0.1", port=port)
        deadline = time.monotonic() + 15
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.skip(f"redis-server did not start on 127.0.0.1:{port}: {_tail(log, 5)}")
                time.sleep(0.1)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        _stop(server)


@pytest.fixture
def dagster_home(tmp_path: Path, monkeypatch) -> Path:
    """A DAGSTER_HOME (dagster.yaml as `make run` writes it; SQLite storage under it) that the run and the
    workers share, as machines share one instance through Postgres."""
    from pipelines.run import ensure_dagster_home

    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    home = ensure_dagster_home()
    with dg.DagsterInstance.get():  # its SQLite schemas created now, not by the two workers at once (a race)
        pass
    return home


@pytest.fixture
def workers(redis_url: str, dagster_home: Path, tmp_path: Path) -> Iterator[dict[str, Path]]:
    """Two `dagster-celery worker start` processes (concurrency 1) on ``redis_url``; their logs by name."""
    config = tmp_path / "celery.yaml"
    # acks_late: a worker busy with a step holds no second one, so steps submitted together spread over workers.
    config.write_text(f"execution:\n  config:\n    broker: {redis_url}\n    backend: {redis_url}\n"
                      "    config_source:\n      task_acks_late: true\n")
    env = {**os.environ, "DAGSTER_HOME": str(dagster_home),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    logs = {name: tmp_path / f"{name}.log" for name in WORKERS}
    started = []
    try:
        for name, log in logs.items():
            with open(log, "w") as out:
                started.append(subprocess.Popen(
                    [str(Path(sys.executable).parent / "dagster-celery"), "worker", "start", "-A", "dagster_celery.app",
                     "-y", str(config), "-n", name, "--", "--concurrency=1", "--without-gossip", "--without-mingle"],
                    cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
        _wait_until_answering(redis_url, started, logs)
        yield logs
    finally:
        for process in started:
            _stop(process)


def _wait_until_answering(broker: str, processes: list[subprocess.Popen], logs: dict[str, Path]) -> None:
    """Until every worker answers a ping over the broker (so both consume before the run submits steps)."""
    from celery import Celery

    app = Celery(broker=broker, backend=broker)
    deadline = time.monotonic() + STARTUP_SECONDS
    answered: set[str] = set()
    while time.monotonic() < deadline:
        answered = {host.split("@")[0] for reply in app.control.ping(timeout=1.0) for host in reply}
        if answered >= set(WORKERS):
            return
        if any(process.poll() is not None for process in processes):
            break
    report = "\n".join(f"--- {name}\n{_tail(log)}" for name, log in logs.items())
    pytest.fail(f"Celery workers {sorted(set(WORKERS) - answered)} did not answer in {STARTUP_SECONDS} s:\n{report}")


def _celery_workers_by_step(instance: dg.DagsterInstance, run_id: str) -> dict[str, str]:
    """Step key -> the Celery worker (node name) that executed it, from the workers' engine events."""
    found = {}
    for record in instance.all_logs(run_id, of_type=dg.DagsterEventType.ENGINE_EVENT):
        metadata = record.dagster_event.engine_event_data.metadata
        if "Celery worker" in metadata:
            found[record.step_key] = metadata["Celery worker"].value.split("@")[0]
    return found


# dagster-celery registers its task anew for every step it submits; Celery warns each time (harmless).
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::celery.exceptions.DuplicateTaskNameWarning")
def test_sharded_teacher_runs_on_two_celery_workers(tmp_path, source, tiny_teacher_dir, redis_url, dagster_home,
                                                    workers, monkeypatch):
    from pipelines.run import run_config

    shards = teacher_shard_names()
    selection = [*DATA, *shards, "teacher_embeddings"]
    job = dg.build_reconstructable_job(
        "tests.pipeline_helpers", "teacher_job_on_pipeline_executor",
        reconstructor_working_directory=str(REPO),  # the workers import the job from tests/ (not in the package)
        reconstructable_kwargs={"data_root": str(tmp_path / "data"), "tracking_uri": f"sqlite:///{tmp_path / 'm.db'}"})
    # make run's own execution config (multiprocess on this machine), switched to Celery by the environment only
    monkeypatch.setenv("MIXSP_EXECUTOR", "celery")
    monkeypatch.setenv("MIXSP_CELERY_BROKER", redis_url)
    monkeypatch.delenv("MIXSP_CELERY_BACKEND", raising=False)
    config = {**tiny_run_config(source, tiny_teacher_dir, tiny_teacher_dir, selection),
              "execution": run_config()["execution"]}
    started = time.perf_counter()
    with dg.DagsterInstance.get() as instance:
        result = dg.execute_job(job, instance, run_config=config)
        seconds = time.perf_counter() - started
        logs = "\n".join(f"--- {name}\n{_tail(log)}" for name, log in workers.items())
        assert result.success, ([e.message for e in result.all_events if e.is_step_failure], logs)
        by_step = _celery_workers_by_step(instance, result.run_id)
    print(f"celery run: {len(by_step)} steps in {seconds:.1f} s, by worker {by_step}")

    steps = {event.step_key for event in result.all_events if event.is_step_success}
    assert steps and set(by_step) == steps  # every step ran as a Celery task, none in this process
    # the two shards, submitted together, ran side by side, one per worker (each holds one step at a time)
    assert {by_step[name] for name in shards} == set(WORKERS), by_step
    events = [e.materialization for e in result.get_asset_materialization_events()]
    pids = {meta(events, name)["pid"] for name in shards}
    assert os.getpid() not in pids
    record = meta(events, "teacher_embeddings")
    corpus = (tmp_path / "data" / "corpus" / "corpus.txt").read_text(encoding="utf-8").splitlines()
    assert (record["encoded"], record["encoded_in_this_step"], record["shards"]) == (len(corpus), 0, 2)

    # the same selection in one process (in-process executor) leaves the same teacher cache
    assert materialize(tmp_path / "inproc", source, tiny_teacher_dir, selection).success
    celery_cache = TeacherCache(tmp_path / "data" / "teacher", str(tiny_teacher_dir))
    inproc_cache = TeacherCache(tmp_path / "inproc" / "data" / "teacher", str(tiny_teacher_dir))
    np.testing.assert_allclose(celery_cache.lookup(corpus), inproc_cache.lookup(corpus), atol=1e-5)


def test_the_run_config_or_the_environment_chooses_the_executor(monkeypatch):
    from dagster_celery import celery_executor

    from pipelines.defs.executors import _resolved
    from pipelines.run import run_config

    for name in ("MIXSP_EXECUTOR", "MIXSP_CELERY_BROKER", "MIXSP_CELERY_BACKEND"):
        monkeypatch.delenv(name, raising=False)
    retries = {"enabled": {}}
    make_run = {"multiprocess": {**run_config()["execution"]["config"]["multiprocess"], "retries": retries}}
    # by default make run's choice stands, unchanged
    assert _resolved(make_run) == (dg.multi_or_in_process_executor, make_run)
    # a celery block in run config (the launchpad) with its own broker; the backend defaults to the broker
    definition, settings = _resolved({"celery": {"broker": "redis://queue:6379/0", "retries": retries}})
    assert definition is celery_executor
    assert (settings["broker"], settings["backend"]) == ("redis://queue:6379/0", "redis://queue:6379/0")
    # the environment sends make run's steps to Celery, broker and backend from the environment
    monkeypatch.setenv("MIXSP_EXECUTOR", "celery")
    with pytest.raises(dg.DagsterInvalidConfigError, match="MIXSP_CELERY_BROKER"):
        _resolved(make_run)
    monkeypatch.setenv("MIXSP_CELERY_BROKER", "redis://queue:6379/0")
    monkeypatch.setenv("MIXSP_CELERY_BACKEND", "redis://results:6379/1")
    definition, settings = _resolved(make_run)
    assert definition is celery_executor
    assert (settings["broker"], settings["backend"], settings["retries"]) == (
        "redis://queue:6379/0", "redis://results:6379/1", retries)
    monkeypatch.setenv("MIXSP_EXECUTOR", "k8s")
    with pytest.raises(dg.DagsterInvariantViolationError, match="MIXSP_EXECUTOR='k8s'"):
        _resolved(make_run)
