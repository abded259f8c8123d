"""Bounded memory of `mixsp encode` (issue 18): peak RSS, wall time and sentences/s of the real CLI encoding a
large sentence file on the CPU, in a fresh process; one markdown row on stdout, JSON on disk.

    python -m benchmarks.streaming_bench [--sentences 1000000] [--model HUB_ID_OR_DIR] [--batch-size 64]
                                         [--device cpu] [--check-rows 256] [--in-memory N]
                                         [--out data/reports/streaming_bench.json]

The input cycles the lines of the shipped corpus (benchmarks/data/corpus-100k.txt.gz) up to ``--sentences``
lines, written into a temporary folder with the output. Peak RSS is the child's own ``ru_maxrss`` (``wait4``),
and the RSS is sampled (psutil) while it runs, so the JSON shows whether memory grows with the rows
written. The output is checked: its shape, and ``--check-rows`` rows drawn at random against an in-memory
encode of their sentences (equal up to float rounding: the batches differ). ``--in-memory N`` also
measures the old approach (every line read into a list, one (N, dim) matrix, ``np.save``) at N sentences.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.corpus import REPO_ROOT, SHIPPED_CORPUS, read_sentences

DEFAULT_OUT = REPO_ROOT / "data" / "reports" / "streaming_bench.json"
DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
RSS_LIMIT = 1 << 30  # issue 18: a million sentences under 1 GB peak RSS on the CPU
SAMPLE_SECONDS = 0.5  # RSS polling period; the timeline keeps one sample per TIMELINE_SECONDS
TIMELINE_SECONDS = 10.0
MATCH_ATOL = 1e-5  # rows against an in-memory encode of the same sentences: other batches, float rounding only

# the encode before streaming (mixsp_core.cli._cmd_encode until issue 18), for the comparison row
IN_MEMORY_ENCODE = """
import sys
import numpy as np
from mixsp_core.data.corpus import read_corpus
from mixsp_core.models.checkpoint import load_embedder
source, output, model, device, batch_size = sys.argv[1:6]
sentences = read_corpus(source, allow_empty_lines=False)
vectors = np.asarray(load_embedder(model, device=device).encode(sentences, batch_size=int(batch_size)),
                     dtype=np.float32)
with open(output, "wb") as fh:
    np.save(fh, vectors, allow_pickle=False)
print(f"{output}: {vectors.shape[0]} x {vectors.shape[1]} float32")
"""


def write_cycled_corpus(path: Path, n: int, corpus: Path = SHIPPED_CORPUS) -> tuple[list[str], Path]:
    """``n`` lines cycling the sentences of ``corpus`` into ``path``, streamed; line i is ``pool[i % len(pool)]``.
    Returns the pool (for the sample check) and ``path``."""
    pool = read_sentences(corpus)
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        fh.writelines(s + "\n" for s in itertools.islice(itertools.cycle(pool), n))
    return pool, path


# offline, the packaged model, no tokenizer fork warnings: for the child and for this process's own check encode
OFFLINE_ENV = (("HF_HUB_OFFLINE", "1"), ("MIXSP_PREFER_PACKAGED", "1"), ("TOKENIZERS_PARALLELISM", "false"),
               ("HF_HUB_DISABLE_PROGRESS_BARS", "1"))


def child_env() -> dict[str, str]:
    """The benchmark's environment for the child (:data:`OFFLINE_ENV` unless already set)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    for key, value in OFFLINE_ENV:
        env.setdefault(key, value)
    return env


def run_measured(command: list[str], log: Path, timeout: float) -> dict[str, Any]:
    """Run ``command`` (its stdout and stderr into ``log``, not memory); its exit code, wall seconds, peak RSS
    (the kernel's ``ru_maxrss`` of this child alone, via ``wait4``) and an RSS timeline polled with psutil."""
    try:
        import psutil
    except ImportError:  # the peak still comes from wait4; only the timeline is lost
        psutil = None
    start = time.perf_counter()
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, cwd=REPO_ROOT, env=child_env(), stdout=out, stderr=subprocess.STDOUT)
    handle = psutil.Process(proc.pid) if psutil is not None else None
    timeline: list[tuple[float, float]] = []
    polled_peak = tree_peak = 0
    try:
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)  # not Popen.poll: it would drop the rusage
            if pid:
                break
            elapsed = time.perf_counter() - start
            if elapsed > timeout:
                raise TimeoutError(f"{command[0]}: still running after {timeout:.0f} s (log: {log})")
            if handle is not None:
                with contextlib.suppress(psutil.Error):  # exited between wait4 and the read
                    rss = handle.memory_info().rss
                    polled_peak = max(polled_peak, rss)
                    # helper processes (a tokenizer pool) are memory of the encode too: not in its ru_maxrss
                    tree_peak = max(tree_peak, rss + sum(_rss(child) for child in handle.children(recursive=True)))
                    if not timeline or elapsed - timeline[-1][0] >= TIMELINE_SECONDS:
                        timeline.append((round(elapsed, 1), round(rss / 2**20, 1)))
            time.sleep(SAMPLE_SECONDS)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4: Popen must not wait for it again
    wall = time.perf_counter() - start
    return {"exit_code": proc.returncode, "wall_s": round(wall, 2),
            "peak_rss_bytes": usage.ru_maxrss * 1024,  # Linux reports KiB
            "polled_peak_rss_bytes": polled_peak or None, "polled_peak_tree_rss_bytes": tree_peak or None,
            "rss_timeline_mb": timeline}


