"""`make run`: materialise the whole asset graph (job ``mixsp_full``) from the command line.

    python -m pipelines.run [--data SPEC] [--job mixsp_full] [--no-dvc]

``--data SPEC`` (``make run DATA=SPEC``) is written into params.yaml's ``data.spec`` before the run, so the
DVC stages, dvc.lock and the MLflow runs all record the data the run really read (commit params.yaml with
dvc.lock to keep it).

Runs against the Dagster instance in ``$DAGSTER_HOME`` (default ``.dagster_home`` in the repository), so
the run and its materialisations appear in the UI (`make ui`). Each step runs in its own process
(multiprocess executor), so independent steps, the teacher shards above all, run side by side. After a
successful run whose artifacts are the repository's ``data/``, :func:`pipelines.dvc_sync.sync_run` pins them
in dvc.lock (``dvc commit``: ``dvc status`` is clean), logs the lock and its hashes to the run's MLflow
training run and pushes the outputs to the DVC remote, so `mixsp restore RUN_ID` can bring the run back.
The run is tagged ``mixsp/dvc-sync=inline`` so the ``dvc_sync_after_run`` sensor leaves it alone.
It does not commit to git: when dvc.lock / params.yaml changed it prints the ``git commit`` to run.
Prints where the outputs are, the dev table and how to load the champion; exits 1 when a step, a blocking
check or the DVC sync fails.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mixsp_core.paths import REPO_ROOT

if TYPE_CHECKING:
    from pipelines.dvc_sync import SyncReport

TELEMETRY_OFF = "telemetry:\n  enabled: false\n"
# The library's progress lines (mixsp_core.progress: the teacher's shards, evaluation) as Dagster log events,
# so a long step is not silent in the UI and the `make run` console.
PROGRESS_LOGS = "python_logs:\n  managed_python_loggers:\n    - mixsp_core.progress\n  python_log_level: INFO\n"


def ensure_dagster_home(default: Path = REPO_ROOT / ".dagster_home") -> Path:
    """Use ``$DAGSTER_HOME`` (set it to ``default`` when unset); its dagster.yaml turns telemetry off and
    shows the library's progress logs (sections added to an existing file that lacks them)."""
    home = Path(os.environ.setdefault("DAGSTER_HOME", str(default))).resolve()
    os.environ["DAGSTER_HOME"] = str(home)
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    text = config.read_text() if config.is_file() else ""
    missing = [section for key, section in (("telemetry:", TELEMETRY_OFF), ("python_logs:", PROGRESS_LOGS))
               if not any(line.startswith(key) for line in text.splitlines())]
    if missing:
        from mixsp_core.io import write_text_atomic

        write_text_atomic(config, text + ("\n" if text and not text.endswith("\n") else "") + "".join(missing))
    return home


# Step processes fork from a server that has imported Dagster, the definitions and the heavy libraries
# once, instead of each starting a fresh interpreter that imports them again (seconds per step on a small
# machine). Importing is all the server does: no torch threads or CUDA context exist yet when it forks.
PRELOAD = ["pipelines.definitions", "torch", "transformers", "great_expectations", "mlflow"]
EXECUTOR = {"multiprocess": {"start_method": {"forkserver": {"preload_modules": PRELOAD}}}}


def run_config() -> dict[str, Any]:
    """The run's config: INFO logs (no DEBUG event flood) and the multiprocess executor."""
    return {"loggers": {"console": {"config": {"log_level": "INFO"}}}, "execution": {"config": EXECUTOR}}


def set_data_spec(spec: str, params_path: Path) -> bool:
    """Write ``data.spec: SPEC`` into ``params_path`` (comments and layout kept); True when it changed.
    Validated first: a bad spec leaves the file as it was."""
    from ruamel.yaml import YAML

    from mixsp_core.params import load_params

    load_params(params_path, overrides={"data.spec": spec})  # raises ConfigError naming the field
    yaml = YAML()  # round-trip mode
    document = yaml.load(params_path.read_text(encoding="utf-8"))
    if document["data"].get("spec") == spec:
        return False
    document["data"]["spec"] = spec
    with open(params_path, "w", encoding="utf-8") as handle:
        yaml.dump(document, handle)
    return True


def output_locations() -> dict[str, Path | str]:
    """Where a run leaves its artifacts (from the resources' defaults, i.e. params.yaml and the env)."""
    from pipelines.defs.resources import MlflowResource, PathsResource

    layout = PathsResource().pipeline_paths()
    return {
        "pairs": layout.pairs,
        "corpus": layout.corpus,
        "teacher embeddings": layout.teacher,
        "models": layout.models,
        "student": layout.student.root,
        "compressed variants": layout.compressed,
        "merged model": layout.merged_model,
        "champion": layout.champion,
        "evaluation report": layout.reports / "evaluation.md",
        "reports": layout.reports,
        "dvc.lock": REPO_ROOT / "dvc.lock",
        "MLflow store": MlflowResource().tracking_uri,
        "Dagster home": Path(os.environ["DAGSTER_HOME"]),
    }


