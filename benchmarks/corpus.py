"""The benchmark's sentences: a corpus file (plain or gzip, one sentence per line), the pipeline's corpus,
or one built from the SentEval corpora; seeded samples shared by both sides of a comparison."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from mixsp_core.errors import DataError

REPO_ROOT = Path(__file__).resolve().parents[1]
PIPELINE_CORPUS = REPO_ROOT / "data" / "corpus" / "corpus.txt"
SHIPPED_CORPUS = REPO_ROOT / "benchmarks" / "data" / "corpus-100k.txt.gz"


def default_senteval_dir() -> Path:
    """``$MIXSP_SHARED_DIR/data/senteval``, else ``../shared/data/senteval`` beside the repository."""
    shared = os.environ.get("MIXSP_SHARED_DIR")
    return (Path(shared) if shared else REPO_ROOT.parent / "shared") / "data" / "senteval"


def read_sentences(path: str | Path) -> list[str]:
    """Non-empty lines of a UTF-8 text file (``.gz``: gzip), stripped; an empty file is a DataError."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as fh:
            lines = [line.strip() for line in fh]
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(path, f"cannot read sentences: {err}") from err
    sentences = [s for s in lines if s]
    if not sentences:
        raise DataError(path, "no sentences (expected one per line)")
    return sentences


def write_sentences(sentences: list[str], path: str | Path) -> Path:
    """One sentence per line, gzip-compressed when ``path`` ends in ``.gz`` (compact enough for git)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(s.replace("\n", " ").replace("\r", " ") + "\n" for s in sentences)
    if path.suffix == ".gz":
        with gzip.GzipFile(path, "wb", compresslevel=9, mtime=0) as fh:  # mtime 0: same bytes every time
            fh.write(text.encode("utf-8"))
    else:
        path.write_text(text, encoding="utf-8")
    return path


def build_from_senteval(senteval_dir: str | Path, max_sentences: int | None = None, seed: int = 0) -> list[str]:
    """The pipeline's corpus recipe (``build_corpus``: STS training sentences, then MR/CR/SUBJ/MPQA/TREC/SST)."""
    from mixsp_core.data.corpus import build_corpus, default_corpus_files
    from mixsp_core.data.sources import load_pairs

    senteval_dir = Path(senteval_dir)
    if not senteval_dir.is_dir():
        raise DataError(senteval_dir, "SentEval folder not found (pass --corpus FILE or --senteval DIR)")
    pairs = load_pairs(f"senteval:{senteval_dir}")
    return build_corpus(pairs, default_corpus_files(senteval_dir), max_sentences, seed)


def load_pool(corpus: str | Path | None, need: int, senteval_dir: str | Path | None = None) -> tuple[list[str], str]:
    """Sentences to sample from, and where they came from.

    ``corpus`` given: that file. Otherwise the pipeline's ``data/corpus/corpus.txt`` when it holds at
    least ``need`` sentences, else the shipped compact file, else a corpus built from SentEval.
    """
    if corpus is not None:
        return read_sentences(corpus), str(corpus)
    if PIPELINE_CORPUS.is_file():
        pool = read_sentences(PIPELINE_CORPUS)
        if len(pool) >= need:
            return pool, str(PIPELINE_CORPUS.relative_to(REPO_ROOT))
    if SHIPPED_CORPUS.is_file():
        return read_sentences(SHIPPED_CORPUS), str(SHIPPED_CORPUS.relative_to(REPO_ROOT))
    senteval = Path(senteval_dir) if senteval_dir else default_senteval_dir()
    return build_from_senteval(senteval), f"build_corpus(senteval:{senteval})"


def sample(pool: list[str], n: int, seed: int, exclude: np.ndarray | None = None) -> tuple[list[str], np.ndarray]:
    """``n`` sentences drawn without replacement (seeded), skipping positions in ``exclude``; when the
    pool is smaller than ``n`` it is repeated (speed does not depend on repeats: each is encoded anew).
    Returns the sentences and their pool positions."""
    rng = np.random.default_rng(seed)
    candidates = np.arange(len(pool))
    if exclude is not None and len(exclude):
        candidates = np.setdiff1d(candidates, exclude)
    if not len(candidates):
        raise ValueError("no sentences left to sample")
    reps = -(-n // len(candidates))
    chosen = np.concatenate([rng.permutation(candidates) for _ in range(reps)])[:n]
    return [pool[i] for i in chosen], chosen