def _rss(process) -> int:
    """A process's RSS, 0 once it has gone."""
    import psutil

    try:
        return process.memory_info().rss
    except psutil.Error:
        return 0


def check_output(path: Path, pool: list[str], n: int, model: str, device: str, batch_size: int,
                 rows: int, seed: int) -> dict[str, Any]:
    """The output's shape, and ``rows`` random rows against an in-memory encode of their sentences."""
    from mixsp_core.models.checkpoint import load_embedder

    matrix = np.load(path, mmap_mode="r")  # a mapped file: the check holds the sampled rows only
    report: dict[str, Any] = {"shape": list(matrix.shape), "dtype": str(matrix.dtype)}
    picked = np.sort(np.random.default_rng(seed).choice(n, size=min(rows, n), replace=False)) if n else np.zeros(0, int)
    expected = load_embedder(model, device=device).encode([pool[i % len(pool)] for i in picked],
                                                          batch_size=batch_size, show_progress=False)
    got = np.asarray(matrix[picked], dtype=np.float32)
    report["checked_rows"] = len(picked)
    report["max_abs_diff"] = float(np.abs(got - expected).max()) if len(picked) else 0.0
    report["rows_match"] = bool(matrix.shape == (n, expected.shape[1]) and report["max_abs_diff"] <= MATCH_ATOL)
    return report


def measure(name: str, command: list[str], output: Path, workdir: Path, pool: list[str], n: int,
            args: argparse.Namespace) -> dict[str, Any]:
    """One measured run of ``command`` (writing ``output``) and the check of what it wrote."""
    log = workdir / f"{name}.log"
    print(f"{name}: {n:,} sentences ...", file=sys.stderr, flush=True)
    result = run_measured(command, log, args.timeout)
    result.update(variant=name, sentences=n, rate=round(n / result["wall_s"], 1) if result["wall_s"] else None)
    if result["exit_code"] != 0:
        tail = log.read_bytes()[-4000:].decode("utf-8", "replace")
        raise SystemExit(f"{name}: exit {result['exit_code']}; the end of its log:\n{tail}")
    result["output_bytes"] = output.stat().st_size
    result["check"] = check_output(output, pool, n, args.model, args.device, args.batch_size, args.check_rows,
                                   args.seed)
    output.unlink()  # the next run's disk space
    print(f"{name}: {result['rate']:,.0f} sent/s, peak RSS {result['peak_rss_bytes'] / 2**20:,.0f} MB, "
          f"{result['wall_s']:,.0f} s", file=sys.stderr, flush=True)
    return result


