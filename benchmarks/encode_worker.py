"""One timed encode in a fresh process: ``python -m benchmarks.encode_worker JOB.json``.

A fresh process per measurement keeps the sides apart (allocator state, thread pools, caches) and
gives a clean peak-memory figure. The job file names the side (``st``: sentence-transformers,
``mixsp``: what ``mixsp encode`` runs, ``peer``: ``job["peer"]`` of :mod:`benchmarks.peers`, started with the
bench venv's python), the model folder, the sentence file and the settings. The worker loads the model, warms
it up on a few sentences, times one ``encode`` of all sentences (text in, L2-normalised float32 vectors out)
and prints one line ``RESULT {json}``. ``job["task"]`` other than ``time``: ``sweep`` (rates at several batch
sizes, one load), ``quality`` (dev Spearman), ``export`` (the peers' cache folders).

The ``peer`` side and those tasks import only torch, numpy, sentence-transformers and pure-Python project code,
all present in the bench venv.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """Resident memory of this process (Linux ``/proc/self/statm``; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


class PeakRSS:
    """Samples RSS every ``interval`` seconds on a thread while in the ``with`` block."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.start = self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss_bytes())

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def load_side(job: dict[str, Any]):
    """The loaded model, and ``encode(sentences, batch_size=job's) -> np.ndarray`` of it."""
    device, batch = job["device"], int(job["batch_size"])
    folder = Path(job["model_dir"])
    if job["side"] in ("st", "peer"):
        if job["side"] == "peer":  # a sentence-transformers backend of the bench venv (benchmarks/peers.py)
            from benchmarks.peers import load_peer

            model = load_peer(job)
        else:
            from sentence_transformers import SentenceTransformer

            if job.get("student"):
                folder = Path(job["st_dir"])  # the student's base encoder exported as an HF folder
            model = SentenceTransformer(str(folder), device=device)
            if job.get("precision") == "fp16":
                model.half()
        return model, lambda s, batch_size=batch: model.encode(s, batch_size=batch_size, normalize_embeddings=True,
                                                               convert_to_numpy=True, show_progress_bar=False)
    if job.get("student"):
        from mixsp_core.models.checkpoint import load_embedder

        # a trained checkpoint: precision / quantize / backend as `mixsp encode` passes them (OpenVINO int8
        # calibrates on the warm-up sentences, the first the student is given)
        model = load_embedder(str(folder), device=device, precision=job.get("precision") or "auto",
                              quantize=job.get("quantize"), backend=job.get("backend") or "torch")
        return model, lambda s, batch_size=batch: model.encode(s, batch_size=batch_size, show_progress=False)
    from mixsp_core.models.encoder import Encoder

    budget = job.get("token_budget", "auto")
    model = Encoder(folder, device=device, show_progress=False, precision=job.get("precision", "auto"),
                    quantize=job.get("quantize"), token_budget=budget, backend=job.get("backend") or "torch")
    if job.get("calibration"):  # OpenVINO int8: the peers' calibration sentences, not the timed ones
        model.calibration = Path(job["calibration"]).read_text(encoding="utf-8").split("\n")[:-1]
    return model, lambda s, batch_size=batch: model.encode(s, batch_size=batch_size)


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Load, warm up, time one encode; return the measurement (and save vectors when asked)."""
    import torch

    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    sentences = Path(job["sentences"]).read_text(encoding="utf-8").split("\n")[:-1]
    cuda = job["device"].startswith("cuda")
    t0 = time.perf_counter()
    model, encode = load_side(job)
    load_s = time.perf_counter() - t0
    warm = sentences[: int(job.get("warmup", 256))]
    if warm:
        encode(warm)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        vectors = encode(sentences)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.shape[0] != len(sentences):
        raise RuntimeError(f"{job['side']}: {vectors.shape[0]} vectors for {len(sentences)} sentences")
    result = {
        "side": job["side"], "seconds": seconds, "sentences": len(sentences), "rate": len(sentences) / seconds,
        "load_seconds": load_s, "dim": int(vectors.shape[1]), "threads": torch.get_num_threads(),
        "rss_delta_bytes": max(0, rss.peak - rss.start), "rss_peak_bytes": rss.peak,
        "norm_min": float(np.linalg.norm(vectors, axis=1).min()),
    }
    if cuda:
        result["cuda_peak_bytes"] = int(torch.cuda.max_memory_allocated() - before)
    if job["side"] == "peer":
        from benchmarks.peers import runtime_info

        result["runtime"] = runtime_info(model, job["peer"])
        result["threads"] = result["runtime"]["threads"]  # the runtime's pool, not torch's; None: its default
    if job.get("save_vectors"):
        queries = Path(job["queries"]).read_text(encoding="utf-8").split("\n")[:-1] if job.get("queries") else []
        np.savez(job["save_vectors"], corpus=vectors,
                 queries=np.asarray(encode(queries), dtype=np.float32) if queries else np.zeros((0, vectors.shape[1])))
    return result


def run_sweep(job: dict[str, Any]) -> dict[str, Any]:
    """One load, then one timed encode of the sentences at each of ``job["sweep"]`` batch sizes."""
    sentences = Path(job["sentences"]).read_text(encoding="utf-8").split("\n")[:-1]
    _, encode = load_side(job)
    encode(sentences[: int(job.get("warmup", 128))])
    rates = {}
    for size in job["sweep"]:
        t0 = time.perf_counter()
        encode(sentences, int(size))
        rates[str(size)] = len(sentences) / (time.perf_counter() - t0)
    return {"side": job["side"], "peer": job.get("peer"), "sentences": len(sentences), "rates": rates}


def run_quality(job: dict[str, Any]) -> dict[str, Any]:
    """STS-B dev / SICK trial Spearman of the job's model (``job["senteval"]``), as ``mixsp evaluate``."""
    from benchmarks.quality import dev_pairs, dev_scores

    model, _ = load_side(job)
    pairs = dev_pairs(job["senteval"])
    return {**dev_scores(model, pairs, job.get("peer") or job["model_dir"]), "pairs": int(len(pairs))}


def run_export(job: dict[str, Any]) -> dict[str, Any]:
    """Build (or find) the cache folder of each of ``job["peers"]`` for the job's model; not timed."""
    from benchmarks.peers import PEERS, export_peer

    calibration = Path(job["sentences"]).read_text(encoding="utf-8").split("\n")[:-1]
    return {key: export_peer(Path(job["model_dir"]), job["name"], PEERS[key], calibration,
                             log=lambda m: print(m, file=sys.stderr, flush=True)) for key in job["peers"]}


TASKS = {"time": run_job, "sweep": run_sweep, "quality": run_quality, "export": run_export}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m benchmarks.encode_worker JOB.json", file=sys.stderr)
        return 2
    job = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    print("RESULT " + json.dumps(TASKS[job.get("task", "time")](job)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
