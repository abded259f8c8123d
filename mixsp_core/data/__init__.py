"""Data layer: load STS/SICK pairs from SentEval dirs, the Hub or plain files; build the sentence corpus;
validate both with great-expectations.

Importing this package is cheap: ``datasets`` and great-expectations are imported only where used.
"""

from mixsp_core.data.corpus import (
    CorpusFile,
    build_corpus,
    default_corpus_files,
    load_nli_triplets,
    read_corpus,
    write_corpus,
)
from mixsp_core.data.sources import load_pairs
from mixsp_core.data.table import PAIR_COLUMNS, SPLITS, TASKS, concat_pairs, eval_name, make_pairs, pair_counts_markdown
from mixsp_core.data.validate import DataValidationError, ValidationReport, validate_corpus, validate_pairs

__all__ = [
    "PAIR_COLUMNS",
    "SPLITS",
    "TASKS",
    "CorpusFile",
    "DataValidationError",
    "ValidationReport",
    "build_corpus",
    "concat_pairs",
    "default_corpus_files",
    "eval_name",
    "load_nli_triplets",
    "load_pairs",
    "make_pairs",
    "pair_counts_markdown",
    "read_corpus",
    "validate_corpus",
    "validate_pairs",
    "write_corpus",
]
