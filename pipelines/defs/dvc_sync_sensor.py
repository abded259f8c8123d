"""DVC history for runs that `make run` did not launch: after every successful ``mixsp_full`` run (from the
UI, the weekly schedule or the source-data sensor) the ``dvc_sync_after_run`` sensor starts the
``dvc_sync`` job, whose one op (``sync_dvc_outputs``) calls :func:`pipelines.dvc_sync.sync_run` (what `make run` calls): ``dvc
commit``, ``dvc push``, dvc.lock and its hashes logged to the run's MLflow training run.

A job rather than work inside the sensor: committing and pushing a run's gigabyte takes longer than a
sensor evaluation may, and as a run its log and failure show in the UI. Runs tagged ``mixsp/dvc-sync``
(`make run` syncs its own; ``--no-dvc`` asks for none) are left alone. Needs the Dagster daemon, which
``make ui`` (``dagster dev``) runs.
"""

import dagster as dg

from pipelines.defs.jobs import mixsp_full
from pipelines.defs.resources import MlflowResource, PathsResource
from pipelines.dvc_sync import SYNC_TAG, sync_run


class DvcSyncConfig(dg.Config):
    """The Dagster run whose artifacts to commit, push and log (the sensor fills it in)."""

    dagster_run_id: str


@dg.op(description="dvc commit the run's outputs, log dvc.lock and its hashes to its MLflow training run, "
                   "dvc push them to the remote (pipelines/dvc_sync.py).")
def sync_dvc_outputs(context: dg.OpExecutionContext, config: DvcSyncConfig, paths: PathsResource,
             mlflow: MlflowResource) -> dg.Output[None]:
    report = sync_run(config.dagster_run_id, mlflow.tracking_uri, paths.root())
    for line in report.lines():
        context.log.info(line)
    if not report.ok:
        raise dg.Failure(description="\n".join(report.errors),
                         metadata={"synced_run": config.dagster_run_id})
    return dg.Output(None, metadata={"synced_run": config.dagster_run_id, "dvc_status": report.status or "clean",
                                     "pushed": report.pushed or "", "mlflow_runs": ", ".join(report.mlflow_runs),
                                     "skipped": report.skipped or ""})


@dg.job(name="dvc_sync", description="Commit, push and log to MLflow the DVC outputs of one mixsp_full run.",
        tags={SYNC_TAG: "job"})
def dvc_sync_job() -> None:
    sync_dvc_outputs()


@dg.run_status_sensor(
    name="dvc_sync_after_run",
    run_status=dg.DagsterRunStatus.SUCCESS,
    monitored_jobs=[mixsp_full],
    request_job=dvc_sync_job,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="After a successful mixsp_full run not launched by `make run`: start dvc_sync for it.",
)
def dvc_sync_after_run(context: dg.RunStatusSensorContext) -> dg.RunRequest | dg.SkipReason:
    run = context.dagster_run
    if run.tags.get(SYNC_TAG):
        return dg.SkipReason(f"run {run.run_id} is tagged {SYNC_TAG}={run.tags[SYNC_TAG]}: its launcher handles DVC")
    return dg.RunRequest(run_key=f"dvc-sync-{run.run_id}",
                         run_config={"ops": {"sync_dvc_outputs": {"config": {"dagster_run_id": run.run_id}}}},
                         tags={"mixsp/synced-run": run.run_id})
