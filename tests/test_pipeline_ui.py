"""The real Dagster webserver serves the graph: every asset, check, the job, schedule and sensor are
visible over HTTP (GraphQL), as the UI shows them."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest

from pipelines.servers import start_dagster, stop, wait_until_up

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

    [entry] = data["workspaceOrError"]["locationEntries"]
    [repository] = entry["locationOrLoadError"]["repositories"]
    assert "mixsp_full" in {job["name"] for job in repository["jobs"]}
    assert {(s["name"], s["cronSchedule"]) for s in repository["schedules"]} == {("weekly_retrain", "0 3 * * 1")}
    assert {s["name"] for s in repository["sensors"]} == {"source_data_changed"}
