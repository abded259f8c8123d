"""The stages after the teacher, as plain functions over params.yaml: train -> compress -> merge ->
evaluate -> promote. The Dagster assets, the `mixsp ... --config params.yaml` subcommands and the DVC
stages all call these (re-exported by :mod:`mixsp_core.stages`).

Paths (under the data root, see ``PipelinePaths``): the student run ``models/student/``, the compressed
variants ``models/compressed/<variant>/``, the merged model ``models/merged/model/`` (+ ``merge.json``),
the report ``reports/evaluation.{json,md,png}`` + ``reports/grid.*``, the champion ``models/champion/``
(+ ``reports/champion.json``). Every directory is written beside its target and renamed into place.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mixsp_core.errors import CheckpointError, ConfigError, MixSPError
from mixsp_core.fsutil import replace_dir
from mixsp_core.stage_params import StageParams, stage_params
from mixsp_core.stages import PipelinePaths, atomic_write, read_corpus_file, read_pairs, run_train

log = logging.getLogger(__name__)


class ModelGateError(MixSPError):
    """A model below the configured dev floor was offered for promotion."""
SNAPSHOT_DIR, START_DIR = "snapshots", "start"  # the trainer's train.snapshot_every layout
_STEP = re.compile(r"^step-(\d+)$")


def _stages(params) -> StageParams:
    from mixsp_core.pipeline_config import REPO_ROOT

    return stage_params(params.extra, REPO_ROOT / "params.yaml")


def _paths(params) -> PipelinePaths:
    return PipelinePaths(params.data.root_path())


def _resolve(path: str) -> Path:
    from mixsp_core.pipeline_config import REPO_ROOT

    p = Path(path)
    return p if p.is_absolute() else REPO_ROOT / p


def load_pipeline_embedder(path: str | Path, device: str | None = None, **inference: Any):
    """``load_embedder`` plus a saved transform (``path/transform/``) applied on top when the loader did
    not apply it already: what every stage (and `mixsp encode`) uses for a pipeline model directory.
    ``inference``: ``load_embedder``'s precision / quantize / token_budget."""
    from mixsp_core.compress import TransformedEmbedder, wrap_if_transformed
    from mixsp_core.models.checkpoint import load_embedder

    embedder = load_embedder(path, device=device, **inference)
    return embedder if isinstance(embedder, TransformedEmbedder) else wrap_if_transformed(embedder, path)


def dev_pairs(paths: PipelinePaths) -> pd.DataFrame:
    """The dev splits of the pipeline's pairs table (STS-B dev, SICK trial): what variants are ranked on."""
    pairs = read_pairs(paths)
    dev = pairs[pairs["split"] == "dev"].reset_index(drop=True)
    if dev.empty:
        raise CheckpointError(f"{paths.pairs}: no dev pairs to evaluate models on")
    return dev


def evaluate_dir(path: Path, pairs: pd.DataFrame, batch_size: int = 64, name: str = "") -> dict[str, Any]:
    """``evaluate_embedder`` of the model directory ``path`` plus its width and bytes per vector."""
    from mixsp_core.compress import TransformedEmbedder
    from mixsp_core.evaluate.sts import evaluate_embedder

    embedder = load_pipeline_embedder(path)
    result = evaluate_embedder(embedder, pairs, model=name or str(path), batch_size=batch_size)
    chain = getattr(embedder, "chain", None)
    dims = int(getattr(embedder, "dim", 0) or 0)
    result.update(path=str(path), dims=dims,
                  vector_type=chain.vector_type if isinstance(embedder, TransformedEmbedder) else "float32",
                  bytes_per_vector=chain.bytes_per_vector if isinstance(embedder, TransformedEmbedder) else 4 * dims)
    return result


# --------------------------------------------------------------------------- train


def student_config(params, overrides: list[str] | None = None):
    """The training config the pipeline runs (params.yaml ``train.config`` + ``train.overrides`` +
    ``overrides``), writing to the fixed, DVC-tracked ``models/student``."""
    from mixsp_core.config import load_config
    from mixsp_core.teacher_cache import is_finetuned_teacher

    sp = _stages(params)
    config = load_config(_resolve(sp.train.config), overrides=[*sp.train.overrides, *(overrides or [])])
    config.output_dir = str(_paths(params).student)
    # a fine-tuned teacher's cache is its own folder (teacher/finetuned-<sha>/), not teacher/meta.json's model
    teacher = params.teacher.model
    config.data.teacher = teacher if is_finetuned_teacher(teacher) else cached_teacher(_paths(params)) or teacher
    return config