def champion_summary() -> str:
    """The last promotion's verdict (reports/champion.json), or '' before the first."""
    import json

    from pipelines.defs.resources import PathsResource

    record = PathsResource().pipeline_paths().reports / "champion.json"
    if not record.is_file():
        return ""
    data = json.loads(record.read_text())
    verdict = "promoted to champion" if data["promoted"] else "challenger"
    return (f"{data['registered_model']} version {data['version']} ({data['model_name']}, dev {data['dev']:.2f}): "
            f"{verdict}; alias 'champion' -> version {data['champion_version']} (dev {data['champion_dev']:.2f})")


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


def sync_dvc(dagster_run_id: str) -> SyncReport:
    """:func:`pipelines.dvc_sync.sync_run` on this run (the resources' data root and MLflow store), its lines
    printed (errors to stderr)."""
    from pipelines.defs.resources import MlflowResource, PathsResource
    from pipelines.dvc_sync import sync_run

    report = sync_run(dagster_run_id, MlflowResource().tracking_uri, PathsResource().root())
    for line in report.lines():
        print(line, file=sys.stdout if not line.startswith("DVC: error") else sys.stderr)
    return report


def _shown(path: Path) -> Path:
    """``path`` relative to the repository when inside it (as a user there would type it), else as is."""
    resolved = path.resolve()
    return resolved.relative_to(REPO_ROOT.resolve()) if resolved.is_relative_to(REPO_ROOT.resolve()) else path


def evaluation_report() -> Path:
    """Where the evaluate stage writes its dev table (reports/evaluation.md)."""
    from pipelines.defs.resources import PathsResource

    return PathsResource().pipeline_paths().reports / "evaluation.md"


def loading_hint(champion: Path, registered_model: str, alias: str) -> str:
    """How to use the champion from Python: sentence-transformers on the folder, MLflow on the registry."""
    return "\n".join([
        "Use the champion:",
        "  from sentence_transformers import SentenceTransformer",
        f"  SentenceTransformer(\"{champion}\", trust_remote_code=True).encode([\"A sentence.\"])"
        "  # imports the installed mixsp_core's MixSPHead; the folder holds no code",
        "  import mlflow  # with MLFLOW_TRACKING_URI set as for make run",
        f"  mlflow.pyfunc.load_model(\"models:/{registered_model}@{alias}\").predict([\"A sentence.\"])",
        f"  mixsp encode --model {champion} --input sentences.txt --output vectors.npy",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.run", description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="set params.yaml data.spec to SPEC, then run")
    parser.add_argument("--job", default="mixsp_full")
    parser.add_argument("--no-dvc", action="store_true",
                        help="skip dvc commit / push and logging dvc.lock to MLflow (the sensor skips it too)")
    args = parser.parse_args(argv)

    os.chdir(REPO_ROOT)  # params.yaml paths are relative to the repository root
    for key, value in (("HF_HUB_DISABLE_PROGRESS_BARS", "1"), ("TOKENIZERS_PARALLELISM", "false"),
                       ("DVC_NO_ANALYTICS", "1")):
        os.environ.setdefault(key, value)
    ensure_dagster_home()
    if args.data:
        from pipelines.defs.resources import params_file

        if set_data_spec(args.data, params_file()):
            print(f"{params_file()}: data.spec set to {args.data!r} (recorded in dvc.lock and MLflow; "
                  "commit params.yaml with dvc.lock)")

    from dagster import DagsterInstance, build_reconstructable_job, execute_job

    from pipelines.definitions import job_named
    from pipelines.dvc_sync import SYNC_TAG, commit_advice

    job_named(args.job)  # an unknown job name fails here, before any run starts
    job = build_reconstructable_job("pipelines.definitions", "job_named", reconstructable_args=(args.job,))
    with DagsterInstance.get() as instance:
        result = execute_job(job, instance, run_config=run_config(), raise_on_error=False,
                             tags={SYNC_TAG: "off" if args.no_dvc else "inline"})
        print(f"\nDagster run {result.run_id}: {'SUCCESS' if result.success else 'FAILURE'}")
        if not result.success:
            _print_failures(result)
    sync = sync_dvc(result.run_id) if result.success and not args.no_dvc else None
    print("\nOutputs:")
    for name, where in output_locations().items():
        exists = "" if not isinstance(where, Path) or where.exists() else "  (not written yet)"
        print(f"  {name:<20} {where}{exists}")
    champion = champion_summary()
    if champion:
        print(f"\nRegistry: {champion}")
    print("\nBrowse runs and assets: make ui")
    if sync is not None:
        advice = commit_advice(sync, sync.mlflow_runs[0] if sync.mlflow_runs else None)
        if advice:
            print(f"\n{advice}")
    if result.success:
        print_champion_use()
    return 0 if result.success and (sync is None or sync.ok) else 1


def print_champion_use() -> None:
    """The end of a successful run's summary: the dev table, then how to load the champion."""
    from pipelines.defs.resources import MlflowResource, PathsResource, pipeline_params

    report = evaluation_report()
    if report.is_file():
        print(f"\nDev table ({_shown(report)}):\n{report.read_text(encoding='utf-8').strip()}")
    champion = _shown(PathsResource().pipeline_paths().champion)
    print("\n" + loading_hint(champion, MlflowResource().registered_model, pipeline_params().promote.alias))


if __name__ == "__main__":
    sys.exit(main())
