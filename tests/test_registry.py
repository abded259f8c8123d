"""Champion promotion against a real MLflow registry (SQLite): the alias moves only on a strictly better
dev metric, a worse or equal model is tagged challenger, and data/models/champion/ follows the alias."""

from __future__ import annotations

from pathlib import Path

import pytest

from mixsp_core.tracking.registry import current_champion, register_and_promote
from pipelines.metadata import file_md5

MODEL = "mixsp-student"


@pytest.fixture
def client(tmp_path: Path):
    from mlflow import MlflowClient

    from mixsp_core.tracking.tracker import default_artifact_location, ensure_experiment

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow = MlflowClient(tracking_uri=uri, registry_uri=uri)
    mlflow.experiment_id = ensure_experiment(mlflow, "mixsp", default_artifact_location(uri))
    return mlflow


def model_dir(tmp_path: Path, source: Path, name: str) -> Path:
    """A real model folder (the tiny BERT) with a marker, so copies can be told apart."""
    import shutil

    target = tmp_path / "models" / name
    shutil.copytree(source, target)
    (target / "marker.txt").write_text(name)
    return target


def promote(client, tmp_path: Path, folder: Path, dev: float):
    """Register ``folder`` as the model of its own training run."""
    run = client.create_run(client.experiment_id, run_name=f"train {folder.name}")
    return register_and_promote(client, MODEL, run.info.run_id, folder, dev, tmp_path / "champion",
                                model_name=folder.name)


def test_alias_moves_only_on_a_better_dev_metric(client, tmp_path, tiny_bert_dir):
    assert current_champion(client, MODEL) is None
    first = promote(client, tmp_path, model_dir(tmp_path, tiny_bert_dir, "a"), 50.0)
    assert (first.version, first.promoted, first.previous_version) == ("1", True, None)
    assert current_champion(client, MODEL) == ("1", 50.0)
    champion = tmp_path / "champion"
    assert (champion / "marker.txt").read_text() == "a"
    weights = file_md5(champion / "model.safetensors")

    worse = promote(client, tmp_path, model_dir(tmp_path, tiny_bert_dir, "b"), 40.0)
    equal = promote(client, tmp_path, model_dir(tmp_path, tiny_bert_dir, "c"), 50.0)
    for result, version in ((worse, "2"), (equal, "3")):
        assert (result.version, result.promoted, result.champion_version) == (version, False, "1")
        assert client.get_model_version(MODEL, version).tags["role"] == "challenger"
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == "1"
    assert (champion / "marker.txt").read_text() == "a" and file_md5(champion / "model.safetensors") == weights

    better = promote(client, tmp_path, model_dir(tmp_path, tiny_bert_dir, "d"), 50.5)
    assert (better.version, better.promoted, better.previous_version, better.previous_dev) == ("4", True, "1", 50.0)
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == "4"
    assert client.get_model_version(MODEL, "1").tags["role"] == "former-champion"
    assert (champion / "marker.txt").read_text() == "d"
    assert '"champion_version": "4"' in (champion / "champion.json").read_text()
    # The registered artifact is an MLflow model (MLmodel, pyfunc) holding the model directory, logged by
    # the run the version names as its source run.
    version = client.get_model_version(MODEL, "4")
    source = Path(version.source.removeprefix("file://"))
    assert (source / "MLmodel").is_file() and "python_function" in (source / "MLmodel").read_text()
    assert {p.name for p in (source / "artifacts" / "model").iterdir()} >= {"marker.txt", "config.json"}
    assert version.run_id == better.run_id and version.tags["mixsp.training_run"] == better.run_id
    assert float(version.tags["dev/mean"]) == 50.5


def test_a_legacy_dev_tag_still_counts(client, tmp_path, tiny_bert_dir):
    """Versions registered before the one vocabulary carry dev_primary: the next promotion compares to it."""
    first = promote(client, tmp_path, model_dir(tmp_path, tiny_bert_dir, "a"), 50.0)
    client.delete_model_version_tag(MODEL, first.version, "dev/mean")
    client.set_model_version_tag(MODEL, first.version, "dev_primary", "50.0")
    assert current_champion(client, MODEL) == ("1", 50.0)
    assert not promote(client, tmp_path, model_dir(tmp_path, tiny_bert_dir, "b"), 49.0).promoted
