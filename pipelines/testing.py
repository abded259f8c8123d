"""Tiny real data for pipeline tests: a SentEval-layout folder cut from the shared SentEval files.

Used by tests/test_pipeline_*.py; plain functions (no pytest) so the tests' fixtures stay short.
"""

from __future__ import annotations

from pathlib import Path

# (relative path, has a header line) of the files a SentEval training folder holds.
_PAIR_FILES = (
    ("STS/STSBenchmark/sts-train.csv", False),
    ("STS/STSBenchmark/sts-dev.csv", False),
    ("SICK/SICK_train.txt", True),
    ("SICK/SICK_trial.txt", True),
)
CORPUS_FILE = "MR/rt-polarity.pos"


def _head(source: Path, target: Path, lines: int, header: bool, spread: bool) -> None:
    """Copy the header (if any) and ``lines`` lines: evenly spread over the file, or the first ones."""
    with open(source, encoding="utf-8") as handle:
        rows = handle.read().splitlines()
    head, body = (rows[:1], rows[1:]) if header else ([], rows)
    step = max(1, len(body) // lines) if spread else 1
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("\n".join(head + body[::step][:lines]) + "\n", encoding="utf-8")


def write_tiny_senteval(senteval_dir: Path, target: Path, pairs_per_file: int = 30,
                        corpus_lines: int = 40) -> Path:
    """A SentEval-layout copy of ``senteval_dir`` with ``pairs_per_file`` pairs per file (spread over the
    file so scores vary) and ``corpus_lines`` sentences of an unlabeled corpus file; returns ``target``."""
    for relative, header in _PAIR_FILES:
        _head(senteval_dir / relative, target / relative, pairs_per_file, header, spread=True)
    _head(senteval_dir / CORPUS_FILE, target / CORPUS_FILE, corpus_lines, False, spread=False)
    return target


def corrupt_pairs(senteval_dir: Path, relative: str = "STS/STSBenchmark/sts-train.csv") -> Path:
    """Break a parsable file the way validation (not parsing) must catch: a blank sentence and a
    score above 5 on the first row. Returns the file changed."""
    path = senteval_dir / relative
    rows = path.read_text(encoding="utf-8").splitlines()
    cells = rows[0].split("\t")
    cells[4], cells[5] = "9.000", "   "
    rows[0] = "\t".join(cells)
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def graph_definitions() -> list:
    """Every asset and asset-check definition of the defs folder, without the resources the
    Definitions bind, so ``dagster.materialize`` can be given test resources. Duplicates (one object
    imported into several defs modules) are dropped."""
    from pipelines.definitions import defs

    loaded = defs()
    unique: dict[int, object] = {}
    for definition in [*(loaded.assets or []), *(loaded.asset_checks or [])]:
        unique.setdefault(id(definition), definition)
    return list(unique.values())
