"""Data stage: the validated STS pairs table and the unlabeled sentence corpus.

``run_pairs`` and ``run_corpus`` return the great-expectations report with the data and write only when it
passes (the Dagster assets turn the report into their blocking check); ``run_prepare`` runs both and raises
on the first failing report (`mixsp prepare`, DVC).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from mixsp_core.data.corpus import build_corpus, read_corpus, write_corpus
from mixsp_core.data.sources import load_pairs
from mixsp_core.data.validate import ValidationReport, validate_corpus, validate_pairs
from mixsp_core.io import atomic_write, output_lock
from mixsp_core.params import Params
from mixsp_core.paths import PipelinePaths


@dataclass
class PairsResult:
    spec: str
    pairs: pd.DataFrame
    report: ValidationReport
    path: Path | None  # None: validation failed and the previous table was left as it was

    def counts(self) -> dict[tuple[str, str], int]:
        return {key: int(n) for key, n in self.pairs.groupby(["task", "split"]).size().items()}


@dataclass
class CorpusResult:
    files: list
    corpus: list[str]
    report: ValidationReport
    path: Path | None


@dataclass
class PrepareResult:
    pairs: PairsResult
    corpus: CorpusResult

    def summary(self) -> str:
        rows = "\n".join(f"  {task} {split}: {n}" for (task, split), n in self.pairs.counts().items())
        return (f"pairs: {len(self.pairs.pairs)} -> {self.pairs.path}\n{rows}\n"
                f"corpus: {len(self.corpus.corpus)} sentences -> {self.corpus.path}")


def check_pairs(spec: str) -> tuple[pd.DataFrame, ValidationReport]:
    """Read the pairs of ``spec`` and validate them (`mixsp validate`); writes nothing."""
    pairs = load_pairs(spec)
    return pairs, validate_pairs(pairs, name=spec)


def run_pairs(params: Params) -> PairsResult:
    """Load ``data.spec``, validate, and write ``pairs.parquet`` only when the suite passes."""
    spec = params.data.resolved_spec()
    with output_lock(params.paths.pairs, "prepare stage (pairs)"):
        pairs, report = check_pairs(spec)
        path = None
        if report.success:
            path = atomic_write(params.paths.pairs, lambda tmp: pairs.to_parquet(tmp, index=False))
    return PairsResult(spec, pairs, report, path)


def run_corpus(params: Params) -> CorpusResult:
    """Build the corpus (training pairs' sentences, then ``data.corpus_files``), validate, write when it passes."""
    files = params.data.resolved_corpus_files()
    with output_lock(params.paths.corpus, "prepare stage (corpus)"):
        corpus = build_corpus(read_pairs(params.paths), files, max_sentences=params.data.max_corpus_sentences,
                              seed=params.data.seed)
        report = validate_corpus(corpus)
        path = None
        if report.success:
            path = write_corpus(corpus, params.paths.corpus)
    return CorpusResult(files, corpus, report, path)


def run_prepare(params: Params) -> PrepareResult:
    """Both data steps; a failing suite raises DataValidationError (nothing after it is written)."""
    pairs = run_pairs(params)
    pairs.report.raise_for_failures()
    corpus = run_corpus(params)
    corpus.report.raise_for_failures()
    return PrepareResult(pairs, corpus)


def read_pairs(paths: PipelinePaths) -> pd.DataFrame:
    """The data stage's pairs table."""
    if not paths.pairs.is_file():
        raise FileNotFoundError(f"{paths.pairs}: no pairs table yet; run the data stage first (`mixsp prepare`)")
    return pd.read_parquet(paths.pairs)


def read_corpus_file(paths: PipelinePaths) -> list[str]:
    """The data stage's corpus."""
    if not paths.corpus.is_file():
        raise FileNotFoundError(f"{paths.corpus}: no corpus yet; run the data stage first (`mixsp prepare`)")
    return read_corpus(paths.corpus)


def corpus_sample(paths: PipelinePaths, count: int, seed: int) -> list[str]:
    """``count`` corpus sentences drawn with ``seed``, in corpus order: what transforms are fitted on."""
    import numpy as np

    corpus = read_corpus_file(paths)
    rng = np.random.default_rng(seed)
    return [corpus[i] for i in sorted(rng.permutation(len(corpus))[:count])]


def dev_pairs(paths: PipelinePaths) -> pd.DataFrame:
    """The dev splits of the pairs table (STS-B dev, SICK trial): what models are ranked on."""
    from mixsp_core.errors import CheckpointError

    pairs = read_pairs(paths)
    dev = pairs[pairs["split"] == "dev"].reset_index(drop=True)
    if dev.empty:
        raise CheckpointError(f"{paths.pairs}: no dev pairs to evaluate models on")
    return dev
