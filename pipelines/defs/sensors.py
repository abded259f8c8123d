"""Retrain when the source data changes: a sensor over the content hash of the configured sources.

Every few minutes it fingerprints the files of ``data.spec`` and the corpus files (sha256 of their
bytes, see pipelines/fingerprint.py) and compares them with the ``source_hash`` recorded by the last
materialisation of ``sts_pairs`` / ``sentence_corpus``. A difference requests one ``mixsp_full`` run
per distinct fingerprint (the run key), so an unchanged source never starts a run. Before the first
materialisation (nothing to compare with) it waits for ``make run``.
"""

import dagster as dg

from pipelines.defs.jobs import mixsp_full
from pipelines.defs.resources import pipeline_params
from pipelines.fingerprint import files_fingerprint, spec_fingerprint


def _recorded_hash(context: dg.SensorEvaluationContext, asset: str) -> str | None:
    event = context.instance.get_latest_materialization_event(dg.AssetKey(asset))
    if event is None or event.asset_materialization is None:
        return None
    value = event.asset_materialization.metadata.get("source_hash")
    return None if value is None else str(value.value)


@dg.sensor(
    name="source_data_changed",
    job=mixsp_full,
    minimum_interval_seconds=300,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Starts mixsp_full when the content hash of the source data differs from the last run's.",
)
def source_data_changed(context: dg.SensorEvaluationContext) -> dg.SensorResult | dg.SkipReason:
    current = {
        "sts_pairs": spec_fingerprint(pipeline_params().data.resolved_spec()),
        "sentence_corpus": files_fingerprint(pipeline_params().data.resolved_corpus_files()),
    }
    recorded = {asset: _recorded_hash(context, asset) for asset in current}
    if any(value is None for value in recorded.values()):
        return dg.SkipReason("no materialisation to compare with yet: run `make run` once")
    changed = [asset for asset in current if current[asset] != recorded[asset]]
    if not changed:
        return dg.SkipReason("source data unchanged")
    key = "-".join(current[asset][:16] for asset in sorted(current))
    return dg.SensorResult(run_requests=[dg.RunRequest(run_key=key, tags={"mixsp/trigger": "source-changed",
                                                                          "mixsp/changed": ",".join(changed)})])