def cached_teacher(paths: PipelinePaths) -> str | None:
    """The model the teacher stage encoded the corpus with (``teacher/meta.json``): distillation must use
    that cache, whatever the training config names."""
    meta = paths.teacher / "meta.json"
    try:
        return str(json.loads(meta.read_text(encoding="utf-8"))["model"]) if meta.is_file() else None
    except (OSError, ValueError, KeyError) as err:
        raise CheckpointError(f"{meta}: unreadable teacher-cache metadata: {err}") from err


def _resumable(config, out: Path) -> bool:
    """Resume only an interrupted run of this same config; a finished run or another config starts fresh
    (a retrain must train again: the data or the config changed)."""
    from mixsp_core.config import flatten
    from mixsp_core.train import _RESUME_FREE

    state_file = out / "last" / "trainer_state.json"
    if not state_file.is_file():
        return False
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    saved, current = flatten(state.get("config", {})), flatten(config.to_dict())
    same = all(saved.get(k) == current.get(k) for k in set(saved) | set(current)
               if k not in _RESUME_FREE and not k.startswith("tracking."))
    return same and int(state.get("step", 0)) < int(state.get("total_steps", 0))


def run_student(params, tracker=None, overrides: list[str] | None = None, show_progress: bool = True):
    """Train stage: one run of the configured student into ``models/student``; returns TrainResult.

    ``tracker`` defaults to a new MLflow run (or the interrupted run's, when resuming)."""
    from mixsp_core.tracking import tracker_for_run

    config = student_config(params, overrides)
    out = Path(config.output_dir)
    config.train.resume = _resumable(config, out)
    if not config.train.resume:
        # Snapshots (and the start) of an older run must not be merged with this run's.
        shutil.rmtree(out / SNAPSHOT_DIR, ignore_errors=True)
        shutil.rmtree(out / START_DIR, ignore_errors=True)
    if tracker is None:
        if config.tracking.enabled and not config.train.resume:
            from mlflow import MlflowClient

            from mixsp_core.registry import ensure_experiment
            from mixsp_core.tracking import tracking_uri

            ensure_experiment(MlflowClient(tracking_uri()), config.tracking.experiment,
                              default_artifact_location(tracking_uri()))
        tracker = tracker_for_run(config, out)
    return run_train(config, _paths(params), out, tracker, show_progress=show_progress)


# --------------------------------------------------------------------------- compress


@dataclass
class CompressResult:
    source: Path
    variants: dict[str, dict[str, Any]]  # name -> {path, steps, output_dim, vector_type, bytes_per_vector}
    fit_sentences: int
    seconds: float

    def summary(self) -> str:
        rows = [f"  {n}: {v['output_dim']} dims {v['vector_type']} ({v['bytes_per_vector']} B/vector) -> {v['path']}"
                for n, v in self.variants.items()]
        return f"compressed {self.source} on {self.fit_sentences} corpus sentences:\n" + "\n".join(rows)


def variant_name(spec: str) -> str:
    """``pca:128`` -> ``pca128``, ``pca:64+int8`` -> ``pca64-int8`` (a directory name)."""
    return "-".join(part.replace(":", "") for part in spec.split("+"))


