"""`make bench`: encode throughput and peak memory, mixsp against sentence-transformers, plus retrieval
at 128 vs full dimensions and the pipeline's stage times; one markdown table on stdout, JSON on disk.

    python -m benchmarks.run [--device cpu|cuda] [--models minilm,student,mpnet] [--sentences N]
                             [--repeats R] [--batch-size B] [--student DIR] [--random-init]
                             [--corpus FILE] [--write-corpus FILE] [--out data/reports/bench.json]

Each encode figure is the median (min-max) of ``--repeats`` measurements, each in a fresh process
(see :mod:`benchmarks.encode_worker`), the sides alternating within a repeat on the same sentences;
the ratio to sentence-transformers is taken per repeat, then summarised. CPU defaults are sized to
finish in about ten minutes on two cores (4,000 sentences for the small models, 1,000 for the
teacher, sampled from the corpus); ``--sentences`` sets one size for all.

On the CPU, ``--peers`` models are also run through sentence-transformers' own torch, ONNX (plain, O3, dynamic
int8) and OpenVINO (plain, static int8) backends (:mod:`benchmarks.peers`), in the bench venv
(``--peer-python``), each at our batch size and at its best of ``--batch-sweep``, with its dev Spearman.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.corpus import REPO_ROOT, default_senteval_dir, load_pool, sample, write_sentences
from benchmarks.models import (
    ModelSpec,
    encoder_config,
    flops_per_sentence,
    model_dir,
    parse_models,
    peak_bf16_tflops,
)
from benchmarks.peers import BENCH_PYTHON, CALIBRATION_SENTENCES, PEERS
from benchmarks.quality import SETTINGS as QUALITY_SETTINGS
from benchmarks.stats import fmt_range, ratio_summary, summary

DEFAULT_OUT = REPO_ROOT / "data" / "reports" / "bench.json"
CPU_SENTENCES = {"minilm": 4000, "student": 4000, "mpnet": 1000}
CUDA_SENTENCES = 100_000
QUERIES = 500


@dataclass(frozen=True)
class Variant:
    """One measured configuration: ``side`` st or mixsp, and its settings."""

    name: str
    side: str
    precision: str | None = None
    quantize: str | None = None
    token_budget: int | str | None = None
    baseline: str | None = None  # the st variant its ratio is taken against
    peer: str | None = None  # side "peer": a key of benchmarks.peers.PEERS
    batch_size: int | None = None  # None: --batch-size
    backend: str = "torch"  # side mixsp: what runs the transformer (torch, openvino)


@dataclass
class ModelRun:
    spec: ModelSpec
    folder: Path
    sentences: list[str]
    mean_tokens: float
    padding: dict[str, float]
    variants: list[Variant]
    results: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    peer_info: dict[str, Any] = field(default_factory=dict)  # per peer: its export, sweep rates, best batch, dev
    calibration: list[str] = field(default_factory=list)  # the static int8 calibration sentences (peers and ours)


def variants_for(spec: ModelSpec, device: str, int8: bool) -> list[Variant]:
    """What to measure for one model on ``device``."""
    if device.startswith("cuda"):
        if spec.hub_id is None:
            return [Variant("st fp16", "st", "fp16"), Variant("mixsp", "mixsp", baseline="st fp16")]
        # mixsp as `mixsp encode` runs on CUDA: bf16, batches sized by a token budget (64k tokens)
        return [
            Variant("st fp32", "st"),
            Variant("st fp16", "st", "fp16"),
            Variant("mixsp bf16", "mixsp", "bf16", token_budget="auto", baseline="st fp16"),
        ]
    out = [Variant("st fp32", "st"), Variant("mixsp fp32", "mixsp", "fp32", token_budget=None, baseline="st fp32")]
    if int8 and spec.hub_id is not None:
        out.append(Variant("mixsp int8", "mixsp", "fp32", quantize="int8", token_budget=None, baseline="st fp32"))
        out.append(Variant("mixsp bf16", "mixsp", "bf16", token_budget=None, baseline="st fp32"))
    # `mixsp encode --backend openvino [--quantize int8]`, for the trained student too
    out.append(Variant("mixsp openvino fp32", "mixsp", "fp32", token_budget=None, baseline="st fp32",
                       backend="openvino"))
    if int8:
        out.append(Variant("mixsp openvino int8", "mixsp", "fp32", quantize="int8", token_budget=None,
                           baseline="st fp32", backend="openvino"))
    return out


# --------------------------------------------------------------------------- preparing inputs


def token_stats(folder: Path, sentences: list[str], batch_size: int) -> tuple[float, dict[str, float]]:
    """Mean tokens per sentence, and padded tokens per real token for sentence-transformers' batches
    (character-length order) vs exact-length batches (none)."""
    from transformers import AutoTokenizer

    source = folder / "encoder" if (folder / "encoder" / "config.json").is_file() else folder
    tok = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    lengths = np.array([len(x) for x in tok(sentences, truncation=True, max_length=256)["input_ids"]])
    order = np.argsort([-len(s) for s in sentences], kind="stable")
    padded = sum(int(lengths[order[i:i + batch_size]].max()) * len(order[i:i + batch_size])
                 for i in range(0, len(order), batch_size))
    return float(lengths.mean()), {"st_char_sorted": padded / lengths.sum() - 1.0, "mixsp_exact_length": 0.0}


def export_student_backbone(student: Path, target: Path) -> Path:
    """The student's base encoder as a plain HF folder, for sentence-transformers (mean pooling)."""
    from mixsp_core.models.checkpoint import load_checkpoint

    model = load_checkpoint(student, device="cpu")
    model.encoder.save_pretrained(target, safe_serialization=True)
    model.tokenizer.save_pretrained(target)
    return target


