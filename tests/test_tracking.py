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