def markdown(report: dict[str, Any]) -> str:
    """benchmarks.run's table layout: one row per measured run, notes below."""
    lines = ["| section | model / item | variant | result | vs sentence-transformers | memory / size | notes |",
             "| --- | --- | --- | ---: | ---: | ---: | --- |"]
    for r in report["runs"]:
        check = r["check"]
        verdict = "rows match" if check["rows_match"] else "ROWS DIFFER"
        lines.append(
            f"| encode file (sent/s) | {report['model_label']} | {r['variant']} | {r['rate']:,.0f} | - | "
            f"{r['peak_rss_bytes'] / 2**20:,.0f} MB peak RSS | {r['sentences']:,} sent, {r['wall_s']:,.0f} s wall "
            f"(model load and counting pass included), batch {report['batch_size']}, {report['device']}; output "
            f"{check['shape'][0]:,} x {check['shape'][1]} {check['dtype']} ({r['output_bytes'] / 2**30:.2f} GiB); "
            f"{verdict} ({check['checked_rows']} sampled, max diff {check['max_abs_diff']:.1e}) |")
    notes = [f"- {n}" for n in report["notes"]]
    return "\n".join(lines + ([""] + notes if notes else []))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.streaming_bench", description=__doc__.split("\n")[0])
    p.add_argument("--sentences", type=int, default=1_000_000, help="lines of the input file")
    p.add_argument("--model", default=DEFAULT_MODEL, help="Hub id (resolved offline to the packaged copy) or folder")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--check-rows", type=int, default=256, help="output rows compared with an in-memory encode")
    p.add_argument("--in-memory", type=int, default=0, metavar="N",
                   help="also measure the old in-memory encode at N sentences, and streaming at N (0: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=4 * 3600.0, help="seconds per run")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="JSON report path")
    return p


def main(argv: list[str] | None = None) -> int:
    from benchmarks.run import machine_info
    from mixsp_core.io import write_json_atomic

    args = build_parser().parse_args(argv)
    for key, value in OFFLINE_ENV:  # the sample check loads the model here too, before huggingface_hub is imported
        os.environ.setdefault(key, value)
    if args.sentences < 1 or args.in_memory < 0 or args.check_rows < 1:
        raise SystemExit("--sentences and --check-rows must be positive, --in-memory at least 0")
    mixsp = Path(sys.executable).parent / "mixsp"  # the venv's console script: the real CLI
    if not mixsp.is_file():
        raise SystemExit(f"{mixsp}: no mixsp command beside {sys.executable} (make install)")
    info = machine_info(args.device)
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="mixsp-stream-bench-") as tmp:
        workdir = Path(tmp)
        sizes = [args.sentences] + ([args.in_memory] if args.in_memory else [])
        for n in dict.fromkeys(sizes):
            pool, source = write_cycled_corpus(workdir / f"sentences-{n}.txt", n)
            output = workdir / f"vectors-{n}.npy"
            encode = [str(mixsp), "encode", "--model", args.model, "--input", str(source), "--output", str(output),
                      "--device", args.device, "--batch-size", str(args.batch_size)]
            runs.append(measure("mixsp encode (streamed)", encode, output, workdir, pool, n, args))
            if n == args.in_memory:
                old = [sys.executable, "-c", IN_MEMORY_ENCODE, str(source), str(output), args.model, args.device,
                       str(args.batch_size)]
                runs.append(measure("in-memory encode (before issue 18)", old, output, workdir, pool, n, args))
            source.unlink()
    notes = []
    main_run = runs[0]
    peak = max(main_run["peak_rss_bytes"], main_run["polled_peak_tree_rss_bytes"] or 0)  # its helpers count too
    under = peak < RSS_LIMIT
    notes.append(f"peak RSS {'under' if under else 'OVER'} 1 GB at {main_run['sentences']:,} sentences: "
                 f"{main_run['peak_rss_bytes'] / 2**20:,.0f} MB (ru_maxrss of the child; polled peak "
                 f"{(main_run['polled_peak_rss_bytes'] or 0) / 2**20:,.0f} MB; with its child processes "
                 f"{(main_run['polled_peak_tree_rss_bytes'] or 0) / 2**20:,.0f} MB)")
    timeline = main_run["rss_timeline_mb"]
    if len(timeline) >= 4:  # flat after the start when memory does not grow with the rows written
        quarters = np.array_split(np.array([rss for _, rss in timeline]), 4)
        notes.append("RSS peak by quarter of the streamed run: "
                     + ", ".join(f"{q.max():,.0f}" for q in quarters) + " MB")
    if hasattr(os, "getloadavg"):
        info["load_average_end"] = os.getloadavg()
        notes.append(f"load average at start {info['load_average_start'][0]:.1f}, at end "
                     f"{info['load_average_end'][0]:.1f} on {info['cpu_count']} cores ({info['cpu']})")
    report: dict[str, Any] = {
        "model": args.model, "model_label": args.model.rstrip("/").split("/")[-1], "device": args.device,
        "batch_size": args.batch_size, "corpus": str(SHIPPED_CORPUS.relative_to(REPO_ROOT)),
        "rss_limit_bytes": RSS_LIMIT, "machine": info, "runs": runs, "notes": notes,
    }
    text = markdown(report)
    print(text)
    report["markdown"] = text
    out = write_json_atomic(args.out, report)
    print(f"\nJSON: {out}", file=sys.stderr)
    return 0 if under and all(r["check"]["rows_match"] for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