def find_student(explicit: str | None) -> Path | None:
    """``--student`` when given; else the first bi checkpoint under data/models (champion first)."""
    if explicit:
        path = Path(explicit)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"--student {path}: no config.json (not a checkpoint directory)")
        return path
    models = REPO_ROOT / "data" / "models"
    candidates = sorted(models.glob("champion*")) + sorted(models.glob("*")) if models.is_dir() else []
    for path in candidates:
        cfg = path / "config.json"
        if cfg.is_file():
            try:
                if json.loads(cfg.read_text(encoding="utf-8")).get("mixsp_kind") == "bi":
                    return path
            except ValueError:
                continue
    return None


# --------------------------------------------------------------------------- measuring


def run_worker(job: dict[str, Any], workdir: Path, timeout: float, python: str | None = None) -> dict[str, Any]:
    """Run one measurement in a fresh Python process (``python``: another venv's interpreter, the bench venv's
    for the peers; default this one); its ``RESULT`` line as a dict."""
    job_file = Path(tempfile.mkstemp(dir=workdir, suffix=".json")[1])
    job_file.write_text(json.dumps(job), encoding="utf-8")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if python:  # the peers never reach the network, and the calibration set's Arrow files stay in workdir
        env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_CACHE": str(workdir / "hf-cache")})
    proc = subprocess.run([python or sys.executable, "-m", "benchmarks.encode_worker", str(job_file)],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"worker failed ({job['side']} {job['model_dir']}), exit {proc.returncode}:\n"
                           f"{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def measure(runs: list[ModelRun], args: argparse.Namespace, workdir: Path, queries: list[str] | None,
            vector_dir: Path | None) -> None:
    """All repeats: per repeat, per model, every variant once (order alternating between repeats)."""
    files = {}
    for run in runs:
        files[run.spec.key] = workdir / f"{run.spec.key}.txt"
        files[run.spec.key].write_text("".join(s + "\n" for s in run.sentences), encoding="utf-8")
    query_file = None
    if queries:
        query_file = workdir / "queries.txt"
        query_file.write_text("".join(s + "\n" for s in queries), encoding="utf-8")
    total = args.repeats * sum(sum(selected(v, args.only) for v in r.variants) for r in runs)
    done = 0
    for rep in range(args.repeats):
        for run in runs:
            order = [v for v in run.variants if selected(v, args.only)]
            order = order if rep % 2 == 0 else order[::-1]
            for v in order:
                save = None
                if vector_dir is not None and rep == args.repeats - 1 and v.side == "mixsp" and not v.quantize \
                        and v.token_budget in (None, "auto") and v.name == _main_variant(run).name:
                    save = str(vector_dir / f"{run.spec.key}.npz")
                job = {
                    "side": v.side, "model_dir": str(run.folder), "device": args.device,
                    "batch_size": v.batch_size or args.batch_size, "sentences": str(files[run.spec.key]),
                    "peer": v.peer, "peer_dir": run.peer_info[v.peer]["export"]["folder"] if v.peer else None,
                    "precision": v.precision, "quantize": v.quantize, "token_budget": v.token_budget,
                    "backend": v.backend, "calibration": _calibration_file(workdir, run, v),
                    "threads": args.threads, "warmup": args.warmup, "student": run.spec.hub_id is None,
                    "st_dir": str(workdir / "student-backbone"), "save_vectors": save,
                    "queries": str(query_file) if save and query_file else None,
                }
                t0 = time.perf_counter()
                result = run_worker(job, workdir, args.worker_timeout, args.peer_python if v.peer else None)
                done += 1
                print(f"[{done}/{total}] {run.spec.label:28s} {v.name:24s} {result['rate']:10,.0f} sent/s "
                      f"({time.perf_counter() - t0:.0f} s with loading)", file=sys.stderr, flush=True)
                run.results.setdefault(v.name, []).append(result)


