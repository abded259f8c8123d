"""Evaluate stage: every model the pipeline made (student, compressed variants, merged) on the dev sets,
the best picked by the dev mean (ties: fewer bytes per vector), and the grid (layers x dims x vector type)
of the best full-precision model, and (``evaluate.analyses``) the analyses of the best variant: prefix Spearman,
geometry, whitening x transfer (:mod:`mixsp_core.evaluate.analyses`). Writes ``reports/evaluation.{json,md,png}``,
``reports/metrics.json`` (for `dvc metrics`), ``reports/grid.*`` and ``reports/analyses*``, and records one
MLflow run with the metrics and the files."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import pandas as pd

from mixsp_core.errors import CheckpointError
from mixsp_core.evaluate.sts import DEV_TASKS, evaluate_embedder
from mixsp_core.io import claim_output, repair_swap, write_json_atomic, write_text_atomic
from mixsp_core.params import Params
from mixsp_core.paths import PipelinePaths
from mixsp_core.progress import stage_progress
from mixsp_core.stages.prepare import corpus_sample, dev_pairs
from mixsp_core.tracking.tracker import RunTarget

log = logging.getLogger(__name__)
REPORT_FILES = ("evaluation.json", "evaluation.md", "evaluation.png", "grid.json", "grid.md", "grid.png")


def evaluate_dir(path: Path, pairs: pd.DataFrame, batch_size: int = 64, name: str = "") -> dict[str, Any]:
    """``evaluate_embedder`` of the model directory ``path`` plus its width and bytes per vector."""
    from mixsp_core.compress import TransformedEmbedder
    from mixsp_core.models.checkpoint import load_embedder

    embedder = load_embedder(path)
    result = evaluate_embedder(embedder, pairs, model=name or str(path), batch_size=batch_size)
    chain = embedder.chain if isinstance(embedder, TransformedEmbedder) else None
    dims = int(getattr(embedder, "dim", 0) or 0)
    result.update(path=str(path), dims=dims, vector_type=chain.vector_type if chain else "float32",
                  bytes_per_vector=chain.bytes_per_vector if chain else 4 * dims)
    return result


def pipeline_variants(paths: PipelinePaths) -> dict[str, Path]:
    """Every model the pipeline made: the student, each compressed variant, the merged model."""
    found = {"student": paths.student.best}
    if paths.compressed.is_dir():
        found.update({f"compressed/{p.name}": p for p in sorted(paths.compressed.iterdir())
                      if p.is_dir() and not p.name.startswith(".")})
    found["merged"] = paths.merged_model
    for path in found.values():
        repair_swap(path)  # a model that a kill mid-swap left as .<name>.old
    missing = [str(p) for p in found.values() if not p.is_dir()]
    if missing:
        raise CheckpointError(f"{missing[0]}: missing; run the earlier stages first")
    return found


@stage_progress("evaluate")  # one progress bar for the stage's encode calls
def run_evaluate(params: Params, target: RunTarget | None = None) -> dict[str, Any]:
    """Every variant on dev, the best chosen, the grid of the best full-precision model; returns the report.
    Refused at once (:class:`~mixsp_core.errors.OutputBusyError`) while another process writes ``reports/``."""
    with claim_output(params.paths.reports, "evaluate stage"):
        return _evaluate(params, target)


def _evaluate(params: Params, target: RunTarget | None) -> dict[str, Any]:
    """The body of :func:`run_evaluate`, under the lock of ``reports/``."""
    from mixsp_core.evaluate.grid import GridSpec, run_grid
    from mixsp_core.models.checkpoint import load_embedder

    sp, paths = params.evaluate, params.paths
    pairs = dev_pairs(paths)
    started = time.perf_counter()
    variants = {}
    for name, path in pipeline_variants(paths).items():
        variants[name] = evaluate_dir(path, pairs, sp.batch_size, name)
        log.info("%s: dev %.2f", name, variants[name]["dev"])
    best = max(variants, key=lambda n: (variants[n]["dev"], -variants[n]["bytes_per_vector"]))
    full = [n for n in variants if variants[n]["vector_type"] == "float32" and not n.startswith("compressed/")]
    grid_model = max(full, key=lambda n: variants[n]["dev"])
    fit = corpus_sample(paths, sp.grid_fit_sentences, params.data.seed)
    grid = run_grid(load_embedder(variants[grid_model]["path"]), pairs, fit,
                    GridSpec(layers=sp.grid_layers or None, dims=sp.grid_dims, vector_types=sp.grid_vector_types,
                             batch_size=sp.batch_size), model=grid_model)
    grid_files = grid.write(paths.reports, "grid")
    analyses = _analyses(params, variants[best]["path"], best, pairs)
    merge_file = paths.merged / "merge.json"
    report = {
        "best": best,
        "best_path": variants[best]["path"],
        "best_dev": variants[best]["dev"],
        "dev_sets": [t for t in DEV_TASKS if any(t in v["tasks"] for v in variants.values())],
        "variants": variants,
        "dev": {name: v["dev"] for name, v in variants.items()},  # flat, for `dvc metrics show`
        "grid_model": grid_model,
        "grid": {k: str(v) for k, v in grid_files.items()},
        "files": {"json": str(paths.evaluation), "markdown": str(paths.reports / "evaluation.md"),
                  "plot": str(paths.reports / "evaluation.png"), "metrics": str(paths.reports / "metrics.json")},
        "merge": json.loads(merge_file.read_text()) if merge_file.is_file() else None,
        "analyses": analyses,
        "seconds": time.perf_counter() - started,
    }
    if report["merge"]:
        report["merge"].pop("records", None)
    _write_reports(report, paths)
    report["mlflow_run_id"] = _track(report, paths, params.promote.experiment, target or RunTarget())
    return report


def analyses_spec(params: Params):
    """The :class:`~mixsp_core.evaluate.analyses.AnalysesSpec` of params.yaml's ``evaluate`` section."""
    from mixsp_core.evaluate.analyses import AnalysesSpec

    sp = params.evaluate
    senteval = params.data.senteval_dir if sp.transfer_dir == "auto" else Path(sp.transfer_dir)
    return AnalysesSpec(sample_sentences=sp.analyses_sentences, transfer_tasks=list(sp.transfer_tasks),
                        transfer_max_sentences=sp.transfer_max_sentences, whitenings=list(sp.transfer_whitenings),
                        senteval_dir=senteval if senteval.is_dir() else None, batch_size=sp.batch_size,
                        seed=params.data.seed)


