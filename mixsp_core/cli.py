"""`mixsp`: the command line over the library. Each subcommand is a thin call into mixsp_core.

    mixsp validate --data SPEC
    mixsp prepare  [--data SPEC] [--config params.yaml]       # pairs table + corpus, validated
    mixsp teacher  [--config params.yaml] [--shard K/N | --merge-shards]   # teacher embeddings (cached, sharded)
    mixsp encode   --model MODEL --input SENTENCES.txt --output OUT.npy [--dims K] [--batch-size N] [--device D]
                   [--precision auto|fp32|bf16|fp16] [--quantize int8] [--token-budget N|auto]
    mixsp evaluate --model MODEL --data SPEC [--json OUT] [--grid [--layers 2,4 --dims 64,128 --vector-types float32,int8]]
    mixsp evaluate --config params.yaml                       # evaluate stage: every pipeline variant on dev
    mixsp train    [--config params.yaml]                     # the pipeline's student (params.yaml student)
    mixsp train    --config configs/X.yaml [--output DIR]     # one run of a training config file
    mixsp finetune-teacher --config FILE --out DIR            # fine-tuned teacher: DIR/run, DIR/teacher
    mixsp compress --config params.yaml                       # compressed variants of the student
    mixsp merge    --config params.yaml                       # merged snapshots, best on dev kept
    mixsp soup     RUN_DIR RUN_DIR... --out DIR [--methods uniform,greedy,fusion]   # merge several runs
    mixsp promote  --config params.yaml                       # registry version; champion alias if better
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _params(args: argparse.Namespace, overrides: dict | None = None):
    """The typed params.yaml of ``--config`` (read once per command)."""
    from mixsp_core.params import load_params

    return load_params(Path(args.config), overrides=overrides)


def _cmd_validate(args: argparse.Namespace) -> int:
    from mixsp_core.data.table import pair_counts_markdown
    from mixsp_core.stages.prepare import check_pairs

    pairs, report = check_pairs(args.data)
    print(pair_counts_markdown(pairs))
    print()
    print(report.to_markdown())
    return 0 if report.success else 1


def _inference(args: argparse.Namespace) -> dict:
    """``--precision`` / ``--quantize`` / ``--token-budget`` as ``load_embedder`` keywords."""
    return {"precision": args.precision, "quantize": args.quantize, "token_budget": args.token_budget}


def _load(model: str, device: str | None, dims: int | None, inference: dict):
    """A model for encode / evaluate (a saved transform, as of compressed models and the champion, applied;
    ``--dims`` keeps a prefix). ``inference``: :func:`_inference`. Options that do not fit the model or
    device raise ConfigError."""
    from mixsp_core.models.checkpoint import load_embedder

    try:
        return load_embedder(model, device=device, dims=dims, **inference)
    except ValueError as err:  # options that do not fit the model or device (--dims, --quantize on CUDA, ...)
        raise _usage(str(err)) from err


def _token_budget(text: str) -> int | str:
    """``--token-budget``: a positive int or ``auto``."""
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number of tokens or 'auto', got {text!r}")
    return value


def _cmd_encode(args: argparse.Namespace) -> int:
    import numpy as np

    from mixsp_core.data.corpus import read_corpus

    sentences = read_corpus(Path(args.input), allow_empty_lines=False)
    embedder = _load(args.model, args.device, args.dims, _inference(args))
    vectors = np.asarray(embedder.encode(sentences, batch_size=args.batch_size), dtype=np.float32)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    np.save(args.output, vectors)
    print(f"{args.output}: {vectors.shape[0]} x {vectors.shape[1]} float32")
    return 0


def _ints(text: str | None) -> list[int] | None:
    return [int(v) for v in text.split(",")] if text else None


def _cmd_evaluate(args: argparse.Namespace) -> int:
    if args.config:
        from mixsp_core.stages.evaluate import run_evaluate

        report = run_evaluate(_params(args))
        print(Path(report["files"]["markdown"]).read_text())
        print(f"best: {report['best']} (dev {report['best_dev']:.2f}) -> {report['best_path']}")
        return 0
    if not (args.model and args.data):
        raise _usage("evaluate needs --model and --data (or --config params.yaml)")
    from mixsp_core.data.sources import load_pairs
    from mixsp_core.evaluate.sts import evaluate_embedder, format_table

    pairs = load_pairs(args.data)
    pairs = pairs[pairs["split"] != "train"] if not args.include_train else pairs
    if args.grid:
        return _grid(args, pairs)
    embedder = _load(args.model, args.device, args.dims, _inference(args))
    result = evaluate_embedder(embedder, pairs, model=args.model, batch_size=args.batch_size)
    print(format_table(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def _grid(args: argparse.Namespace, pairs) -> int:
    """`mixsp evaluate --grid`: every (layers, dims, vector type) cell; table, JSON and plot."""
    from mixsp_core.data.corpus import read_corpus
    from mixsp_core.evaluate.grid import GridSpec, run_grid

    if args.corpus:
        corpus = read_corpus(Path(args.corpus))
    else:  # fit on the training sentences when no corpus is given (never on the evaluated pairs)
        from mixsp_core.data.sources import load_pairs

        train = load_pairs(args.data)
        train = train[train["split"] == "train"]
        corpus = list(dict.fromkeys([*train["sentence1"], *train["sentence2"]]))
    spec = GridSpec(layers=_ints(args.layers), dims=_ints(args.dims_grid),
                    vector_types=args.vector_types.split(","), dim_method=args.dim_method,
                    batch_size=args.batch_size)
    embedder = _load(args.model, args.device, None, _inference(args))
    result = run_grid(embedder, pairs, corpus[: args.fit_sentences], spec, model=args.model)
    print(result.to_markdown())
    out = result.write(Path(args.output_dir), "grid")
    if args.json:
        result.save_json(args.json)
    print("\n".join(f"{kind}: {path}" for kind, path in out.items()))
    return 0


def _usage(message: str) -> Exception:
    from mixsp_core.errors import ConfigError

    return ConfigError("argv", message)


def _cmd_compress(args: argparse.Namespace) -> int:
    from mixsp_core.stages.compress import run_compress

    print(run_compress(_params(args)).summary())
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from mixsp_core.stages.merge import run_merge

    print(run_merge(_params(args)).summary())
    return 0


def _cmd_promote(args: argparse.Namespace) -> int:
    from mixsp_core.stages.promote import run_promote

    print(run_promote(_params(args)).summary())
    return 0


def _is_params_file(path: Path) -> bool:
    """params.yaml (a ``student`` section) rather than a training config (configs/*.yaml)."""
    import yaml

    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return False  # load_config reports the file properly
    return isinstance(raw, dict) and "student" in raw


def _cmd_prepare(args: argparse.Namespace) -> int:
    from mixsp_core.stages.prepare import run_prepare

    print(run_prepare(_params(args, {"data.spec": args.data} if args.data else None)).summary())
    return 0


def _cmd_teacher(args: argparse.Namespace) -> int:
    from mixsp_core.stages.teacher import run_teacher, run_teacher_merge, run_teacher_shard

    params = _params(args)
    if args.shard:
        from mixsp_core.teacher.shards import ShardSpec

        done = run_teacher_shard(params, ShardSpec.parse(args.shard))
        state = f"{done.encoded} sentences encoded" if done.encoded else "already done, nothing encoded"
        print(f"teacher shard {done.spec}: {done.sentences} sentences -> {done.path} ({state})")
    elif args.merge_shards:
        report = run_teacher_merge(params)
        print(f"teacher cache: {report.added} rows added from {len(report.shards)} shards "
              f"({', '.join(f'{name}: {n}' for name, n in report.shards.items())})")
    else:
        print(run_teacher(params).summary())
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from mixsp_core.stages.train import run_train, run_train_config

    if _is_params_file(Path(args.config)):
        if args.output:
            raise _usage("--output does not apply to params.yaml: the student goes to data/models/student")
        print(run_train(_params(args)).summary())
        return 0
    from mixsp_core.params import load_params

    result = run_train_config(Path(args.config), load_params(Path(args.params)),
                              output=Path(args.output) if args.output else None)
    print(result.summary())
    return 0


def _cmd_finetune_teacher(args: argparse.Namespace) -> int:
    from mixsp_core.params import load_params
    from mixsp_core.stages.train import run_finetune_teacher

    print(run_finetune_teacher(Path(args.config), Path(args.out), load_params(Path(args.params))).summary())
    return 0


def _cmd_soup(args: argparse.Namespace) -> int:
    from mixsp_core.stages.merge import run_soup

    methods = [m for m in args.methods.split(",") if m]
    result = run_soup([Path(r) for r in args.runs], Path(args.out), _params(args).paths, methods,
                      p=args.p, batch_size=args.batch_size)
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

    p = sub.add_parser("teacher", help="teacher stage: encode the corpus with the teacher (cached, in shards)")
    p.add_argument("--config", default="params.yaml")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--shard", metavar="K/N", default=None,
                      help="encode only shard K of N (N = teacher.shards) into data/teacher_shards/, e.g. on "
                           "another machine; merge with --merge-shards")
    mode.add_argument("--merge-shards", action="store_true",
                      help="merge the N shard directories into the cache (encodes nothing; a missing shard "
                           "is an error)")
    p.set_defaults(func=_cmd_teacher)

    for name, helptext in (("encode", "embed one sentence per line into an .npy matrix"),
                           ("evaluate", "STS Spearman of a model on every task present")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--model", required=name == "encode", help="Hub id or a directory this project saved")
        p.add_argument("--dims", type=int, default=None, help="keep the first K dimensions (re-normalised)")
        p.add_argument("--batch-size", type=int, default=64)
        p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
        p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                       help="encoder weights while encoding (auto: bf16 on CUDA, fp32 on CPU)")
        p.add_argument("--quantize", default=None, choices=("int8",),
                       help="dynamic int8 linear layers (CPU, fp32)")
        p.add_argument("--token-budget", type=_token_budget, default="auto",
                       help="tokens per batch instead of --batch-size sentences (auto: 65536 on CUDA, off on CPU)")
        if name == "encode":
            p.add_argument("--input", required=True)
            p.add_argument("--output", required=True)
            p.set_defaults(func=_cmd_encode)
        else:
            p.add_argument("--data", default=None)
            p.add_argument("--json", default=None, help="also write the results as JSON here")
            p.add_argument("--include-train", action="store_true", help="also score training splits")
            p.add_argument("--config", default=None,
                           help="params.yaml: the pipeline's evaluate stage (every variant on dev)")
            p.add_argument("--grid", action="store_true", help="evaluate every (layers, dims, vector type) cell")
            p.add_argument("--layers", default=None, help="grid: layer counts, e.g. 2,4,6 (default: full depth)")
            p.add_argument("--grid-dims", dest="dims_grid", default="32,64,128,256,384", help="grid: dims")
            p.add_argument("--vector-types", default="float32,int8,binary", help="grid: vector types")
            p.add_argument("--dim-method", default="pca", choices=("pca", "truncate"),
                           help="grid: post-hoc PCA, or prefixes (Matryoshka-trained models)")
            p.add_argument("--corpus", default=None, help="grid: sentences to fit PCA / int8 on (one per line)")
            p.add_argument("--fit-sentences", type=int, default=5000)
            p.add_argument("--output-dir", default="data/reports", help="grid: where grid.json/.md/.png go")
            p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("train", help="train the pipeline's student (params.yaml), or a student (bi) or MixSP "
                                     "scorer (cross) from a config file")
    p.add_argument("--config", default="params.yaml",
                   help="params.yaml (the pipeline's student) or a training config (configs/*.yaml)")
    p.add_argument("--output", default=None, help="checkpoint directory (default: from the config)")
    p.add_argument("--params", default="params.yaml", help="with a training config: the pipeline params "
                                                             "whose data root holds the pairs and corpus")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("finetune-teacher", help="fine-tune the teacher encoder on the training pairs, export it")
    p.add_argument("--config", required=True, help="a plain-encoder training config, e.g. configs/teacher_finetune.yaml")
    p.add_argument("--out", required=True, help="DIR: the run goes to DIR/run, the exported teacher to DIR/teacher")
    p.add_argument("--params", default="params.yaml", help="the pipeline params whose data root holds the pairs")
    p.set_defaults(func=_cmd_finetune_teacher)

    p = sub.add_parser("soup", help="merge the best checkpoints of several training runs; keep the best on dev")
    p.add_argument("runs", nargs="+", help="training run directories (best/, start/) from one config seed")
    p.add_argument("--out", required=True, help="the merged checkpoint directory")
    p.add_argument("--methods", default="uniform,greedy,fusion", help="merge methods to try (comma-joined)")
    p.add_argument("--p", type=float, default=1.0, help="delta-guided fusion exponent")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--config", default="params.yaml", help="the pipeline params: dev pairs come from its data root")
    p.set_defaults(func=_cmd_soup)

    for stage, helptext, func in (
            ("compress", "compress stage: PCA / int8 variants of the student (params.yaml)", _cmd_compress),
            ("merge", "merge stage: soups and delta-guided fusion of the run's snapshots", _cmd_merge),
            ("promote", "promote stage: register the evaluated best; move 'champion' if better", _cmd_promote)):
        p = sub.add_parser(stage, help=helptext)
        p.add_argument("--config", default="params.yaml")
        p.set_defaults(func=func)
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
