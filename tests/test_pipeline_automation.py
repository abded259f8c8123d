"""The source-data sensor starts a run only when the content hash differs from the last materialisation's."""

from __future__ import annotations

import dagster as dg

from pipelines.defs.resources import pipeline_params
from pipelines.defs.sensors import source_data_changed
from pipelines.fingerprint import files_fingerprint, fingerprint_paths, spec_fingerprint


def _record(instance: dg.DagsterInstance, asset: str, source_hash: str) -> None:
    instance.report_runless_asset_event(dg.AssetMaterialization(asset, metadata={"source_hash": source_hash}))


def _evaluate(instance: dg.DagsterInstance):
    return source_data_changed(dg.build_sensor_context(instance=instance))


def test_sensor_waits_skips_when_unchanged_and_runs_on_change():
    current = {"sts_pairs": spec_fingerprint(pipeline_params().data.resolved_spec()),
               "sentence_corpus": files_fingerprint(pipeline_params().data.resolved_corpus_files())}
    with dg.DagsterInstance.ephemeral() as instance:
        assert isinstance(_evaluate(instance), dg.SkipReason)  # nothing materialised yet

        for asset, value in current.items():
            _record(instance, asset, value)
        assert "unchanged" in _evaluate(instance).skip_message

        _record(instance, "sts_pairs", "0" * 64)  # the last run saw other data
        result = _evaluate(instance)
        [request] = result.run_requests
        assert request.job_name in (None, "mixsp_full")
        assert request.tags["mixsp/changed"] == "sts_pairs"


def test_fingerprint_follows_content_not_timestamps(tmp_path):
    (tmp_path / "a.txt").write_text("one\n")
    before = fingerprint_paths([tmp_path])
    (tmp_path / "a.txt").write_text("one\n")  # rewritten, same bytes
    assert fingerprint_paths([tmp_path]) == before
    (tmp_path / "a.txt").write_text("two\n")
    assert fingerprint_paths([tmp_path]) != before
