"""`mixsp`: the command line over the library. Each subcommand is a thin call into mixsp_core.

    mixsp validate --data SPEC
    mixsp prepare  [--data SPEC] [--config params.yaml]       # pairs table + corpus, validated
    mixsp teacher  [--config params.yaml] [--shard K/N | --merge-shards]   # teacher embeddings (cached, sharded)
    mixsp encode   --model MODEL --input SENTENCES.txt --output OUT.npy [--dims K] [--batch-size N] [--device D]
                   [--precision auto|fp32|bf16|fp16] [--quantize int8] [--token-budget N|auto] [--backend torch|openvino]
    mixsp evaluate --model MODEL --data SPEC [--json OUT] [--grid [--layers 2,4 --dims 64,128 --vector-types float32,int8]]
    mixsp evaluate --config params.yaml                       # evaluate stage: every pipeline variant on dev
    mixsp ir       --model MODEL [--max-corpus N] [--data SENTEVAL_DIR] [--json OUT]   # recall@10 / MRR@10
    mixsp analyse  --model MODEL [--config params.yaml] [--set KEY=VALUE] [--out DIR]   # geometry, transfer
    mixsp train    [--config params.yaml]                     # the pipeline's student (params.yaml student)
    mixsp train    --config configs/X.yaml [--output DIR]     # one run of a training config file
    mixsp finetune-teacher --config FILE --out DIR            # fine-tuned teacher: DIR/run, DIR/teacher
    mixsp compress --config params.yaml                       # compressed variants of the student
    mixsp merge    --config params.yaml                       # merged snapshots, best on dev kept
    mixsp soup     RUN_DIR RUN_DIR... --out DIR [--methods uniform,greedy,fusion]   # merge several runs
    mixsp promote  --config params.yaml                       # registry version; champion alias if better
    mixsp restore  COMMIT|MLFLOW_RUN_ID|DAGSTER_RUN_ID [--repo .]   # an earlier run's outputs back (dvc checkout)
    mixsp push     --model DIR --repo-id USER/NAME [--token T] [--private] [--dry-run]   # upload to the Hub
    mixsp export   --model DIR --format onnx --out OUT [--int8]   # one ONNX graph for onnxruntime

Exit status: 0 done; 1 the command ran and its check said no (`validate` on invalid data, a failing data
validation, the model gate of `promote`); 2 a user error (a bad option, config value, input file or model
folder, a failed write), printed as one line `mixsp <cmd>: error: ...`; `--debug` adds the traceback.
Files named by `encode --output` / `evaluate --json` are written atomically, exactly there. A command that
writes an output another process is writing (a stage's output, `--out DIR`) is refused at once, exit 2,
naming that process (mixsp_core.io.output_lock).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


USAGE_ERROR = 2  # exit status of a user error (argparse's own, kept for every user error)


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error, ``mixsp <cmd>: error: ...`` (exit 2), instead of the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


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
    """``--precision`` / ``--quantize`` / ``--token-budget`` / ``--backend`` as ``load_embedder`` keywords."""
    return {"precision": args.precision, "quantize": args.quantize, "token_budget": args.token_budget,
            "backend": args.backend}


def _load(model: str, device: str | None, dims: int | None, inference: dict):
    """A model for encode / evaluate (a saved transform, as of compressed models and the champion, applied;
    ``--dims`` keeps a prefix). ``inference``: :func:`_inference`. Options that do not fit the model or
    device raise a usage error; a broken model folder its own error (CheckpointError naming the file)."""
    from mixsp_core.errors import MixSPError
    from mixsp_core.models.checkpoint import load_embedder

    try:
        return load_embedder(model, device=device, dims=dims, **inference)
    except MixSPError:
        raise  # already names its file or field
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
    from mixsp_core.models.streaming import SentenceFile, encode_file_streaming

    output = _output_file(args.output, "--output")  # refused before any encoding work
    source = SentenceFile(Path(args.input))  # every line counted and checked (file:line) before the model loads
    embedder = _load(args.model, args.device, args.dims, _inference(args))
    # streamed: one chunk of sentences and vectors in memory at a time, rows written into the .npy as they
    # come, the file renamed into place when complete; NaN vectors are refused (nothing written)
    with _write_errors(output):
        rows, dim = encode_file_streaming(embedder, source, output, batch_size=args.batch_size,
                                          where=f"model {args.model}")
    print(f"{output}: {rows} x {dim} float32")
    return 0


def _output_file(text: str, option: str) -> Path:
    """The file path an option names, checked before any work: a directory, or anything that is not a regular
    file (``/dev/full``, a pipe), is refused, since an atomic write would replace it rather than write into it."""
    path = Path(text)
    if path.is_dir():
        raise _usage(f"{option} {text} is a directory; give a file path")
    if path.exists() and not path.is_file():
        raise _usage(f"{option} {text} is not a regular file (a device or pipe?); give a file path")
    return path


def _output_dir(text: str, option: str) -> Path:
    """The directory path an option names; an existing non-directory is refused."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise _usage(f"{option} {text} exists and is not a directory")
    return path


