"""Train several configs on the same prepared inputs and print one markdown table of dev results.

This is how the tables in the issues' closing notes are made (one config file per row):

    python scripts/train_sweep.py configs/bi_single.yaml configs/bi_mixsp_hard.yaml --out data/sweeps/table1

Inputs come from the pipeline's data root (``data/pairs``, ``data/corpus``, the teacher cache), or, where the
teacher cannot travel (the GPU machine), from ``--teacher-npy``: teacher embeddings aligned with the corpus.
``--set key=value`` overrides a field in every config (e.g. ``model.encoder=/path``, ``train.device=cuda``).
Each finished row is appended to ``<out>/results.jsonl`` at once, so an interrupted sweep keeps its rows.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mixsp_core.paths import PipelinePaths  # noqa: E402
from mixsp_core.stages.prepare import read_corpus_file, read_pairs  # noqa: E402
from mixsp_core.stages.train import training_inputs  # noqa: E402
from mixsp_core.tracking.tracker import NullTracker, tracker_for_run  # noqa: E402
from mixsp_core.training.config import load_config  # noqa: E402
from mixsp_core.training.loop import run_training  # noqa: E402

DEV = ("STSBenchmark-dev", "SICK-trial")


def result_row(config_path: Path, config, result) -> dict:
    m, cm = result.best_metrics, result.class_metrics
    row = {"config": str(config_path), "name": config.name, "kind": config.model.kind,
           "dims": config.model.output_dim or None, "steps": result.steps, "best_step": result.best_step,
           "train_seconds": round(result.train_seconds, 1), "primary": m.get("primary")}
    for name in DEV:
        row[name] = m.get(name)
        for key in ("overlap", "spearman_upper", "spearman_lower"):
            row[f"{name}/{key}"] = (cm.get(name) or {}).get(key)
    return row


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
    parser.add_argument("--no-tracking", action="store_true", help="no MLflow run (e.g. where mlflow is absent)")
    args = parser.parse_args(argv)

    paths = PipelinePaths(args.data_root)
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "results.jsonl"
    rows = [json.loads(line) for line in results.read_text().splitlines()] if results.is_file() else []
    done = {r["config"] for r in rows}
    for config_path in args.configs:
        if str(config_path) in done:
            print(f"skip {config_path}: already in {results}")
            continue
        config = load_config(config_path, overrides=args.overrides)
        out = args.out / config.name
        if args.teacher_npy is not None:
            pairs, corpus, teacher = read_pairs(paths), read_corpus_file(paths), np.load(args.teacher_npy)
            teacher = teacher.astype(np.float32)
        else:
            pairs, corpus, teacher = training_inputs(config, paths)
        tracker = NullTracker() if args.no_tracking else tracker_for_run(config, out)
        result = run_training(config, pairs, corpus, teacher, out, tracker)
        row = result_row(config_path, config, result)
        rows.append(row)
        with results.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(result.summary(), flush=True)
    table = markdown(rows)
    (args.out / "results.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