def run_compress(params) -> CompressResult:
    """Compress stage: fit each ``compress.variants`` chain on corpus embeddings of the student's best
    checkpoint and save it as a self-contained model under ``models/compressed/<variant>/``."""
    from mixsp_core.compress import TransformChain, make_step, write_compressed_model
    from mixsp_core.models.checkpoint import load_embedder

    sp, paths = _stages(params).compress, _paths(params)
    source = paths.student / "best"
    if not source.is_dir():
        raise CheckpointError(f"{source}: no student checkpoint yet; run the train stage first")
    started = time.perf_counter()
    corpus = read_corpus_file(paths)
    rng = np.random.default_rng(params.data.seed)
    fit = [corpus[i] for i in sorted(rng.permutation(len(corpus))[: sp.fit_sentences])]
    vectors = load_embedder(source).encode(fit, batch_size=sp.batch_size)
    variants: dict[str, dict[str, Any]] = {}
    for spec in sp.variants:
        name = variant_name(spec)
        chain = TransformChain([make_step(s) for s in spec.split("+")]).fit(vectors)
        out = write_compressed_model(source, chain, paths.compressed / name, info={"spec": spec})
        variants[name] = {"path": str(out), "spec": spec, "steps": chain.name, "output_dim": chain.output_dim,
                          "vector_type": chain.vector_type, "bytes_per_vector": chain.bytes_per_vector}
    for stale in paths.compressed.iterdir():  # variants dropped from params.yaml: DVC should not keep them
        if stale.is_dir() and stale.name not in variants:
            shutil.rmtree(stale)
    result = CompressResult(source, variants, len(fit), time.perf_counter() - started)
    atomic_write(paths.compressed / "compress.json", lambda tmp: tmp.write_text(
        json.dumps({"source": str(source), "fit_sentences": len(fit), "variants": variants}, indent=2) + "\n"))
    return result


# --------------------------------------------------------------------------- merge


def snapshot_dirs(student: Path) -> list[tuple[int, Path]]:
    """``(step, dir)`` of the run's saved snapshots (``snapshots/step-N/``), by step."""
    folder = student / SNAPSHOT_DIR
    found = [(int(m.group(1)), p) for p in folder.glob("step-*") if p.is_dir() and (m := _STEP.match(p.name))]
    return sorted(found)


def merge_inputs(student: Path) -> tuple[list[Path], str, str]:
    """The checkpoints to merge (snapshots after step 0, else best/ and last/ of the run), the start model
    they were trained from (``start/`` or ``snapshots/step-0``, else the run config's base encoder) and
    how it was found."""
    from mixsp_core.config import load_config

    snaps = snapshot_dirs(student)
    checkpoints = [p for step, p in snaps if step > 0]
    starts = [p for p in [student / START_DIR] if (p / "model.safetensors").is_file()]
    starts += [p for step, p in snaps if step == 0]
    if len(checkpoints) < 2:
        checkpoints = [p for p in (student / "best", student / "last") if (p / "model.safetensors").is_file()]
    if not checkpoints:
        raise CheckpointError(f"{student}: no checkpoints to merge (snapshots/step-N, best/ or last/)")
    if starts:
        return checkpoints, str(starts[0]), f"step-0 checkpoint {starts[0].name}/"
    # Without a step-0 snapshot the heads have no recorded start: fusion merges them uniformly.
    encoder = load_config(student / "run_config.yaml").model.encoder
    return checkpoints, encoder, "base encoder (no step-0 snapshot)"


@dataclass
class MergeStageResult:
    path: Path
    best_method: str
    methods: dict[str, float]  # method -> dev primary
    inputs: dict[str, float]  # checkpoint -> dev primary
    start: str
    record: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        rows = [f"  {Path(k).name if 'step-' in k else k}: {v:.2f}" for k, v in self.inputs.items()]
        rows += [f"  {m}{' (kept)' if m == self.best_method else ''}: {v:.2f}" for m, v in self.methods.items()]
        return f"merged {len(self.inputs)} checkpoints from {self.start} -> {self.path}\n" + "\n".join(rows)


