"""Weekly retraining: the whole graph (``mixsp_full``) every Monday at 03:00 (server local time).

Runs while the Dagster daemon runs (``make ui`` starts ``dagster dev``, which includes it). The
teacher cache makes a retrain cheap when the data did not change: only new sentences are encoded.
"""

import dagster as dg

from pipelines.defs.jobs import mixsp_full

weekly_retrain = dg.ScheduleDefinition(
    name="weekly_retrain",
    job=mixsp_full,
    cron_schedule="0 3 * * 1",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Retrain, compress, merge, evaluate and promote every Monday 03:00 on the configured data.",
)
