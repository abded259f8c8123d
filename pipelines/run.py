"""`make run`: materialise the whole asset graph (job ``mixsp_full``) from the command line.

    python -m pipelines.run [--data SPEC] [--job mixsp_full]

Runs in this process against the Dagster instance in ``$DAGSTER_HOME`` (default ``.dagster_home`` in
the repository), so the run and its materialisations appear in the UI (`make ui`). Prints where the
outputs are; exits 1 when a step or a blocking check fails.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from mixsp_core.pipeline_config import REPO_ROOT

TELEMETRY_OFF = "telemetry:\n  enabled: false\n"


def ensure_dagster_home(default: Path = REPO_ROOT / ".dagster_home") -> Path:
    """Use ``$DAGSTER_HOME`` (set it to ``default`` when unset) and make sure telemetry is off there."""
    home = Path(os.environ.setdefault("DAGSTER_HOME", str(default))).resolve()
    os.environ["DAGSTER_HOME"] = str(home)
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    if not config.is_file():
        config.write_text(TELEMETRY_OFF)
    return home


def run_config(data: str | None) -> dict[str, Any]:
    """Run config overriding params.yaml for this run only (``--data`` -> the sts_pairs asset's spec)."""
    config: dict[str, Any] = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}  # no DEBUG event flood
    if data:
        config["ops"] = {"sts_pairs": {"config": {"spec": data}}}
    return config


def output_locations() -> dict[str, Path | str]:
    """Where a run leaves its artifacts (from the resources' defaults, i.e. params.yaml and the env)."""
    from pipelines.defs.resources import MlflowResource, PathsResource

    layout = PathsResource().pipeline_paths()
    return {
        "pairs": layout.pairs,
        "corpus": layout.corpus,
        "teacher embeddings": layout.teacher,
        "models": layout.models,
        "champion": layout.models / "champion",
        "reports": layout.reports,
        "MLflow store": MlflowResource().tracking_uri,
        "Dagster home": Path(os.environ["DAGSTER_HOME"]),
    }


def _print_failures(result: Any) -> None:
    for event in result.all_events:
        if event.event_type_value == "ASSET_CHECK_EVALUATION":
            evaluation = event.event_specific_data
            if not evaluation.passed:
                report = evaluation.metadata.get("report")
                print(f"\nFAILED check {evaluation.asset_key.to_user_string()}:{evaluation.check_name}",
                      file=sys.stderr)
                if report is not None:
                    print(report.value, file=sys.stderr)
        elif event.is_step_failure:
            error = event.step_failure_data.error
            print(f"\nFAILED step {event.step_key}: {error.message.strip() if error else ''}", file=sys.stderr)
    started = {event.step_key for event in result.all_events if event.is_step_start}
    not_run = [node.name for node in result.job_def.graph.nodes if node.name not in started]
    if not_run:
        print(f"\nnot run (an upstream step failed): {', '.join(not_run)}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.run", description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="data spec for this run (default: params.yaml data.spec)")
    parser.add_argument("--job", default="mixsp_full")
    args = parser.parse_args(argv)

    os.chdir(REPO_ROOT)  # params.yaml paths are relative to the repository root
    for key, value in (("HF_HUB_DISABLE_PROGRESS_BARS", "1"), ("TOKENIZERS_PARALLELISM", "false"),
                       ("DVC_NO_ANALYTICS", "1")):
        os.environ.setdefault(key, value)
    ensure_dagster_home()

    from dagster import DagsterInstance

    from pipelines.definitions import defs

    job = defs().resolve_job_def(args.job)
    with DagsterInstance.get() as instance:
        result = job.execute_in_process(run_config=run_config(args.data), instance=instance,
                                        raise_on_error=False)
    print(f"\nDagster run {result.run_id}: {'SUCCESS' if result.success else 'FAILURE'}")
    if not result.success:
        _print_failures(result)
    print("\nOutputs:")
    for name, where in output_locations().items():
        exists = "" if not isinstance(where, Path) or where.exists() else "  (not written yet)"
        print(f"  {name:<20} {where}{exists}")
    print("\nBrowse runs and assets: make ui")
    return 0 if result.success else 1


if __name__ == "__main__":
    sys.exit(main())
