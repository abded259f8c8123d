"""The registry's MLflow model: a pyfunc over load_embedder, logged once in the training run that made its
weights; loadable with mlflow.pyfunc and served by `mlflow models serve` (slow). Also: runs nest under one
parent per pipeline run, every scoring run logs dev/STSBenchmark, dev/SICK, dev/mean, and the promote stage
registers the model under the training run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from mixsp_core.models.checkpoint import load_embedder, save_checkpoint
from mixsp_core.models.student import BiStudent
from mixsp_core.training.config import ModelConfig
from tests.train_helpers import one_thread

_one_thread = pytest.fixture(scope="module", autouse=True)(one_thread)

MODEL = "mixsp-student"
SENTENCES = ["A man is playing a guitar.", "A woman slices an onion.", "Two dogs run in the snow.", "Hi."]


@pytest.fixture(scope="module")
def checkpoint(tiny_bert_dir, tmp_path_factory) -> Path:
    """A saved tiny bi student (16-d), as the training stage writes best/."""
    torch.manual_seed(0)
    config = ModelConfig(kind="bi", encoder=str(tiny_bert_dir), projector_mult=2, output_dim=16, max_length=32)
    return save_checkpoint(BiStudent.from_config(config).eval(), tmp_path_factory.mktemp("student") / "best")


@pytest.fixture
def store(tmp_path, monkeypatch) -> str:
    """A fresh SQLite store, also the global MLflow URI (what `models:/` URIs and `mlflow models serve`
    resolve against); restored afterwards."""
    import mlflow.tracking._model_registry.utils as registry_utils
    import mlflow.tracking._tracking_service.utils as tracking_utils

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setattr(tracking_utils, "_tracking_uri", None)
    monkeypatch.setattr(registry_utils, "_registry_uri", None)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    return uri


def client_of(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def training_run(client, name: str = "train") -> str:
    from mixsp_core.tracking.tracker import default_artifact_location, ensure_experiment

    experiment = ensure_experiment(client, "mixsp", default_artifact_location(client.tracking_uri))
    return client.create_run(experiment, run_name=name, tags={"mixsp.stage": "train"}).info.run_id


def test_registered_champion_loads_with_pyfunc_and_matches_load_embedder(store, checkpoint, tmp_path):
    import mlflow

    from mixsp_core.tracking.registry import register_and_promote

    client = client_of(store)
    run_id = training_run(client)
    promotion = register_and_promote(client, MODEL, run_id, checkpoint, 61.5, tmp_path / "champion",
                                     model_name="student")
    assert promotion.promoted and promotion.run_id == run_id

    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    got = model.predict(SENTENCES)
    expected = load_embedder(checkpoint).encode(SENTENCES, show_progress=False)
    assert got.dtype == np.float32 and got.shape == (len(SENTENCES), 16)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    # a one-column frame (what a string-column signature gives) and a single sentence work too
    np.testing.assert_allclose(model.predict(pd.DataFrame({"text": SENTENCES})), expected, atol=1e-6)

    signature = model.metadata.signature
    assert signature.inputs.to_dict() == [{"type": "string", "required": True}]
    [output] = signature.outputs.inputs
    assert output.type == np.dtype(np.float32) and output.shape == (-1, 16)
    assert model.metadata.flavors["python_function"]["loader_module"] == "mlflow.pyfunc.loaders.code_model"

    version = client.get_model_version_by_alias(MODEL, "champion")
    assert version.run_id == run_id  # the training run, not a promote run
    assert float(version.tags["dev/mean"]) == 61.5
    [logged] = client.search_logged_models([client.get_run(run_id).info.experiment_id])
    assert logged.source_run_id == run_id and version.source == logged.artifact_location
    assert version.tags["mixsp.model_id"] == logged.model_id


def test_weights_are_stored_once_per_training_run(store, checkpoint, tmp_path):
    from mixsp_core.tracking.registry import register_and_promote

    client = client_of(store)
    run_id = training_run(client)
    first = register_and_promote(client, MODEL, run_id, checkpoint, 60.0, tmp_path / "champion")
    again = register_and_promote(client, MODEL, run_id, checkpoint, 60.0, tmp_path / "champion")
    assert (first.version, again.version, again.promoted) == ("1", "2", False)
    v1, v2 = (client.get_model_version(MODEL, v) for v in ("1", "2"))
    assert v1.tags["mixsp.model_id"] == v2.tags["mixsp.model_id"] and v1.source == v2.source
    artifacts = Path(store.removeprefix("sqlite:///")).parent / "mlartifacts"
    stored = list(artifacts.rglob("*.safetensors"))
    assert len(stored) == len(list(checkpoint.rglob("*.safetensors")))  # each weights file once, not twice
    assert not list(artifacts.rglob("trainer_state.json"))


def test_predict_refuses_what_is_not_sentences():
    from mixsp_core.tracking.mlflow_model import sentences_from

    assert sentences_from("one") == ["one"]
    assert sentences_from(np.array(["a", "b"])) == ["a", "b"]
    with pytest.raises(ValueError, match="list of sentences"):
        sentences_from([1, 2])
    with pytest.raises(ValueError, match="one column"):
        sentences_from(pd.DataFrame({"a": ["x"], "b": ["y"]}))


def test_stage_runs_nest_under_one_parent_per_pipeline_run(store, tmp_path):
    from mixsp_core.tracking.tracker import (
        PARENT_RUN_TAG,
        PIPELINE_RUN_TAG,
        RunTarget,
        read_training_run,
        write_training_run,
    )

    client = client_of(store)
    first = RunTarget(uri=store, tags={"dagster.run_id": "run-a"}, pipeline_run="run-a")
    train = first.tracker("mixsp", "train", {"mixsp.stage": "train"})
    parent = train.parent_run_id
    assert client.get_run(parent).info.status == "RUNNING"
    train.finish()
    assert client.get_run(parent).info.status == "FINISHED"
    # another process of the same Dagster run (a step of the multiprocess executor) finds the same parent
    evaluate = RunTarget(uri=store, pipeline_run="run-a").tracker("mixsp", "evaluate", {"mixsp.stage": "evaluate"})
    assert evaluate.parent_run_id == parent
    evaluate.finish("FAILED")
    assert client.get_run(parent).info.status == "FAILED"
    other = RunTarget(uri=store, pipeline_run="run-b").tracker("mixsp", "train")
    assert other.parent_run_id != parent

    parent_run = client.get_run(parent)
    assert parent_run.data.tags["mixsp.stage"] == "pipeline" and parent_run.data.tags["dagster.run_id"] == "run-a"
    assert client.get_run(train.run_id).data.tags[PARENT_RUN_TAG] == parent

    # A CLI chain: `mixsp train` starts one, the later stages join it through the run directory's record.
    chain = RunTarget(uri=store)
    cli_train = chain.tracker("mixsp", "train")
    write_training_run(tmp_path / "student", cli_train)
    record = read_training_run(tmp_path / "student")
    assert record["run_id"] == cli_train.run_id and record["parent_run_id"] == cli_train.parent_run_id
    cli_promote = RunTarget(uri=store).tracker("mixsp", "promote", lineage=tmp_path / "student")
    assert cli_promote.parent_run_id == cli_train.parent_run_id
    assert client.get_run(cli_promote.run_id).data.tags[PIPELINE_RUN_TAG] == record["pipeline_run"]


def test_training_run_logs_the_dev_vocabulary(store, senteval_dir, tiny_bert_dir, tmp_path):
    from mixsp_core.tracking.tracker import PARENT_RUN_TAG, RunTarget, tracker_for_run
    from mixsp_core.training.loop import run_training
    from tests.train_helpers import small_pairs, tiny_config

    config = tiny_config(tiny_bert_dir, tracking={"enabled": True, "log_checkpoint": False})
    target = RunTarget(uri=store, pipeline_run="sweep-x")
    tracker = tracker_for_run(config, tmp_path / "run", tags={"mixsp.stage": "train"}, target=target)
    result = run_training(config, small_pairs(senteval_dir), out_dir=tmp_path / "run", tracker=tracker,
                          show_progress=False)

    client = client_of(store)
    run = client.get_run(result.run_id)
    metrics = run.data.metrics
    assert {"dev/STSBenchmark", "dev/SICK", "dev/mean"} <= set(metrics)
    assert not [k for k in metrics if k.startswith("best/") or k in ("dev/primary", "best_dev", "dev_primary")]
    # the run's latest value (what the compare view shows) is its best checkpoint's; the curve is kept
    assert metrics["dev/mean"] == pytest.approx(result.best_metrics["primary"])
    curve = client.get_metric_history(result.run_id, "dev/mean")
    assert [m.step for m in curve][:-1] == [h["step"] for h in result.history]
    assert run.data.params["train.lr"] == "0.001" and run.data.params["seed"] == "7"
    assert run.data.tags[PARENT_RUN_TAG] == target.parent_run_id("mixsp", "sweep-x")
    assert {a.path for a in client.list_artifacts(result.run_id, "plots")} >= {"plots/dev-spearman.png"}


def test_promote_stage_registers_under_the_training_run(store, checkpoint, tmp_path):
    import shutil

    import yaml

    from mixsp_core.params import PARAMS_FILE, load_params
    from mixsp_core.stages.promote import run_promote
    from mixsp_core.tracking.tracker import PARENT_RUN_TAG, RunTarget, write_training_run

    params = load_params(PARAMS_FILE).with_data_root(tmp_path / "data")
    paths = params.paths
    shutil.copytree(checkpoint, paths.student.best)
    chain = RunTarget(uri=store)
    train = chain.tracker(params.promote.experiment, "train", {"mixsp.stage": "train"})
    train.finish()
    write_training_run(paths.student.root, train)
    variant = {"path": str(paths.student.best), "dev": 55.25, "dims": 16, "vector_type": "float32",
               "bytes_per_vector": 64, "tasks": {"STSBenchmark-dev": {"spearman": 60.5},
                                                 "SICK-trial": {"spearman": 50.0}}}
    report = {"best": "student", "best_path": variant["path"], "best_dev": 55.25, "variants": {"student": variant},
              "dev_sets": ["STSBenchmark-dev", "SICK-trial"], "dev": {"student": 55.25}, "grid": {},
              "grid_model": "student"}
    paths.evaluation.parent.mkdir(parents=True)
    paths.evaluation.write_text(json.dumps(report))

    promotion = run_promote(params, target=RunTarget(uri=store), floor=-100.0)

    client = client_of(store)
    version = client.get_model_version(params.promote.registered_model, promotion.version)
    assert version.run_id == train.run_id == promotion.run_id
    promote = client.get_run(promotion.promote_run_id)
    assert promote.data.tags[PARENT_RUN_TAG] == train.parent_run_id  # joined the training run's chain
    assert promote.data.metrics["dev/mean"] == 55.25 and promote.data.metrics["dev/STSBenchmark"] == 60.5
    assert client.get_run(train.parent_run_id).data.metrics["dev/mean"] == 55.25
    assert {a.path for a in client.list_artifacts(promotion.promote_run_id, "model_card")} == {"model_card/README.md"}
    card = (paths.champion / "README.md").read_text()
    header = yaml.safe_load(card.split("---\n")[1])
    assert header["library_name"] == "sentence-transformers"
    assert train.run_id in card and promotion.promote_run_id in card


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _post(url: str, payload: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def _wait_until_up(url: str, server: subprocess.Popen, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"mlflow models serve exited with {server.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"{url} did not answer within {seconds:.0f} s")


@pytest.mark.slow
def test_mlflow_models_serve_answers_invocations(store, checkpoint, tmp_path):
    import signal

    from mixsp_core.tracking.registry import register_and_promote

    client = client_of(store)
    register_and_promote(client, MODEL, training_run(client), checkpoint, 50.0, tmp_path / "champion")
    port = _free_port()
    bin_dir = str(Path(sys.executable).parent)  # uvicorn and mlflow of this venv
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    with open(tmp_path / "serve.log", "w+") as log:
        server = subprocess.Popen([str(Path(bin_dir) / "mlflow"), "models", "serve", "-m", f"models:/{MODEL}@champion",
                                   "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                                  env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _wait_until_up(f"http://127.0.0.1:{port}/ping", server, seconds=240)
            answer = _post(f"http://127.0.0.1:{port}/invocations", {"inputs": SENTENCES})
        except AssertionError:
            log.seek(0)
            raise AssertionError(log.read()[-3000:]) from None
        finally:
            if server.poll() is None:
                os.killpg(server.pid, signal.SIGTERM)  # the server and its uvicorn worker (its own session)
                try:
                    server.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(server.pid, signal.SIGKILL)
    vectors = np.asarray(answer["predictions"], dtype=np.float32)
    expected = load_embedder(checkpoint).encode(SENTENCES, show_progress=False)
    np.testing.assert_allclose(vectors, expected, atol=1e-5)