def _analyses(params: Params, model: str, name: str, pairs: pd.DataFrame) -> dict[str, Any] | None:
    """The analyses of the model ``model`` written to ``reports/analyses*``; when they are off, a stub
    ``analyses.json`` / ``.md`` (the DVC outputs) saying so, and None."""
    from mixsp_core.evaluate.analyses import run_analyses, write_analyses
    from mixsp_core.models.checkpoint import load_embedder

    paths = params.paths
    if not params.evaluate.analyses:
        write_json_atomic(paths.reports / "analyses.json", {"enabled": False})
        write_text_atomic(paths.reports / "analyses.md", "Analyses are off (evaluate.analyses: false).\n")
        return None
    sample = corpus_sample(paths, params.evaluate.analyses_sentences, params.data.seed)
    result = run_analyses(load_embedder(model), pairs, sample, analyses_spec(params), model=name)
    files = write_analyses(result, paths.reports)
    log.info("analyses of %s: %.0f s", name, result["seconds"]["total"])
    return {**result, "files": {k: str(v) for k, v in files.items()}}


def analyse_model(params: Params, model: str, out_dir: Path, embedder: Any = None) -> dict[str, Any]:
    """``mixsp analyse --model MODEL``: the analyses of any model (folder or Hub id) written to ``out_dir``
    (``analyses.json``, ``.md``, two plots), as the evaluate stage writes them for its best variant. Dev pairs
    and corpus: the data stage's outputs when it has run, else read from ``data.spec`` / ``data.corpus_files``
    as it would build them. ``embedder``: the loaded model (the CLI's inference options), else loaded here."""
    from mixsp_core.evaluate.analyses import run_analyses, write_analyses
    from mixsp_core.models.checkpoint import load_embedder

    paths, data = params.paths, params.data
    if paths.pairs.is_file() and paths.corpus.is_file():
        pairs, corpus = dev_pairs(paths), corpus_sample(paths, params.evaluate.analyses_sentences, data.seed)
    else:
        from mixsp_core.data.corpus import build_corpus
        from mixsp_core.data.sources import load_pairs

        table = load_pairs(data.resolved_spec())
        pairs = table[table["split"] == "dev"].reset_index(drop=True)
        if pairs.empty:
            raise CheckpointError(f"{data.resolved_spec()}: no dev pairs to analyse on")
        corpus = build_corpus(table, data.resolved_corpus_files(), data.max_corpus_sentences, data.seed)
    with claim_output(out_dir, "mixsp analyse"):
        result = run_analyses(embedder or load_embedder(model), pairs, corpus, analyses_spec(params), model=model)
        files = write_analyses(result, out_dir)
    return {**result, "files": {k: str(v) for k, v in files.items()}}


