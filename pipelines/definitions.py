"""Dagster entry point: every definition under ``pipelines/defs`` (assets, checks, resources, jobs,
schedules, sensors), loaded with Dagster's defs-folder layout (see pipelines/dg.toml).

    dagster dev -m pipelines.definitions        # or: make ui
    python -m pipelines.run                      # or: make run
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg


@dg.definitions
def defs() -> dg.Definitions:
    return dg.load_from_defs_folder(path_within_project=Path(__file__).resolve().parent)


def job_named(name: str) -> dg.JobDefinition:
    """The job ``name`` of :func:`defs`; the reconstruction target of out-of-process runs (pipelines/run.py),
    which the multiprocess executor's step processes call to rebuild the job."""
    return defs().resolve_job_def(name)
