"""Train several configs on the same prepared inputs and print one markdown table of dev results.

This is how the tables in the issues' closing notes are made (one config file per row):

    python scripts/train_sweep.py configs/bi_single.yaml configs/bi_mixsp_hard.yaml --out data/sweeps/table1

Inputs come from the pipeline's data root (``data/pairs``, ``data/corpus``, the teacher cache), or, where the
teacher cannot travel (the GPU machine), from ``--teacher-npy``: teacher embeddings aligned with the corpus.
``--set key=value`` overrides a field in every config (e.g. ``model.encoder=/path``, ``train.device=cuda``).
``--seeds 0,1,2`` trains every config once per seed (``<name>-seed<S>``). Each finished row is written to
``<out>/results.jsonl`` at once, so an interrupted sweep keeps its rows.

MLflow: the sweep is one parent run (``sweep <out>``) with one nested training run per row; every run logs its
full config as flat params (``train.lr``, ``loss.distill``, ``seed``, ...) plus ``sweep.config``, and its curve
and best under ``dev/STSBenchmark``, ``dev/SICK``, ``dev/mean``. Select the runs in the MLflow UI, Compare,
then the parallel coordinates plot with the params that differ and ``dev/mean``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mixsp_core.io import write_text_atomic  # noqa: E402
from mixsp_core.paths import PipelinePaths  # noqa: E402
from mixsp_core.stages.prepare import read_corpus_file, read_pairs  # noqa: E402
from mixsp_core.stages.train import training_inputs  # noqa: E402
from mixsp_core.tracking.tracker import (  # noqa: E402
    NullTracker, RunTarget, Tracker, tracker_for_run, write_training_run)
from mixsp_core.training.config import load_config  # noqa: E402
from mixsp_core.training.loop import run_training  # noqa: E402

DEV = ("STSBenchmark-dev", "SICK-trial")


def result_row(config_path: Path, config, result, seed: int | None = None) -> dict:
    m, cm = result.best_metrics, result.class_metrics
    row = {"config": row_key(config_path, seed), "name": config.name, "kind": config.model.kind, "seed": config.seed,
           "dims": config.model.output_dim or None, "steps": result.steps, "best_step": result.best_step,
           "train_seconds": round(result.train_seconds, 1), "primary": m.get("primary")}
    for name in DEV:
        row[name] = m.get(name)
        for key in ("overlap", "spearman_upper", "spearman_lower"):
            row[f"{name}/{key}"] = (cm.get(name) or {}).get(key)
    return row


def row_key(config_path: Path, seed: int | None) -> str:
    """A row's ``config`` cell: the file, with ``@seed<S>`` when the sweep sets seeds."""
    return str(config_path) if seed is None else f"{config_path}@seed{seed}"


def sweep_target(out: Path) -> RunTarget:
    """The MLflow target of a sweep into ``out``: one parent run per output folder (a resumed sweep adds
    its rows to the same parent)."""
    return RunTarget(pipeline_run=f"sweep:{out.resolve()}", pipeline_name=f"sweep {out.name}")


def sweep_tracker(config, config_path: Path, out: Path, target: RunTarget | None) -> Tracker:
    """The row's tracker: a nested MLflow run with ``sweep.config`` as a param (none with --no-tracking)."""
    if target is None:
        return NullTracker()
    tracker = tracker_for_run(config, out, tags={"mixsp.stage": "train", "mixsp.config": str(config_path)},
                              target=target)
    tracker.log_params({"sweep.config": str(config_path)})
    return tracker


def markdown(rows: list[dict]) -> str:
    def f(v, spec=".2f"):
        return "n/a" if v is None else format(v, spec)

    head = ("| config | STS-B dev | SICK trial | dev mean | overlap STS-B / SICK | within-class upper / lower "
            "(STS-B) | train time |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    lines = [head]
    for r in sorted(rows, key=lambda r: -(r["primary"] or 0)):
        lines.append(
            f"| {r['config']} | {f(r['STSBenchmark-dev'])} | {f(r['SICK-trial'])} | {f(r['primary'])} | "
            f"{f(r['STSBenchmark-dev/overlap'], '.3f')} / {f(r['SICK-trial/overlap'], '.3f')} | "
            f"{f(r['STSBenchmark-dev/spearman_upper'])} / {f(r['STSBenchmark-dev/spearman_lower'])} | "
            f"{r['train_seconds'] / 60:.1f} min ({r['steps']} steps) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="one sub-directory per config, results.jsonl")
    parser.add_argument("--data-root", type=Path, default=ROOT / "data")
    parser.add_argument("--teacher-npy", type=Path, default=None,
                        help="teacher embeddings aligned with the corpus (instead of the teacher cache)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--seeds", default=None, help="comma-joined seeds: every config once per seed")
    parser.add_argument("--no-tracking", action="store_true", help="no MLflow run (e.g. where mlflow is absent)")
    args = parser.parse_args(argv)

    paths = PipelinePaths(args.data_root)
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "results.jsonl"
    rows = [json.loads(line) for line in results.read_text().splitlines()] if results.is_file() else []
    done = {r["config"] for r in rows}
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()] if args.seeds else [None]
    target = None if args.no_tracking else sweep_target(args.out)
    for config_path in args.configs:
        for seed in seeds:
            key = row_key(config_path, seed)
            if key in done:
                print(f"skip {key}: already in {results}")
                continue
            overrides = [*args.overrides, *([f"seed={seed}"] if seed is not None else [])]
            config = load_config(config_path, overrides=overrides)
            if seed is not None:
                config.name = f"{config.name}-seed{seed}"
            out = args.out / config.name
            if args.teacher_npy is not None:
                pairs, corpus, teacher = read_pairs(paths), read_corpus_file(paths), np.load(args.teacher_npy)
                teacher = teacher.astype(np.float32)
            else:
                pairs, corpus, teacher = training_inputs(config, paths)
            tracker = sweep_tracker(config, config_path, out, target)
            result = run_training(config, pairs, corpus, teacher, out, tracker)
            write_training_run(out, tracker)
            rows.append(result_row(config_path, config, result, seed))
            write_text_atomic(results, "".join(json.dumps(row) + "\n" for row in rows))
            print(result.summary(), flush=True)
    table = markdown(rows)
    write_text_atomic(args.out / "results.md", table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
