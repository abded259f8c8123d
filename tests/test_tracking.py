"""The MLflow tracker writes params, step metrics and artifacts to a SQLite store; a run can be continued."""

from __future__ import annotations

import pytest

from mixsp_core.tracking.tracker import MLflowTracker, tracking_uri


@pytest.mark.slow
def test_mlflow_tracker_round_trip(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # artifacts land under the working directory
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert tracking_uri() == uri
    tracker = MLflowTracker(experiment="test", run_name="r1")
    tracker.log_params({"train.lr": 5e-5, "data.train_tasks": ["STSBenchmark"], "long": "x" * 7000})
    tracker.log_metrics({"train/loss": 1.5}, step=1)
    tracker.log_metrics({"train/loss": 1.0, "dev/primary": 80.0}, step=2)
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "a.png").write_bytes(b"png")
    tracker.log_artifact(tmp_path / "plots", "plots")
    tracker.finish()

    again = MLflowTracker(run_id=tracker.run_id)  # a resumed training continues the same run
    again.log_params({"train.lr": 5e-5})  # already logged: skipped, not an error
    again.log_metrics({"train/loss": 0.5}, step=3)
    again.finish()

    client = tracker.client
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.data.params["train.lr"] == "5e-05"
    assert len(run.data.params["long"]) == 6000
    history = client.get_metric_history(tracker.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(1, 1.5), (2, 1.0), (3, 0.5)]
    assert [a.path for a in client.list_artifacts(tracker.run_id, "plots")] == ["plots/a.png"]


def test_one_dev_metric_vocabulary():
    from mixsp_core.tracking.metrics import dev_metrics, variant_dev_metrics, variant_prefix

    trainer = {"STSBenchmark-dev": 80.0, "SICK-trial": 70.0, "primary": 75.0}
    assert dev_metrics(trainer) == {"dev/STSBenchmark": 80.0, "dev/SICK": 70.0, "dev/mean": 75.0}
    variant = {"dev": 75.0, "tasks": {"STSBenchmark-dev": {"spearman": 80.0}, "SICK-trial": {"spearman": 70.0},
                                      "STS12": {"spearman": 1.0}}}
    assert variant_dev_metrics(variant, ["STSBenchmark-dev", "SICK-trial"]) == dev_metrics(trainer)
    assert variant_dev_metrics(variant, ["STSBenchmark-dev"], variant_prefix("compressed/pca8")) == {
        "variant/compressed.pca8/dev/STSBenchmark": 80.0, "variant/compressed.pca8/dev/mean": 75.0}


def test_a_resumed_training_continues_its_run_and_parent(tmp_path):
    import json

    from mixsp_core.tracking.tracker import RunTarget, tracker_for_run
    from mixsp_core.training.config import config_from_dict

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = config_from_dict({"name": "r", "train": {"resume": True}})
    first = tracker_for_run(config, tmp_path / "run", target=RunTarget(uri=uri, pipeline_run="p1"))
    first.finish("KILLED")
    state = tmp_path / "run" / "last" / "trainer_state.json"
    state.parent.mkdir(parents=True)
    state.write_text(json.dumps({"tracking_run_id": first.run_id}))

    again = tracker_for_run(config, tmp_path / "run", target=RunTarget(uri=uri, pipeline_run="p2"))
    assert (again.run_id, again.parent_run_id) == (first.run_id, first.parent_run_id)
    assert again.client.get_run(first.parent_run_id).info.status == "RUNNING"
    again.finish()
    assert again.client.get_run(first.parent_run_id).info.status == "FINISHED"
    parents = again.client.search_runs([again.experiment_id], filter_string="tags.`mixsp.stage` = 'pipeline'")
    assert len(parents) == 1  # resuming opened no parent for p2


def test_resuming_after_the_store_moved_records_a_new_run_naming_the_old(tmp_path, caplog):
    import json

    from mixsp_core.tracking.tracker import RunTarget, tracker_for_run
    from mixsp_core.training.config import config_from_dict

    config = config_from_dict({"name": "r", "train": {"resume": True}})
    first = tracker_for_run(config, tmp_path / "run", target=RunTarget(uri=f"sqlite:///{tmp_path / 'a.db'}"))
    first.finish("KILLED")
    state = tmp_path / "run" / "last" / "trainer_state.json"
    state.parent.mkdir(parents=True)
    state.write_text(json.dumps({"tracking_run_id": first.run_id}))

    moved = f"sqlite:///{tmp_path / 'b.db'}"  # a new, empty store: the recorded run is not there
    with caplog.at_level("WARNING"):
        again = tracker_for_run(config, tmp_path / "run", target=RunTarget(uri=moved))
    assert again.run_id != first.run_id and again.uri == moved
    assert again.client.get_run(again.run_id).data.tags["mixsp.resumed_from_run"] == first.run_id
    assert first.run_id in caplog.text and "not in the tracking store" in caplog.text
    again.finish()
