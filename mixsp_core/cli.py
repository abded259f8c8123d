"""`mixsp`: the command line over the library. Each subcommand is a thin call into mixsp_core.

    mixsp validate --data SPEC
    mixsp prepare  [--data SPEC] [--config params.yaml]       # pairs table + corpus, validated
    mixsp teacher  [--config params.yaml]                      # teacher embeddings of the corpus (cached)
    mixsp encode   --model MODEL --input SENTENCES.txt --output OUT.npy [--dims K] [--batch-size N] [--device D]
    mixsp evaluate --model MODEL --data SPEC [--json OUT]
    mixsp train    --config FILE
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _cmd_validate(args: argparse.Namespace) -> int:
    from mixsp_core.data.sources import load_pairs
    from mixsp_core.data.table import pair_counts_markdown
    from mixsp_core.data.validate import validate_pairs

    pairs = load_pairs(args.data)
    print(pair_counts_markdown(pairs))
    report = validate_pairs(pairs, name=args.data)
    print()
    print(report.to_markdown())
    return 0 if report.success else 1


def _cmd_encode(args: argparse.Namespace) -> int:
    import numpy as np

    from mixsp_core.data.corpus import read_corpus
    from mixsp_core.models.checkpoint import load_embedder

    sentences = read_corpus(Path(args.input), allow_empty_lines=False)
    embedder = load_embedder(args.model, device=args.device, dims=args.dims)
    vectors = np.asarray(embedder.encode(sentences, batch_size=args.batch_size), dtype=np.float32)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    np.save(args.output, vectors)
    print(f"{args.output}: {vectors.shape[0]} x {vectors.shape[1]} float32")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from mixsp_core.data.sources import load_pairs
    from mixsp_core.evaluate.sts import evaluate_embedder, format_table
    from mixsp_core.models.checkpoint import load_embedder

    pairs = load_pairs(args.data)
    pairs = pairs[pairs["split"] != "train"] if not args.include_train else pairs
    embedder = load_embedder(args.model, device=args.device, dims=args.dims)
    result = evaluate_embedder(embedder, pairs, model=args.model, batch_size=args.batch_size)
    print(format_table(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    from mixsp_core.pipeline_config import load_params
    from mixsp_core.stages import run_prepare

    params = load_params(Path(args.config), overrides={"data.spec": args.data} if args.data else None)
    result = run_prepare(params)
    print(result.summary())
    return 0


def _cmd_teacher(args: argparse.Namespace) -> int:
    from mixsp_core.pipeline_config import load_params
    from mixsp_core.stages import run_teacher

    params = load_params(Path(args.config))
    stats = run_teacher(params)
    print(f"teacher cache: {stats.encoded} sentences encoded, {stats.reused} reused")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from mixsp_core.stages import run_train_from_file

    result = run_train_from_file(Path(args.config), output=Path(args.output) if args.output else None)
    print(result.summary())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mixsp", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="read STS pairs and validate them (exit 1 when invalid)")
    p.add_argument("--data", required=True, help="senteval:DIR | hf:ID | hf-disk:DIR | file:PATH (comma-joined)")
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("prepare", help="data stage: validated pairs table and sentence corpus under data/")
    p.add_argument("--config", default="params.yaml")
    p.add_argument("--data", default=None, help="override data.spec")
    p.set_defaults(func=_cmd_prepare)

    p = sub.add_parser("teacher", help="teacher stage: encode the corpus with the teacher (cached)")
    p.add_argument("--config", default="params.yaml")
    p.set_defaults(func=_cmd_teacher)

    for name, helptext in (("encode", "embed one sentence per line into an .npy matrix"),
                           ("evaluate", "STS Spearman of a model on every task present")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--model", required=True, help="Hub id or a directory this project saved")
        p.add_argument("--dims", type=int, default=None, help="keep the first K dimensions (re-normalised)")
        p.add_argument("--batch-size", type=int, default=64)
        p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
        if name == "encode":
            p.add_argument("--input", required=True)
            p.add_argument("--output", required=True)
            p.set_defaults(func=_cmd_encode)
        else:
            p.add_argument("--data", required=True)
            p.add_argument("--json", default=None, help="also write the results as JSON here")
            p.add_argument("--include-train", action="store_true", help="also score training splits")
            p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("train", help="train a student (bi) or MixSP scorer (cross) from a config file")
    p.add_argument("--config", required=True)
    p.add_argument("--output", default=None, help="checkpoint directory (default: from the config)")
    p.set_defaults(func=_cmd_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    from mixsp_core.errors import MixSPError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (MixSPError, FileNotFoundError) as err:
        print(f"mixsp {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