def selected(v: Variant, only: str) -> bool:
    """Whether ``--only`` (comma list of name parts; '' for all) keeps variant ``v``."""
    parts = [p.strip() for p in only.split(",") if p.strip()]
    return not parts or any(p in v.name for p in parts)


def _calibration_file(workdir: Path, run: ModelRun, v: Variant) -> str | None:
    """OpenVINO int8 of ours: the file of sentences the peers' static int8 is calibrated on (when written)."""
    path = calibration_path(workdir, run.spec.key)
    return str(path) if v.backend == "openvino" and v.quantize and path.is_file() else None


def calibration_path(workdir: Path, key: str) -> Path:
    return workdir / f"{key}-calibration.txt"


# --------------------------------------------------------------------------- peers (sentence-transformers backends)


def peer_variants(best: dict[str, int], ours: int) -> list[Variant]:
    """Each peer at our batch size and, where another size swept faster, at its best."""
    out = []
    for key, peer in PEERS.items():
        if key not in best:  # not among --peer-keys
            continue
        sizes = [ours] + ([best[key]] if best[key] != ours else [])
        out += [Variant(f"{peer.label} b{b}", "peer", peer=key, batch_size=b, baseline="st fp32") for b in sizes]
    return out


def prepare_peers(run: ModelRun, args: argparse.Namespace, workdir: Path, pool: list[str], senteval: Path,
                  notes: list[str]) -> None:
    """In the bench venv: export the peers once into data/bench_cache/ (not timed), sweep each one's batch size
    on a slice of the sentences (one process each, one pass per size), read each one's dev Spearman; then add
    the variants."""
    _, used = sample(pool, len(run.sentences), args.seed)
    spare = len(pool) - len(set(used.tolist())) >= CALIBRATION_SENTENCES
    calibration, _ = sample(pool, CALIBRATION_SENTENCES, args.seed + 2, exclude=used if spare else None)
    if not spare:
        notes.append("openvino int8 static: calibrated on benchmarked sentences (the corpus has too few others)")
    base = {"side": "peer", "model_dir": str(run.folder), "device": args.device, "threads": args.threads,
            "warmup": args.warmup, "batch_size": args.batch_size}
    cal_file = write_sentences(calibration, calibration_path(workdir, run.spec.key))
    run.calibration = list(calibration)
    t0 = time.perf_counter()
    keys = [k for k in PEERS if k in args.peer_keys.split(",")]
    exports = run_worker({**base, "task": "export", "name": run.spec.key, "peers": keys,
                          "sentences": str(cal_file)}, workdir, args.worker_timeout, args.peer_python)
    print(f"peers of {run.spec.label} ready ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    sweep_file = write_sentences(run.sentences[: args.sweep_sentences], workdir / f"{run.spec.key}-sweep.txt")
    sizes = [int(x) for x in args.batch_sweep.split(",") if x.strip()]
    for key in keys:
        peer = PEERS[key]
        job = {**base, "peer": key, "peer_dir": exports[key]["folder"]}
        rates = run_worker({**job, "task": "sweep", "sweep": sizes, "sentences": str(sweep_file)}, workdir,
                           args.worker_timeout, args.peer_python)["rates"]
        info: dict[str, Any] = {"export": exports[key], "sweep_rates": rates,
                                "best_batch": int(max(rates, key=rates.get))}
        print(f"batch sweep {peer.label:24s} " + "  ".join(f"b{b} {r:,.0f}/s" for b, r in rates.items())
              + f"  -> b{info['best_batch']}", file=sys.stderr, flush=True)
        if args.quality and not args.random_init and senteval.is_dir():
            info["quality"] = run_worker({**job, "task": "quality", "senteval": str(senteval)}, workdir,
                                         args.worker_timeout, args.peer_python)
        run.peer_info[key] = info
    run.variants += peer_variants({k: v["best_batch"] for k, v in run.peer_info.items()}, args.batch_size)
    versions = exports[keys[0]]["versions"]
    notes.append(f"st * b<N> rows: sentence-transformers {versions['sentence-transformers']} with transformers "
                 f"{versions['transformers']}, optimum-onnx {versions['optimum-onnx']}, optimum-intel "
                 f"{versions['optimum-intel']} (onnxruntime {versions['onnxruntime']}, openvino {versions['openvino']})"
                 " in .venv-bench, each at our batch size and at its best of --batch-sweep; `st fp32` is the "
                 "product's own pins, whose transformers is too new for optimum (benchmarks/requirements.txt)")


def add_fastest_ratio(rows: list[dict[str, Any]], results: dict[str, list[dict[str, Any]]]) -> None:
    """Where peer rows exist: every row's per-repeat ratio to the fastest sentence-transformers-side row
    (``st`` or ``peer`` side, by median rate), as ``ratio_fastest`` / ``fastest``."""
    st_rows = [r for r in rows if r["settings"]["side"] in ("st", "peer")]
    if not any(r["settings"]["side"] == "peer" for r in st_rows):
        return
    fastest = max(st_rows, key=lambda r: r["rate"]["median"])
    theirs = [r["rate"] for r in results[fastest["variant"]]]
    for row in rows:
        row["ratio_fastest"] = ratio_summary([r["rate"] for r in results[row["variant"]]], theirs)
        row["fastest"] = fastest["variant"]


def _main_variant(run: ModelRun) -> Variant:
    """The mixsp variant whose vectors feed the retrieval table."""
    return next(v for v in run.variants if v.side == "mixsp")


# --------------------------------------------------------------------------- reporting


def summarise(run: ModelRun, device: str, peak_tflops: float | None) -> dict[str, Any]:
    memory_key = "cuda_peak_bytes" if device.startswith("cuda") else "rss_delta_bytes"
    rows = []
    for v in run.variants:
        res = run.results.get(v.name, [])
        if not res:
            continue
        row: dict[str, Any] = {
            "variant": v.name, "settings": asdict(v),
            "rate": summary([r["rate"] for r in res]),
            "peak_memory_bytes": summary([r.get(memory_key, 0) for r in res]),
            "memory_kind": "torch.cuda.max_memory_allocated" if memory_key.startswith("cuda") else "RSS delta",
            "load_seconds": summary([r["load_seconds"] for r in res]),
            "dim": res[0]["dim"], "threads": res[0]["threads"],
        }
        if v.baseline and run.results.get(v.baseline):
            row["ratio"] = ratio_summary([r["rate"] for r in res], [r["rate"] for r in run.results[v.baseline]])
            row["ratio_to"] = v.baseline
        if "quality" in run.peer_info.get(v.peer or "", {}):
            row["dev"] = run.peer_info[v.peer]["quality"]
        if "runtime" in res[0]:
            row["runtime"] = res[0]["runtime"]
        rows.append(row)
    add_fastest_ratio(rows, run.results)
    out: dict[str, Any] = {"model": run.spec.label, "key": run.spec.key, "folder": str(run.folder),
                           "sentences": len(run.sentences), "mean_tokens": run.mean_tokens,
                           "padding_overhead": run.padding, "variants": rows}
    if run.peer_info:
        out["peers"] = run.peer_info
    if run.config:
        flops = flops_per_sentence(run.config, run.mean_tokens)
        out["flops_per_sentence"] = flops
        if peak_tflops:
            out["bound_sentences_per_s"] = peak_tflops * 1e12 / flops
            out["peak_bf16_tflops"] = peak_tflops
    return out


def markdown(report: dict[str, Any]) -> str:
    """The one table: encode rows, then retrieval rows, then stage rows; notes below it."""
    lines = ["| section | model / item | variant | result | vs sentence-transformers | memory / size | notes |",
             "| --- | --- | --- | ---: | ---: | ---: | --- |"]
    for m in report["encode"]:
        note = f"{m['sentences']:,} sent, mean {m['mean_tokens']:.1f} tok, batch {report['batch_size']}"
        if "bound_sentences_per_s" in m:
            note += f", bound {m['bound_sentences_per_s']:,.0f}/s"
        for row in m["variants"]:
            ratio = f"{fmt_range(row['ratio'], 2)}x vs {row['ratio_to']}" if "ratio" in row else "-"
            if "ratio_fastest" in row:
                fastest = f"{fmt_range(row['ratio_fastest'], 2)}x vs fastest ST ({row['fastest']})"
                ratio = fastest if ratio == "-" else f"{ratio}; {fastest}"
            mem = fmt_range(row["peak_memory_bytes"], 0, 2**20) + " MB"
            batch = row["settings"].get("batch_size")
            extra = note.replace(f"batch {report['batch_size']}", f"batch {batch}") if batch else note
            if row.get("runtime", {}).get("precision"):
                extra += f", runs in {row['runtime']['precision']}"
            if "dev" in row:
                tasks = ", ".join(f"{k} {v:.2f}" for k, v in row["dev"]["tasks"].items())
                extra += f"; dev Spearman {row['dev']['dev']:.2f} ({tasks})"
            if "bound_sentences_per_s" in m:
                extra += f" ({row['rate']['median'] / m['bound_sentences_per_s']:.1%} of bound)"
            lines.append(f"| encode (sent/s) | {m['model']} | {row['variant']} | {fmt_range(row['rate'])} | "
                         f"{ratio} | {mem} | {extra} |")
    retrieval = report.get("retrieval", {})
    for r in retrieval.get("variants", []):
        lines.append(f"| retrieval | {r['name']} | {r['dims']}-d {r['vector_type']} | recall@{retrieval['k']} "
                     f"{r['recall_at_k']:.3f} | {r['qps']:,.0f} QPS | {r['index_bytes'] / 2**20:.2f} MB | "
                     f"{retrieval['corpus']:,} docs, {retrieval['queries']:,} queries, truth: "
                     f"{retrieval['reference_model']} |")
    quality = report.get("quality", {})
    if "fp32" in quality:
        for name in [k for k in quality if k in QUALITY_SETTINGS]:
            tasks = ", ".join(f"{k} {v:.2f}" for k, v in quality[name]["tasks"].items())
            delta = f"{quality['delta'][name]:+.2f} points" if name in quality["delta"] else "-"
            lines.append(f"| dev Spearman | all-MiniLM-L6-v2 | mixsp {name} | {quality[name]['dev']:.2f} | "
                         f"{delta} vs fp32 | - | {tasks} ({quality['pairs']:,} pairs) |")
    stages = report.get("stages", {})
    for s in stages.get("stages", []):
        secs = f"{s['seconds']:.1f} s" if s["seconds"] is not None else "-"
        lines.append(f"| stage time | {s['step']} | run {stages['run_id'][:8]} | {secs} | - | - | {s['status']} |")
    notes = [f"- {n}" for n in report["notes"]]
    return "\n".join(lines + ([""] + notes if notes else []))


def machine_info(device: str) -> dict[str, Any]:
    import sentence_transformers
    import torch
    import transformers

    info: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "sentence_transformers": sentence_transformers.__version__, "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
    }
    try:
        with open("/proc/cpuinfo") as fh:
            info["cpu"] = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), info["cpu"])
    except OSError:
        pass
    if hasattr(os, "getloadavg"):
        info["load_average_start"] = os.getloadavg()
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--models", default="minilm,student,mpnet", help="comma list of minilm, student, mpnet")
    p.add_argument("--student", default=None, help="a trained bi checkpoint directory (default: data/models/*)")
    p.add_argument("--sentences", type=int, default=None,
                   help=f"sentences per measurement (default CPU {CPU_SENTENCES}, CUDA {CUDA_SENTENCES:,})")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=None, help="default 64 on CPU, 256 on CUDA")
    p.add_argument("--threads", type=int, default=None, help="threads in every worker: torch's, and for the peers ONNX Runtime's / OpenVINO's "
                   "(default: each runtime's own)")
    p.add_argument("--warmup", type=int, default=None, help="sentences encoded before timing (CPU 128; CUDA: all of them, one untimed pass, "
                   "so every batch shape's kernels are loaded as in a long-running job)")
    p.add_argument("--random-init", action="store_true",
                   help="random weights from the shipped config.json (speed does not depend on weights)")
    p.add_argument("--corpus", default=None, help="sentence file (.txt or .txt.gz); default: data/corpus/"
                   "corpus.txt, else benchmarks/data/corpus-100k.txt.gz, else built from SentEval")
    p.add_argument("--senteval", default=None, help="SentEval folder for building a corpus")
    p.add_argument("--write-corpus", default=None, metavar="FILE",
                   help="write the sentence pool (or --sentences of it) to FILE (.gz: compressed) and exit")
    p.add_argument("--no-int8", dest="int8", action="store_false", help="skip the CPU int8 and bf16 rows")
    p.add_argument("--no-quality", dest="quality", action="store_false",
                   help="skip the dev Spearman of MiniLM in fp32 / int8 / bf16 and of the peers (CPU)")
    p.add_argument("--no-retrieval", dest="retrieval", action="store_false")
    p.add_argument("--no-stages", dest="stages", action="store_false")
    p.add_argument("--peers", default="minilm",
                   help="CPU: models (comma list) also measured with sentence-transformers' torch / ONNX / OpenVINO "
                   "backends in the bench venv; '' for none")
    p.add_argument("--peer-keys", default=",".join(PEERS),
                   help=f"which peers (comma list of {', '.join(PEERS)}; default all)")
    p.add_argument("--only", default="",
                   help="measure only the variants whose name contains one of these (comma list; '' for all)")
    p.add_argument("--peer-python", default=str(BENCH_PYTHON),
                   help="python of the bench venv the peers run in (`make bench` builds it)")
    p.add_argument("--batch-sweep", default="16,32,64,128", help="batch sizes tried for each peer's best")
    p.add_argument("--sweep-sentences", type=int, default=1000, help="sentences per batch-size trial")
    p.add_argument("--peak-tflops", type=float, default=None, help="bf16 peak of the GPU (default: by its name)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker-timeout", type=float, default=3600.0)
    p.add_argument("--out", default=str(DEFAULT_OUT), help="JSON report path")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cuda = args.device.startswith("cuda")
    if args.repeats < 1:
        raise SystemExit("--repeats must be at least 1")
    args.batch_size = args.batch_size or (256 if cuda else 64)
    args.warmup = args.warmup if args.warmup is not None else (10**9 if cuda else 128)
    specs = parse_models(args.models)
    sizes = {s.key: args.sentences or (CUDA_SENTENCES if cuda else CPU_SENTENCES[s.key]) for s in specs}
    pool, pool_source = load_pool(args.corpus, max(sizes.values()), args.senteval)
    if args.write_corpus:
        out = write_sentences(pool[: args.sentences] if args.sentences else pool, args.write_corpus)
        print(f"{out}: {min(len(pool), args.sentences or len(pool)):,} sentences from {pool_source}")
        return 0
    notes: list[str] = []
    if cuda:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device visible to torch")
    info = machine_info(args.device)
    peak = args.peak_tflops or (peak_bf16_tflops(info.get("gpu", "")) if cuda else None)
    student = find_student(args.student) if any(s.hub_id is None for s in specs) else None
    with tempfile.TemporaryDirectory(prefix="mixsp-bench-") as tmp:
        workdir = Path(tmp)
        runs: list[ModelRun] = []
        for spec in specs:
            if spec.hub_id is None and student is None:
                msg = "student row skipped: no trained checkpoint (pass --student DIR or train one into data/models/)"
                print(msg, file=sys.stderr)
                notes.append(msg)
                continue
            folder = model_dir(spec, args.random_init, workdir, student)
            if spec.hub_id is None:
                export_student_backbone(folder, workdir / "student-backbone")
                notes.append("student: the sentence-transformers side runs only the student's base encoder + "
                             "mean pooling (no routed projector / output layer), so its speed is an upper bound")
            sentences, _ = sample(pool, sizes[spec.key], args.seed)
            mean_tokens, padding = token_stats(folder, sentences, args.batch_size)
            run = ModelRun(spec, folder, sentences, mean_tokens, padding,
                           variants_for(spec, args.device, args.int8), config=encoder_config(folder))
            if spec.key in args.peers.split(",") and spec.hub_id is not None and not cuda:
                if not Path(args.peer_python).is_file():
                    raise SystemExit(f"--peer-python {args.peer_python}: not found; `make bench` builds the bench "
                                     "venv from benchmarks/requirements.txt (or pass --peers '')")
                prepare_peers(run, args, workdir, pool,
                              Path(args.senteval) if args.senteval else default_senteval_dir(), notes)
            runs.append(run)
        queries = None
        vector_dir = None
        if args.retrieval and not args.random_init and runs:
            _, used = sample(pool, max(sizes[r.spec.key] for r in runs), args.seed)
            if len(pool) - len(set(used.tolist())) >= QUERIES:
                queries, _ = sample(pool, QUERIES, args.seed + 1, exclude=used)
                vector_dir = workdir
            else:
                notes.append("retrieval skipped: the corpus has no sentences left for queries")
        measure(runs, args, workdir, queries, vector_dir)
        report: dict[str, Any] = {
            "device": args.device, "batch_size": args.batch_size, "repeats": args.repeats,
            "random_init": args.random_init, "corpus": pool_source, "corpus_size": len(pool), "machine": info,
            "encode": [summarise(r, args.device, peak) for r in runs],
        }
        if vector_dir is not None:
            report["retrieval"] = retrieval_section(runs, vector_dir, queries or [], notes)
        elif args.random_init:
            notes.append("retrieval skipped: random weights give meaningless neighbours")
    if args.quality and not cuda and not args.random_init and args.int8:
        minilm = next((r for r in runs if r.spec.key == "minilm"), None)
        senteval = Path(args.senteval) if args.senteval else default_senteval_dir()
        if minilm is None:
            notes.append("dev cost of int8/bf16: measured on all-MiniLM-L6-v2 only (not in --models)")
        elif not senteval.is_dir():
            notes.append(f"dev cost of int8/bf16: no SentEval folder at {senteval}")
        else:
            from benchmarks.quality import dev_cost

            report["quality"] = dev_cost(minilm.folder, senteval, calibration=minilm.calibration or None)
    if args.stages and not cuda:
        from benchmarks.step_times import stage_times

        report["stages"] = stage_times()
        if "note" in report["stages"]:
            notes.append(f"stage times: {report['stages']['note']}")
    elif args.stages:
        notes.append("stage times: not read on the GPU run (they belong to the CPU pipeline)")
    if hasattr(os, "getloadavg"):
        info["load_average_end"] = os.getloadavg()
        notes.append(f"load average at start {info['load_average_start'][0]:.1f}, at end "
                     f"{info['load_average_end'][0]:.1f} on {info['cpu_count']} cores ({info['cpu']})")
    if cuda and peak is None:
        notes.append(f"no bf16 peak known for {info.get('gpu')}: pass --peak-tflops to get the bound")
    report["notes"] = notes
    text = markdown(report)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report["markdown"] = text
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"\nJSON: {out}", file=sys.stderr)
    return 0