def read_evaluation(paths: PipelinePaths) -> dict[str, Any]:
    if not paths.evaluation.is_file():
        raise FileNotFoundError(f"{paths.evaluation}: no evaluation report yet; run the evaluate stage first")
    return json.loads(paths.evaluation.read_text(encoding="utf-8"))


def _write_reports(report: dict[str, Any], paths: PipelinePaths) -> None:
    write_json_atomic(paths.evaluation, report)
    # The few numbers `dvc metrics show` / `dvc metrics diff` compare across commits.
    metrics = {"best_dev": report["best_dev"], "dev": report["dev"],
               "bytes_per_vector": {n: v["bytes_per_vector"] for n, v in report["variants"].items()}}
    write_json_atomic(paths.reports / "metrics.json", metrics)
    markdown = _markdown(report)
    if report.get("analyses"):
        from mixsp_core.evaluate.analyses import analyses_markdown

        markdown += (f"\n\n## Analyses of the best variant ({report['best']})\n\n"
                     + analyses_markdown(report["analyses"]))
    write_text_atomic(paths.reports / "evaluation.md", markdown + "\n")
    _plot(report, paths.reports / "evaluation.png")


def _track(report: dict[str, Any], paths: PipelinePaths, experiment: str, target: RunTarget) -> str:
    """One MLflow run ``evaluate`` (nested in the pipeline run of the student it evaluates): the chosen
    variant's dev metrics as ``dev/...``, every variant's as ``variant/<name>/dev/...``, the report files."""
    from mixsp_core.tracking.metrics import variant_dev_metrics, variant_prefix

    tracker = target.tracker(experiment, "evaluate", {"mixsp.stage": "evaluate"}, lineage=paths.student.root)
    try:
        for name, variant in report["variants"].items():
            tracker.log_metrics(variant_dev_metrics(variant, report["dev_sets"], variant_prefix(name)), 0)
        tracker.log_metrics(variant_dev_metrics(report["variants"][report["best"]], report["dev_sets"]), 0)
        tracker.set_tags({"mixsp.best": report["best"], "mixsp.grid_model": report["grid_model"]})
        for name in REPORT_FILES:
            tracker.log_artifact(paths.reports / name, "reports")
        if report.get("analyses"):
            from mixsp_core.evaluate.analyses import ANALYSES_FILES, analyses_metrics

            tracker.log_metrics(analyses_metrics(report["analyses"]), 0)
            for name in ANALYSES_FILES:
                tracker.log_artifact(paths.reports / name, "reports/analyses")
    except BaseException:
        tracker.finish("FAILED")
        raise
    tracker.finish()
    return str(tracker.run_id)


def _markdown(report: dict[str, Any]) -> str:
    lines = ["| variant | dev | " + " | ".join(report["dev_sets"]) + " | dims | vector | bytes/vector |",
             "|---" * (len(report["dev_sets"]) + 5) + "|"]
    for name, row in report["variants"].items():
        cells = " | ".join(f"{row['tasks'][t]['spearman']:.2f}" if t in row["tasks"] else "n/a"
                           for t in report["dev_sets"])
        mark = " **(best)**" if name == report["best"] else ""
        lines.append(f"| {name}{mark} | {row['dev']:.2f} | {cells} | {row['dims']} | {row['vector_type']} | "
                     f"{row['bytes_per_vector']} |")
    merge = report.get("merge") or {}
    if merge:
        lines += ["", f"Merge inputs and methods (dev, start: {merge.get('start_kind')}):", ""]
        lines += [f"- {Path(k).name}: {v:.2f}" for k, v in merge.get("inputs", {}).items()]
        lines += [f"- {m}: {v:.2f}" for m, v in merge.get("methods", {}).items()]
    return "\n".join(lines)


def _plot(report: dict[str, Any], path: Path) -> None:
    from mixsp_core.evaluate.plots import _pyplot, save_figure

    plt = _pyplot()
    names = list(report["variants"])
    values = [report["variants"][n]["dev"] for n in names]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(names), 3.6))
    bars = ax.bar(range(len(names)), values, color=["#c44" if n == report["best"] else "#48a" for n in names])
    ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel("dev Spearman x100")
    ax.set_title("Pipeline variants on dev (STS-B dev, SICK trial)")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
