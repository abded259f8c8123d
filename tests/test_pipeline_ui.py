"""The real servers: the Dagster webserver serves the graph (every asset, check, the job, schedule and
sensor over HTTP/GraphQL, as the UI shows them); the MLflow server reads back the runs and the registry."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest

from pipelines.servers import start_dagster, start_mlflow, stop, wait_until_up

pytestmark = pytest.mark.slow

QUERY = """
{
  assetNodes { assetKey { path } groupName
    assetChecksOrError { ... on AssetChecks { checks { name blocking } } } }
  workspaceOrError { ... on Workspace { locationEntries { locationOrLoadError {
    ... on RepositoryLocation { repositories { name
      jobs { name }
      schedules { name cronSchedule }
      sensors { name } } }
    ... on PythonError { message } } } } }
}
"""


def graphql(url: str, query: str) -> dict:
    request = urllib.request.Request(f"{url}/graphql", data=json.dumps({"query": query}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        payload = json.loads(response.read())
    assert "errors" not in payload, payload["errors"]
    return payload["data"]


def test_webserver_lists_assets_checks_schedule_and_sensor(tmp_path: Path):
    from pipelines.definitions import defs

    expected = defs().resolve_asset_graph()
    server = start_dagster(tmp_path / "dagster_home", port=3417, daemon=False, log_dir=tmp_path)
    try:
        wait_until_up(server, "/server_info", timeout=180)
        data = graphql(server.url, QUERY)
    finally:
        stop(server)

    nodes = {"/".join(n["assetKey"]["path"]): n for n in data["assetNodes"]}
    assert set(nodes) == {key.to_user_string() for key in expected.get_all_asset_keys()}
    assert nodes["sts_pairs"]["groupName"] == "prepare"
    checks = {(asset, c["name"]): c["blocking"] for asset, n in nodes.items()
              for c in n["assetChecksOrError"].get("checks", [])}
    assert checks[("sts_pairs", "pairs_valid")] is True
    assert checks[("sentence_corpus", "corpus_valid")] is True
    assert len(checks) == len(expected.asset_check_keys)
    # The model checks block too: a failed one stops promotion.
    for key in [("student", "student_weights_finite"), ("student", "student_embedding_shape"),
                ("student", "student_dev_floor"), ("evaluation_report", "best_dev_floor")]:
        assert checks[key] is True
    assert {nodes[a]["groupName"] for a in ("student", "compressed_variants", "merged_model", "evaluation_report",
                                            "champion")} == {"train", "compress", "merge", "evaluate", "promote"}

    [entry] = data["workspaceOrError"]["locationEntries"]
    [repository] = entry["locationOrLoadError"]["repositories"]
    assert {"mixsp_full", "dvc_sync"} <= {job["name"] for job in repository["jobs"]}
    assert {(s["name"], s["cronSchedule"]) for s in repository["schedules"]} == {("weekly_retrain", "0 3 * * 1")}
    assert {s["name"] for s in repository["sensors"]} == {"source_data_changed", "dvc_sync_after_run"}


def rest(url: str, path: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"{url}{path}", data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def test_mlflow_server_reads_back_runs_and_registry(tmp_path: Path, tiny_bert_dir: Path):
    from mlflow import MlflowClient

    from mixsp_core.tracking.registry import register_and_promote
    from mixsp_core.tracking.tracker import default_artifact_location, ensure_experiment

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = ensure_experiment(client, "mixsp", default_artifact_location(uri))
    run = client.create_run(experiment, run_name="evaluate", tags={"dagster.run_id": "abc", "mixsp.stage": "evaluate"})
    client.log_metric(run.info.run_id, "best_dev", 71.5)
    register_and_promote(client, "mixsp-student", run.info.run_id, tiny_bert_dir, 71.5, tmp_path / "champion")
    client.set_terminated(run.info.run_id)

    server = start_mlflow(uri, port=5417, log_dir=tmp_path)
    try:
        wait_until_up(server, "/health", timeout=180)
        runs = rest(server.url, "/api/2.0/mlflow/runs/search", {"experiment_ids": [experiment]})["runs"]
        alias = rest(server.url, "/api/2.0/mlflow/registered-models/alias?name=mixsp-student&alias=champion")
    finally:
        stop(server)
    [found] = runs
    assert {t["key"]: t["value"] for t in found["data"]["tags"]}["dagster.run_id"] == "abc"
    assert {m["key"]: m["value"] for m in found["data"]["metrics"]}["best_dev"] == 71.5
    assert alias["model_version"]["version"] == "1" and alias["model_version"]["run_id"] == run.info.run_id
