"""Runs not launched by `make run` get the same DVC sync: the ``dvc_sync_after_run`` sensor asks for a
``dvc_sync`` run for each successful untagged run, and that job calls pipelines.dvc_sync.sync_run. Also
the Dagster home that make run / make ui prepare, and the metadata tables' rounding."""

from __future__ import annotations

import dagster as dg
import numpy as np
import pytest

from pipelines.defs import dvc_sync_sensor
from pipelines.defs.dvc_sync_sensor import dvc_sync_after_run, dvc_sync_job
from pipelines.defs.resources import MlflowResource, PathsResource
from pipelines.dvc_sync import SYNC_TAG, SyncReport


@dg.op
def _noop() -> None:
    return None


@dg.job
def _finished() -> None:
    _noop()


def _sensor_answer(instance: dg.DagsterInstance, tags: dict[str, str]):
    result = _finished.execute_in_process(instance=instance, tags=tags)
    context = dg.build_run_status_sensor_context(sensor_name="dvc_sync_after_run", dagster_instance=instance,
                                                 dagster_run=result.dagster_run,
                                                 dagster_event=result.get_run_success_event())
    return result.run_id, dvc_sync_after_run(context)


def test_sensor_requests_a_sync_for_runs_their_launcher_does_not_sync():
    with dg.DagsterInstance.ephemeral() as instance:
        run_id, answer = _sensor_answer(instance, {})
        assert isinstance(answer, dg.RunRequest)
        assert answer.run_config == {"ops": {"sync_dvc_outputs": {"config": {"dagster_run_id": run_id}}}}
        assert answer.run_key == f"dvc-sync-{run_id}"  # one sync per run, however often the sensor ticks
        for launcher in ("inline", "off"):  # make run syncs its own; --no-dvc wants none
            _, answer = _sensor_answer(instance, {SYNC_TAG: launcher})
            assert isinstance(answer, dg.SkipReason) and launcher in answer.skip_message


def test_sensor_watches_mixsp_full_and_starts_dvc_sync():
    from pipelines.definitions import defs

    dg.Definitions.validate_loadable(defs())  # as the webserver loads it: op, job and sensor names unique
    sensor = defs().resolve_sensor_def("dvc_sync_after_run")
    assert sensor.job_name == "dvc_sync"
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING


def _execute_sync(tmp_path, **kwargs) -> dg.ExecuteInProcessResult:
    return dvc_sync_job.execute_in_process(
        run_config={"ops": {"sync_dvc_outputs": {"config": {"dagster_run_id": "some-run"}}}},
        resources={"paths": PathsResource(data_root=str(tmp_path / "data")),
                   "mlflow": MlflowResource(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")},
        **kwargs)


def test_dvc_sync_job_calls_sync_run_and_fails_when_it_reports_errors(tmp_path, monkeypatch: pytest.MonkeyPatch):
    calls = []

    def fake_sync(run_id, uri, root):
        calls.append((run_id, uri, root))
        return SyncReport(committed=True, status="", pushed="3 files pushed", remote="local (/r)",
                          mlflow_runs=["abc"])

    monkeypatch.setattr(dvc_sync_sensor, "sync_run", fake_sync)
    done = _execute_sync(tmp_path)
    assert done.success and calls == [("some-run", f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "data")]
    [output] = [e for e in done.all_node_events if e.is_successful_output]
    meta = output.step_output_data.metadata
    assert meta["pushed"].value == "3 files pushed" and meta["mlflow_runs"].value == "abc"

    monkeypatch.setattr(dvc_sync_sensor, "sync_run", lambda *a: SyncReport(errors=["`dvc push` failed: no space"]))
    failed = _execute_sync(tmp_path, raise_on_error=False)
    assert not failed.success
    failure = failed.get_step_failure_events()[0].step_failure_data
    assert "no space" in failure.user_failure_data.description


def test_dvc_sync_job_skips_a_data_root_dvc_does_not_track(tmp_path):
    """The real sync_run: artifacts outside the repository's data/ are left alone (nothing to commit)."""
    assert _execute_sync(tmp_path).success


def test_dagster_home_turns_telemetry_off_and_shows_progress_logs(tmp_path, monkeypatch: pytest.MonkeyPatch):
    import yaml

    from pipelines.run import ensure_dagster_home

    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")  # as an older make run left it
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    assert ensure_dagster_home() == home.resolve()
    config = yaml.safe_load((home / "dagster.yaml").read_text())
    assert config["telemetry"] == {"enabled": False}
    assert config["python_logs"]["managed_python_loggers"] == ["mixsp_core.progress"]
    ensure_dagster_home()  # idempotent
    assert (home / "dagster.yaml").read_text().count("python_logs:") == 1
    with dg.DagsterInstance.from_config(str(home)) as instance:  # Dagster accepts the file
        assert instance.get_settings("telemetry")["enabled"] is False


def test_markdown_tables_show_metrics_to_two_decimals():
    from pipelines.metadata import markdown_table, metric_value

    table = markdown_table(["dev set", "Spearman x100", "pairs"],
                           [["STSBenchmark", np.float32(87.33333), 1500], ["SICK", float("nan"), 500]])
    assert "| STSBenchmark | 87.33 | 1500 |" in table and "| SICK | n/a | 500 |" in table
    assert metric_value(np.float64(86.74999)) == 86.75
