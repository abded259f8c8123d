"""Jobs: ``mixsp_full`` materialises every asset (and runs every check) in dependency order, on the executor that
run config or ``MIXSP_EXECUTOR`` picks (executors.py: multiprocess by default, or Celery workers). (``dvc_sync``,
which commits, pushes and logs one finished run's DVC outputs, lives with its sensor in dvc_sync_sensor.py.)"""

from __future__ import annotations

import dagster as dg

from pipelines.defs.executors import mixsp_executor

# AssetSelection objects rather than selection strings: no dependence on the ANTLR selection parser.
mixsp_full = dg.define_asset_job(
    name="mixsp_full",
    selection=dg.AssetSelection.all(),
    description="The whole chain: pairs and corpus -> teacher embeddings -> ... -> champion.",
    executor_def=mixsp_executor,
)