def merge_keep_best(checkpoints: list, start: str | None, methods: list[str], p: float, pairs: pd.DataFrame,
                    batch_size: int, target: Path) -> dict[str, Any]:
    """Each merge method over ``checkpoints`` (fine-tuned from ``start``); the best on ``pairs`` (dev) is
    swapped in atomically at ``target``. Returns the report: best method, each method's and input's dev."""
    from mixsp_core.merge import merge_checkpoints

    def score(path: Path) -> float:
        return float(evaluate_dir(Path(path), pairs, batch_size)["dev"])

    inputs = {str(c): score(c) for c in checkpoints}
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=target.parent, prefix=".candidates-"))
    try:
        scores: dict[str, float] = {}
        records: dict[str, dict[str, Any]] = {}
        for method in methods:
            merged = merge_checkpoints(checkpoints, scratch / method, method, start=start, p=p,
                                       score_dir=score, scores=list(inputs.values()))
            # greedy already scored its final soup on dev; the others are scored here
            scores[method] = (float(merged.record["greedy"]["final_score"]) if method == "greedy"
                              else score(merged.path))
            records[method] = merged.record
        best = max(scores, key=lambda m: scores[m])
        replace_dir(scratch / best, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {"best_method": best, "methods": scores, "inputs": inputs, "start": start, "records": records}


def run_merge(params) -> MergeStageResult:
    """Merge stage: each ``merge.methods`` over the run's snapshots; the best on dev is kept as
    ``models/merged/model/``, every method's dev score in ``models/merged/merge.json``."""
    sp, paths = _stages(params).merge, _paths(params)
    checkpoints, start, start_kind = merge_inputs(paths.student)
    report = merge_keep_best(checkpoints, start, list(sp.methods), sp.p, dev_pairs(paths), sp.batch_size,
                             paths.merged / "model")
    report["start_kind"] = start_kind
    atomic_write(paths.merged / "merge.json",
                 lambda tmp: tmp.write_text(json.dumps(report, indent=2, default=str) + "\n"))
    return MergeStageResult(paths.merged / "model", report["best_method"], report["methods"], report["inputs"],
                            start, report)


def run_soup(runs: list[Path], out: Path, paths: PipelinePaths, methods: list[str], p: float = 1.0,
             batch_size: int = 64) -> MergeStageResult:
    """Soup of several training runs (``mixsp soup``): their ``best/`` checkpoints merged by each method, the
    best on the pipeline's dev pairs kept at ``out``, the report in ``out/soup.json``. The runs must share
    their start (same config seed: the heads are initialised alike); the first run's ``start/`` is the
    fusion start."""
    if len(runs) < 2:
        raise ConfigError("soup.runs", f"list at least two training runs, got {len(runs)}")
    checkpoints = []
    for run in runs:
        if not (run / "best" / "model.safetensors").is_file():
            raise CheckpointError(f"{run}: no best/ checkpoint (model.safetensors); is it a training run directory?")
        checkpoints.append(run / "best")
    start = runs[0] / START_DIR
    report = merge_keep_best(checkpoints, str(start) if (start / "model.safetensors").is_file() else None,
                             methods, p, dev_pairs(paths), batch_size, out)
    atomic_write(out / "soup.json", lambda tmp: tmp.write_text(json.dumps(report, indent=2, default=str) + "\n"))
    return MergeStageResult(out, report["best_method"], report["methods"], report["inputs"], str(report["start"]),
                            report)


# --------------------------------------------------------------------------- evaluate


def pipeline_variants(paths: PipelinePaths) -> dict[str, Path]:
    """Every model the pipeline made: the student, each compressed variant, the merged model."""
    found = {"student": paths.student / "best"}
    if paths.compressed.is_dir():
        found.update({f"compressed/{p.name}": p for p in sorted(paths.compressed.iterdir())
                      if p.is_dir() and not p.name.startswith(".")})
    found["merged"] = paths.merged / "model"
    missing = [str(p) for p in found.values() if not p.is_dir()]
    if missing:
        raise CheckpointError(f"{missing[0]}: missing; run the earlier stages first")
    return found


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


def _plot(report: dict[str, Any], path: Path) -> Path:
    from mixsp_core.evaluate.plots import _pyplot

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
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_evaluate(params) -> dict[str, Any]:
    """Evaluate stage: every variant on dev (``reports/evaluation.{json,md,png}``), the best chosen by the
    dev primary metric (ties: fewer bytes per vector), and the grid of the best full-precision model
    (``reports/grid.{json,md,png}``). Returns the report dict."""
    from mixsp_core.evaluate.grid import GridSpec, run_grid
    from mixsp_core.evaluate.sts import DEV_TASKS
    from mixsp_core.models.checkpoint import load_embedder

    sp, paths = _stages(params).evaluate, _paths(params)
    pairs = dev_pairs(paths)
    started = time.perf_counter()
    variants = {}
    for name, path in pipeline_variants(paths).items():
        variants[name] = evaluate_dir(path, pairs, sp.batch_size, name)
        log.info("%s: dev %.2f", name, variants[name]["dev"])
    best = max(variants, key=lambda n: (variants[n]["dev"], -variants[n]["bytes_per_vector"]))
    full = [n for n in variants if variants[n]["vector_type"] == "float32" and not n.startswith("compressed/")]
    grid_model = max(full, key=lambda n: variants[n]["dev"])
    corpus = read_corpus_file(paths)
    rng = np.random.default_rng(params.data.seed)
    fit = [corpus[i] for i in sorted(rng.permutation(len(corpus))[: sp.grid_fit_sentences])]
    grid = run_grid(load_embedder(variants[grid_model]["path"]), pairs, fit,
                    GridSpec(layers=sp.grid_layers or None, dims=sp.grid_dims, vector_types=sp.grid_vector_types,
                             batch_size=sp.batch_size), model=grid_model)
    grid_files = grid.write(paths.reports, "grid")
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
        "seconds": time.perf_counter() - started,
    }
    if report["merge"]:
        report["merge"].pop("records", None)
    atomic_write(paths.evaluation, lambda tmp: tmp.write_text(json.dumps(report, indent=2) + "\n"))
    # The few numbers `dvc metrics show` / `dvc metrics diff` compare across commits.
    metrics = {"best_dev": report["best_dev"], "dev": report["dev"],
               "bytes_per_vector": {n: v["bytes_per_vector"] for n, v in variants.items()}}
    atomic_write(paths.reports / "metrics.json", lambda tmp: tmp.write_text(json.dumps(metrics, indent=2) + "\n"))
    atomic_write(paths.reports / "evaluation.md", lambda tmp: tmp.write_text(_markdown(report) + "\n"))
    _plot(report, paths.reports / "evaluation.png")
    return report


