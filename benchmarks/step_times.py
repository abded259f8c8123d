"""Pipeline stage times from the Dagster run history (``$DAGSTER_HOME``, default ``.dagster_home``).

Dagster is imported only here and only when the history exists, so the GPU benchmark never needs it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from benchmarks.corpus import REPO_ROOT


def dagster_home() -> Path:
    return Path(os.environ.get("DAGSTER_HOME") or REPO_ROOT / ".dagster_home")


def stage_times() -> dict[str, Any]:
    """``{"run_id", "job", "stages": [{"step", "seconds", "status"}], "total_seconds"}`` of the latest
    successful run, or ``{"note": why not}``."""
    home = dagster_home()
    if not (home / "storage").exists() and not (home / "history").exists():
        return {"note": f"no Dagster run history in {home} (run `make run` first)"}
    try:
        from dagster import DagsterInstance, DagsterRunStatus, RunsFilter
    except ImportError as err:
        return {"note": f"dagster is not installed here ({err})"}
    os.environ["DAGSTER_HOME"] = str(home.resolve())
    with DagsterInstance.get() as instance:
        runs = instance.get_runs(filters=RunsFilter(statuses=[DagsterRunStatus.SUCCESS]), limit=1)
        if not runs:
            return {"note": f"no successful run in the Dagster history at {home}"}
        run = runs[0]
        stats = instance.get_run_step_stats(run.run_id)
    stages = [
        {"step": s.step_key, "status": s.status.value if s.status else None,
         "seconds": (s.end_time - s.start_time) if s.start_time and s.end_time else None}
        for s in sorted(stats, key=lambda s: s.start_time or 0.0)
    ]
    starts = [s.start_time for s in stats if s.start_time]
    ends = [s.end_time for s in stats if s.end_time]
    return {"run_id": run.run_id, "job": run.job_name, "stages": stages,
            "total_seconds": (max(ends) - min(starts)) if starts and ends else None}


def format_stages(report: dict[str, Any]) -> str:
    if "note" in report:
        return f"_{report['note']}_"
    lines = [f"Dagster run `{report['run_id'][:8]}` ({report['job']}), total "
             f"{report['total_seconds'] or 0:.1f} s", "", "| stage | seconds | status |", "| --- | ---: | --- |"]
    for s in report["stages"]:
        secs = f"{s['seconds']:.1f}" if s["seconds"] is not None else "-"
        lines.append(f"| {s['step']} | {secs} | {s['status'] or '-'} |")
    return "\n".join(lines)
