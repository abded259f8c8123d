"""Compress stage: post-hoc variants of the student's best checkpoint (PCA, whitening, int8 vectors, ...),
each fitted on corpus embeddings and saved as a self-contained model under ``models/compressed/<variant>/``."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mixsp_core.errors import CheckpointError
from mixsp_core.io import claim_output, repair_swap, write_json_atomic
from mixsp_core.params import Params
from mixsp_core.progress import stage_progress
from mixsp_core.stages.prepare import corpus_sample


@dataclass
class CompressResult:
    source: Path
    variants: dict[str, dict[str, Any]]  # name -> {path, spec, steps, output_dim, vector_type, bytes_per_vector}
    fit_sentences: int
    seconds: float

    def summary(self) -> str:
        rows = [f"  {n}: {v['output_dim']} dims {v['vector_type']} ({v['bytes_per_vector']} B/vector) -> {v['path']}"
                for n, v in self.variants.items()]
        return f"compressed {self.source} on {self.fit_sentences} corpus sentences:\n" + "\n".join(rows)


def variant_name(spec: str) -> str:
    """``pca:128`` -> ``pca128``, ``pca:64+int8`` -> ``pca64-int8`` (a directory name)."""
    return "-".join(part.replace(":", "") for part in spec.split("+"))


@stage_progress("compress")  # one progress bar for the stage's encode calls
def run_compress(params: Params) -> CompressResult:
    """Fit each ``compress.variants`` chain on corpus embeddings of ``models/student/best`` and save it.
    Refused at once (:class:`~mixsp_core.errors.OutputBusyError`) while another process writes
    ``models/compressed``."""
    with claim_output(params.paths.compressed, "compress stage"):
        return _compress(params)


def _compress(params: Params) -> CompressResult:
    """The body of :func:`run_compress`, under the output's lock."""
    from mixsp_core.compress import TransformChain, make_step, write_compressed_model
    from mixsp_core.models.checkpoint import load_embedder

    sp, paths = params.compress, params.paths
    source = paths.student.best
    repair_swap(source)  # a best/ that a kill mid-swap left as .best.old
    if not source.is_dir():
        raise CheckpointError(f"{source}: no student checkpoint yet; run the train stage first")
    started = time.perf_counter()
    fit = corpus_sample(paths, sp.fit_sentences, params.data.seed)
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
    write_json_atomic(paths.compressed / "compress.json",
                      {"source": str(source), "fit_sentences": len(fit), "variants": variants})
    return result