def read_evaluation(paths: PipelinePaths) -> dict[str, Any]:
    if not paths.evaluation.is_file():
        raise FileNotFoundError(f"{paths.evaluation}: no evaluation report yet; run the evaluate stage first")
    return json.loads(paths.evaluation.read_text(encoding="utf-8"))


# --------------------------------------------------------------------------- promote


def run_promote(params, client=None, run_id: str | None = None, tags: dict[str, str] | None = None,
                floor: float | None = None):
    """Promote stage: register the evaluated best as a new version of ``promote.registered_model``; move
    the alias (and ``models/champion/``) only when it beats the current champion on dev. Without
    ``run_id`` a new MLflow run (experiment ``promote.experiment``) holds the registered artifact.
    A best model below ``floor`` (default ``evaluate.min_dev_spearman``) is refused, as the Dagster
    model check refuses it. Writes ``reports/champion.json``; returns the ``registry.Promotion``."""
    from mixsp_core.registry import ensure_experiment, register_and_promote
    from mixsp_core.tracking import tracking_uri

    stages = _stages(params)
    sp, paths = stages.promote, _paths(params)
    report = read_evaluation(paths)
    floor = stages.evaluate.min_dev_spearman if floor is None else floor
    if report["best_dev"] < floor:
        raise ModelGateError(f"{paths.evaluation}: best model {report['best']} has dev {report['best_dev']:.2f}, "
                             f"below evaluate.min_dev_spearman {floor:.2f}; not registered, champion unchanged")
    own_run = run_id is None
    if client is None:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=tracking_uri(), registry_uri=tracking_uri())
    if own_run:
        experiment = ensure_experiment(client, sp.experiment, default_artifact_location(tracking_uri()))
        run_id = client.create_run(experiment, run_name="promote", tags={"mixsp.stage": "promote",
                                                                         **(tags or {})}).info.run_id
    try:
        client.log_metric(run_id, "dev_primary", float(report["best_dev"]))
        client.set_tag(run_id, "mixsp.model", report["best"])
        promotion = register_and_promote(client, sp.registered_model, run_id, Path(report["best_path"]),
                                         float(report["best_dev"]), paths.champion, alias=sp.alias,
                                         model_name=report["best"])
        client.log_metric(run_id, "promoted", float(promotion.promoted))
    except BaseException:
        if own_run:
            client.set_terminated(run_id, "FAILED")
        raise
    if own_run:
        client.set_terminated(run_id, "FINISHED")
    atomic_write(paths.reports / "champion.json",
                 lambda tmp: tmp.write_text(json.dumps(promotion.to_dict(), indent=2) + "\n"))
    if promotion.promoted:  # a challenger leaves the champion and its card as they were
        from mixsp_core.model_card import write_card

        write_card(paths.champion, report, promotion.to_dict(), paths.student)
    return promotion


def default_artifact_location(uri: str) -> str | None:
    """Artifacts of a SQLite store go to ``mlartifacts/`` beside the database file (not the cwd)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri()
    return None