def _write_output(path: Path, write) -> Path:
    """Write ``path`` atomically and exactly there: ``write(fh)`` fills a temporary sibling opened for binary
    writing, which replaces ``path`` only when complete and flushed to disk. A failed write (disk full, file
    size limit) raises MixSPError and leaves ``path`` as it was, with no partial file beside it."""
    from mixsp_core.io import replacing_file

    with _write_errors(path), replacing_file(path) as tmp, open(tmp, "wb") as fh:
        write(fh)
        fh.flush()
        os.fsync(fh.fileno())  # a full disk reports here at the latest, before the rename
    return path


@contextlib.contextmanager
def _write_errors(path: Path) -> Iterator[None]:
    """An OSError of the block (a full disk, a file size limit) as one MixSPError naming ``path``."""
    from mixsp_core.errors import MixSPError

    try:
        yield
    except OSError as err:
        raise MixSPError(f"{path}: could not write ({err.strerror or err}); "
                         "the previous file, if any, is unchanged") from err


def _write_json_output(path: Path, data) -> Path:
    """``data`` as the project's JSON text (undefined metrics as null, never NaN, with a warning on stderr
    saying how many), via :func:`_write_output`."""
    import json

    from mixsp_core.evaluate.sts import count_undefined, json_ready
    from mixsp_core.io import json_text

    from mixsp_core.errors import MixSPError

    ready = json_ready(data)
    try:  # the guard: a NaN that json_ready missed stops here, before anything is written
        json.dumps(ready, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise MixSPError(f"{path}: the result holds a value JSON cannot represent ({err}); nothing written") from err
    undefined = count_undefined(data)
    if undefined:
        print(f"warning: {path}: {undefined} undefined values (NaN / inf, e.g. a correlation over constant "
              "predictions) written as null", file=sys.stderr)
    text = json_text(ready)
    return _write_output(path, lambda fh: fh.write(text.encode("utf-8")))


def _ints(text: str | None) -> list[int] | None:
    """A comma-joined list of positive integers (``--layers``, ``--grid-dims``); argparse type."""
    if not text:
        return None
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers joined by commas, e.g. 64,128; got {text!r}")
    return values


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (batch sizes, ``--dims``, ``--fit-sentences``)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0 (``soup --p``)."""
    import math

    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def _device(text: str) -> str:
    """argparse type: ``cpu``, ``cuda`` or ``cuda:N``, and CUDA only where this machine has it."""
    import re

    if text != "cpu" and not re.fullmatch(r"cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    if text.startswith("cuda"):
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(text.partition(":")[2] or 0)
        if index >= count:
            raise argparse.ArgumentTypeError(
                f"{text}: CUDA is not available on this machine; use --device cpu" if not count
                else f"{text}: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
    return text


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
    from mixsp_core.errors import DataError
    from mixsp_core.evaluate.sts import check_scorable, evaluate_embedder, format_table

    json_path = _output_file(args.json, "--json") if args.json else None
    all_pairs = load_pairs(args.data)
    pairs = all_pairs[all_pairs["split"] != "train"] if not args.include_train else all_pairs
    if pairs.empty:
        raise DataError(args.data, f"no dev or test pairs to evaluate (all {len(all_pairs)} pairs are train; "
                                   "--include-train scores them too)")
    check_scorable(pairs)  # a 1-pair task or constant gold scores: refused before the model is loaded
    if args.grid:
        return _grid(args, pairs)
    from mixsp_core.evaluate.contamination import seen_pairs_for

    seen, seen_source = seen_pairs_for(args.model, all_pairs)
    embedder = _load(args.model, args.device, args.dims, _inference(args))
    result = evaluate_embedder(embedder, pairs, model=args.model, batch_size=args.batch_size, seen=seen)
    result["seen_pairs_source"] = seen_source
    print(format_table(result))
    print(f"\nseen pairs: {seen_source}")
    if json_path is not None:
        _write_json_output(json_path, result)
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
    json_path = _output_file(args.json, "--json") if args.json else None
    output_dir = _output_dir(args.output_dir, "--output-dir")
    spec = GridSpec(layers=args.layers, dims=args.dims_grid,
                    vector_types=args.vector_types.split(","), dim_method=args.dim_method,
                    batch_size=args.batch_size)
    from mixsp_core.io import output_lock

    with output_lock(output_dir, "mixsp evaluate --grid"):  # data/reports by default: the evaluate stage's
        embedder = _load(args.model, args.device, None, _inference(args))
        result = run_grid(embedder, pairs, corpus[: args.fit_sentences], spec, model=args.model)
        print(result.to_markdown())
        out = result.write(output_dir, "grid")
        if json_path is not None:
            result.save_json(json_path)
    print("\n".join(f"{kind}: {path}" for kind, path in out.items()))
    return 0


def _cmd_analyse(args: argparse.Namespace) -> int:
    """`mixsp analyse --model DIR`: prefix Spearman, geometry, whitening x transfer of one model."""
    from mixsp_core.stages.evaluate import analyse_model

    output_dir = _output_dir(args.out, "--out")
    params = _params(args, overrides=args.set or None)
    embedder = _load(args.model, args.device, None, _inference(args))
    result = analyse_model(params, args.model, output_dir, embedder)
    print(Path(result["files"]["markdown"]).read_text())
    print("\n".join(f"{kind}: {path}" for kind, path in result["files"].items()))
    return 0


def _usage(message: str) -> Exception:
    """A bad command line (options that do not fit each other, the model or the machine): exit 2."""
    from mixsp_core.errors import ConfigError

    error = ConfigError("argv", message)
    error.args = (message,)  # printed as is: the message names the option, "config field 'argv'" would not help
    return error


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


def _cmd_push(args: argparse.Namespace) -> int:
    from mixsp_core.tracking.hub_push import HubOfflineError, plan_push, push_model

    plan = plan_push(args.model, args.repo_id)
    print(f"push: {plan.summary()}")
    if args.dry_run:
        print("\n".join(f"  {name}" for name in plan.files))
        return 0
    try:
        url = push_model(plan, token=args.token, private=args.private)
    except HubOfflineError as err:  # a state of the machine, not a usage error: exit 2, no traceback
        print(f"mixsp push: error: {err}", file=sys.stderr)
        return 2
    print(f"pushed: {url}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from mixsp_core.io import claim_output
    from mixsp_core.models.onnx_export import export_onnx

    with claim_output(Path(args.out), "mixsp export"):
        out = export_onnx(args.model, args.out, int8=args.int8)
    print(f"exported {args.model} -> {out} (onnx{', int8 weights too' if args.int8 else ''})")
    return 0


def _cmd_restore(args: argparse.Namespace) -> int:
    from mixsp_core.tracking.dvc_history import restore_run

    result = restore_run(args.ref, repo=Path(args.repo), tracking_uri=args.tracking_uri, pull=not args.no_pull,
                         force=args.force)
    print(result.summary())
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


def _cmd_ir(args: argparse.Namespace) -> int:
    from mixsp_core.evaluate.ir import build_ir_benchmark, evaluate_ir
    from mixsp_core.io import json_text, write_json_atomic
    from mixsp_core.paths import shared_dir

    benchmark = build_ir_benchmark(Path(args.data) if args.data else shared_dir() / "data" / "senteval",
                                   args.max_corpus)
    result = {"model": args.model, **evaluate_ir(_load(args.model, args.device, None, {}), benchmark,
                                                  args.batch_size)}
    sys.stdout.write(json_text(result))
    write_json_atomic(args.json, result)
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


def _cmd_defsent_glosses(args: argparse.Namespace) -> int:
    from mixsp_core.data.wordnet import export_glosses

    table = export_glosses(Path(args.wordnet_dir), Path(args.output))
    print(f"{args.output}: {len(table)} glosses ({table['synset'].nunique()} synsets, "
          f"{Path(args.output).stat().st_size} bytes)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mixsp", description=__doc__.splitlines()[0])
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
        p.add_argument("--dims", type=_positive_int, default=None,
                       help="keep the first K dimensions (re-normalised)")
        p.add_argument("--batch-size", type=_positive_int, default=64)
        p.add_argument("--device", type=_device, default=None,
                       help="cpu | cuda | cuda:N (default: cuda when available)")
        p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                       help="encoder weights while encoding (auto: bf16 on CUDA, fp32 on CPU)")
        p.add_argument("--quantize", default=None, choices=("int8",),
                       help="int8 (CPU, fp32): dynamic int8 linear layers on torch, static int8 (NNCF, calibrated "
                            "on the first 300 sentences) on openvino")
        p.add_argument("--backend", default="torch", choices=("torch", "openvino"),
                       help="what runs the transformer: torch, or OpenVINO on the CPU (converted once, cached)")
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
            p.add_argument("--layers", type=_ints, default=None,
                           help="grid: layer counts, e.g. 2,4,6 (default: full depth)")
            p.add_argument("--grid-dims", dest="dims_grid", type=_ints, default="32,64,128,256,384",
                           help="grid: dims")
            p.add_argument("--vector-types", default="float32,int8,binary", help="grid: vector types")
            p.add_argument("--dim-method", default="pca", choices=("pca", "truncate"),
                           help="grid: post-hoc PCA, or prefixes (Matryoshka-trained models)")
            p.add_argument("--corpus", default=None, help="grid: sentences to fit PCA / int8 on (one per line)")
            p.add_argument("--fit-sentences", type=_positive_int, default=5000)
            p.add_argument("--output-dir", default="data/reports", help="grid: where grid.json/.md/.png go")
            p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("ir", help="retrieval recall@10 / MRR@10 (SNLI test premises, STS-B dev >= 4) over a "
                                  ">= 100k-sentence corpus of the shared data")
    p.add_argument("--model", required=True, help="Hub id or a directory this project saved")
    p.add_argument("--max-corpus", type=_positive_int, default=0,
                   help="cap the corpus at N sentences (every positive kept), for quick runs")
    p.add_argument("--data", default=None, help="a SentEval directory (default: the shared data's senteval/)")
    p.add_argument("--json", default="data/reports/ir.json", help="where the JSON result is written")
    p.add_argument("--batch-size", type=_positive_int, default=128)
    p.add_argument("--device", type=_device, default=None, help="cpu | cuda | cuda:N (default: cuda when available)")
    p.set_defaults(func=_cmd_ir)

    p = sub.add_parser("analyse", help="analyses of one model: dev Spearman of prefixes, intrinsic dim and "
                                       "isotropy, whitening x (dev STS, SentEval transfer)")
    p.add_argument("--model", required=True, help="Hub id or a directory this project saved")
    p.add_argument("--config", default="params.yaml", help="params.yaml: data and the evaluate.analyses_* / "
                                                         "transfer_* settings")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a params value, e.g. evaluate.transfer_max_sentences=500 (repeatable)")
    p.add_argument("--out", default="data/reports/analyses", help="where analyses.json/.md/*.png go")
    p.add_argument("--device", type=_device, default=None, help="cpu | cuda | cuda:N")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    p.add_argument("--quantize", default=None, choices=("int8",))
    p.add_argument("--backend", default="torch", choices=("torch", "openvino"))
    p.add_argument("--token-budget", type=_token_budget, default="auto")
    p.set_defaults(func=_cmd_analyse)

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

    p = sub.add_parser("defsent-glosses", help="DefSent+: export WordNet's glosses (lemma, pos, synset, gloss) "
                                               "as a parquet file for data.definitions")
    p.add_argument("--wordnet-dir", default="/usr/share/wordnet",
                   help="the dict directory holding data.noun, data.verb, data.adj, data.adv")
    p.add_argument("--output", required=True, help="the .parquet file to write")
    p.set_defaults(func=_cmd_defsent_glosses)

    p = sub.add_parser("soup", help="merge the best checkpoints of several training runs; keep the best on dev")
    p.add_argument("runs", nargs="+", help="training run directories (best/, start/) from one config seed")
    p.add_argument("--out", required=True, help="the merged checkpoint directory")
    p.add_argument("--methods", default="uniform,greedy,fusion", help="merge methods to try (comma-joined)")
    p.add_argument("--p", type=_non_negative_float, default=1.0, help="delta-guided fusion exponent")
    p.add_argument("--batch-size", type=_positive_int, default=64)
    p.add_argument("--config", default="params.yaml", help="the pipeline params: dev pairs come from its data root")
    p.set_defaults(func=_cmd_soup)

    p = sub.add_parser("push", help="upload a model folder (e.g. data/models/champion, with its model card) to "
                                    "the Hugging Face Hub")
    p.add_argument("--model", required=True, help="the model folder (config.json and README.md inside)")
    p.add_argument("--repo-id", required=True, help="the Hub model repo, user/name or org/name (created if missing)")
    p.add_argument("--token", default=None, help="a Hub write token (default: HF_TOKEN or `hf auth login`)")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--dry-run", action="store_true", help="list what would be uploaded; no network")
    p.set_defaults(func=_cmd_push)

    p = sub.add_parser("export", help="export a model folder (e.g. data/models/champion) for onnxruntime")
    p.add_argument("--model", required=True, help="a model directory the pipeline wrote (or an HF folder)")
    p.add_argument("--format", choices=["onnx"], default="onnx", help="the export format")
    p.add_argument("--out", required=True, help="the export folder (model.onnx, tokenizer, mixsp_onnx.json)")
    p.add_argument("--int8", action="store_true", help="also write model_int8.onnx (int8 weights)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("restore", help="bring back an earlier pipeline run's DVC outputs (champion included) "
                                       "from a git commit's dvc.lock or an MLflow / Dagster run id")
    p.add_argument("ref", help="a git commit whose dvc.lock is in history, or an MLflow run id (the training run "
                               "or any run of that pipeline run), or a Dagster run id")
    p.add_argument("--repo", default=".", help="the repository (dvc.yaml, dvc.lock) to restore into")
    p.add_argument("--tracking-uri", default=None, help="the MLflow store (default: MLFLOW_TRACKING_URI or mlflow.db)")
    p.add_argument("--no-pull", action="store_true", help="only the local DVC cache; never fetch from the remote")
    p.add_argument("--force", action="store_true", help="overwrite outputs that differ from dvc.lock (uncommitted)")
    p.set_defaults(func=_cmd_restore)

    for stage, helptext, func in (
            ("compress", "compress stage: PCA / int8 variants of the student (params.yaml)", _cmd_compress),
            ("merge", "merge stage: soups and delta-guided fusion of the run's snapshots", _cmd_merge),
            ("promote", "promote stage: register the evaluated best; move 'champion' if better", _cmd_promote)):
        p = sub.add_parser(stage, help=helptext)
        p.add_argument("--config", default="params.yaml")
        p.set_defaults(func=func)
    _add_debug_flag(parser, sub)
    return parser


def _add_debug_flag(parser: argparse.ArgumentParser, sub: argparse._SubParsersAction) -> None:
    """``--debug`` before or after the subcommand: show the traceback of a user error too."""
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    for command in sub.choices.values():  # SUPPRESS: an absent flag does not reset one given before the command
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="show the traceback of an error")


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand. Exit 0 when it did its work; 1 when it ran and its check said no (``validate`` on
    invalid data, a failing data validation, the model gate); 2 for a user error (a bad argument, config value,
    input file or model folder, a failed write): one line ``mixsp <cmd>: error: ...`` on stderr, no traceback
    unless ``--debug``. Anything else is a bug and shows its traceback."""
    from mixsp_core.errors import MixSPError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (MixSPError, OSError) as err:  # OSError: a missing file, no permission, a full disk
        if args.debug:
            traceback.print_exc()
        print(f"mixsp {args.command}: error: {err}", file=sys.stderr)
        return int(getattr(err, "exit_code", USAGE_ERROR))


if __name__ == "__main__":
    sys.exit(main())