def retrieval_section(runs: list[ModelRun], vector_dir: Path, queries: list[str], notes: list[str]) -> dict[str, Any]:
    """Full-dimension truth (teacher cache, else the widest model benchmarked) vs the others and PCA-128."""
    from benchmarks.retrieval_bench import run_retrieval, teacher_vectors

    vectors: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for run in runs:
        path = vector_dir / f"{run.spec.key}.npz"
        if path.is_file():
            data = np.load(path)
            vectors[run.spec.label] = (data["corpus"], data["queries"])
    if not vectors:
        return {"note": "no vectors saved"}
    largest = max(runs, key=lambda r: len(r.sentences))  # every sample is a prefix of the largest one
    n = len(largest.sentences)
    short = [k for k, (c, _) in vectors.items() if len(c) < n]
    if short:
        notes.append(f"retrieval leaves out {', '.join(short)} (encoded on fewer than {n:,} sentences)")
    vectors = {k: v for k, v in vectors.items() if k not in short}
    teacher = teacher_vectors(largest.sentences[:n] + queries)
    if teacher is not None:
        reference = "teacher all-mpnet-base-v2 (pipeline cache)"
        vectors = {reference: (teacher[:n], teacher[n:]), **{k: v for k, v in vectors.items() if "teacher" not in k}}
    else:
        reference = max(vectors, key=lambda k: vectors[k][0].shape[1])
        notes.append(f"retrieval truth: {reference} (no complete teacher cache for these sentences)")
    report = run_retrieval(vectors, reference)
    if "note" in report:
        notes.append(f"retrieval: {report['note']}")
    return report


if __name__ == "__main__":
    sys.exit(main())
