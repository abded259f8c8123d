"""Read the STS and SICK files of a SentEval directory, in their original layouts.

Layouts (see ``../shared/data/README.md``):

- ``STS/STS1x-en-test/STS.input.<subset>.txt``: ``sentence1<TAB>sentence2`` (STS16: two more
  source columns); ``STS.gs.<subset>.txt``: one score per line, aligned; a blank gold line means
  the pair has no score and is skipped.
- ``STS/STSBenchmark/sts-{train,dev,test}.csv``: tab-separated, no header, 7 columns (score in the
  5th, sentences in the 6th and 7th), some lines with 2 extra trailing columns; no quoting.
- ``SICK/SICK_{train,trial,test_annotated}.txt``: tab-separated with a header line.

Only the files that exist are read; every row keeps its origin (``source`` path, 1-based ``line``). A file
that exists but holds no data rows is a ``DataError`` naming it (an empty file is a broken copy, not a missing
split). Whether the tasks a training config names are all present is checked where they are used
(:func:`mixsp_core.data.table.check_tasks_present`).
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

import pandas as pd

from mixsp_core.data.table import concat_pairs, make_pairs, parse_score
from mixsp_core.errors import DataError

STS_SUBSETS: dict[str, tuple[str, ...]] = {
    "STS12": ("MSRpar", "MSRvid", "SMTeuroparl", "surprise.OnWN", "surprise.SMTnews"),
    "STS13": ("FNWN", "headlines", "OnWN"),
    "STS14": ("deft-forum", "deft-news", "headlines", "images", "OnWN", "tweet-news"),
    "STS15": ("answers-forums", "answers-students", "belief", "headlines", "images"),
    "STS16": ("answer-answer", "headlines", "plagiarism", "postediting", "question-question"),
}
# STS16 as distributed carries two source columns after the sentences; SentEval's own copy drops them.
_STS_INPUT_COLUMNS: dict[str, tuple[int, ...]] = {"STS16": (2, 4)}
STSB_FILES: dict[str, str] = {"train": "sts-train.csv", "dev": "sts-dev.csv", "test": "sts-test.csv"}
SICK_FILES: dict[str, str] = {"train": "SICK_train.txt", "dev": "SICK_trial.txt", "test": "SICK_test_annotated.txt"}
_STSB_COLUMNS = (7, 9)  # about 1 line in 30 has two trailing source-note columns
_SICK_FIELDS = ("sentence_A", "sentence_B", "relatedness_score")


def read_text_lines(path: str | Path, encoding: str = "utf-8") -> list[str]:
    """The lines of a text file, split on ``\\n`` only (a trailing ``\\r`` is dropped).

    Splitting on ``\\n`` alone keeps line numbers equal to what editors show even when raw text
    holds other Unicode line separators. Missing file or undecodable bytes raise ``DataError``
    (the latter with the 1-based line of the first bad byte). :func:`iter_text_lines` read at once.
    """
    return list(iter_text_lines(path, encoding))


def iter_text_lines(path: str | Path, encoding: str = "utf-8") -> Iterator[str]:
    """:func:`read_text_lines` lazily: one line in memory at a time (a file larger than memory can be
    streamed). Lines are cut at the byte ``\\n`` before decoding, so ``encoding`` must be one where that
    byte only ever ends a line (UTF-8, Latin-1; not UTF-16). A read failing mid-file is a ``DataError``
    naming the line it stopped at."""
    path = Path(path)
    try:
        fh = open(path, "rb")
    except FileNotFoundError:
        raise DataError(path, "file not found") from None
    except OSError as error:
        raise DataError(path, f"cannot read: {error.strerror or error}") from None
    with fh:
        offset, number = 0, 0
        try:
            for number, raw in enumerate(fh, start=1):  # binary lines end at b"\n" only
                try:
                    line = raw.decode(encoding)
                except UnicodeDecodeError as error:
                    raise DataError(path, f"bytes are not valid {encoding} ({error.reason} at byte "
                                          f"{offset + error.start})", number) from None
                offset += len(raw)
                if number == 1 and line.startswith("\ufeff"):
                    line = line[1:]  # a byte-order mark is not part of the first line's text
                line = line[:-1] if line.endswith("\n") else line  # the final newline starts no new line
                yield line[:-1] if line.endswith("\r") else line
        except OSError as error:  # the disk, not the data: still the file and line
            raise DataError(path, f"cannot read: {error.strerror or error}", number + 1) from None


def read_sts_subset(input_path: Path, gold_path: Path, task: str, subset: str) -> pd.DataFrame:
    """One STS12-16 subset: input and gold files aligned line by line; blank gold lines are skipped.

    ``line`` and ``source`` point at the input file (the gold file has the same line number).
    """
    inputs = read_text_lines(input_path)
    golds = read_text_lines(gold_path)
    if len(inputs) != len(golds):
        raise DataError(
            input_path,
            f"{len(inputs)} lines, but the gold file {gold_path} has {len(golds)}; they must align line by line",
        )
    allowed = _STS_INPUT_COLUMNS.get(task, (2,))
    records = []
    for number, (text, gold) in enumerate(zip(inputs, golds), start=1):
        fields = text.split("\t")
        if len(fields) not in allowed:
            raise DataError(input_path, _column_message(allowed, len(fields), "sentence1, sentence2"), number)
        if not gold.strip():
            continue  # no gold score for this pair: SentEval skips it too
        records.append(
            {
                "sentence1": fields[0],
                "sentence2": fields[1],
                "score": parse_score(gold.strip(), str(gold_path), number),
                "task": task,
                "subset": subset,
                "split": "test",
                "source": str(input_path),
                "line": number,
            }
        )
    if not records:
        raise DataError(input_path, f"no scored pairs (the gold file {gold_path} has no score on any line)"
                        if inputs else "no data rows (empty file)")
    return make_pairs(records)


def read_sts_year(year_dir: Path, task: str) -> pd.DataFrame:
    """All subsets of one STS12-16 directory that are present (input and gold must come together)."""
    frames = []
    for subset in STS_SUBSETS[task]:
        input_path = year_dir / f"STS.input.{subset}.txt"
        gold_path = year_dir / f"STS.gs.{subset}.txt"
        if not input_path.exists() and not gold_path.exists():
            continue
        if not gold_path.exists():
            raise DataError(gold_path, f"gold file missing for {input_path}")
        if not input_path.exists():
            raise DataError(input_path, f"input file missing for {gold_path}")
        frames.append(read_sts_subset(input_path, gold_path, task, subset))
    return concat_pairs(frames)


def read_stsb_file(path: Path, split: str) -> pd.DataFrame:
    """One STS Benchmark csv (no header; score, sentence1, sentence2 in columns 5, 6, 7)."""
    lines = read_text_lines(path)
    records = []
    # QUOTE_NONE: sentences contain quote characters that are text, not CSV quoting.
    reader = csv.reader(lines, delimiter="\t", quoting=csv.QUOTE_NONE)
    for number, fields in enumerate(reader, start=1):
        if len(fields) not in _STSB_COLUMNS:
            raise DataError(path, _column_message(_STSB_COLUMNS, len(fields), "genre, file, year, id, score, s1, s2"), number)
        records.append(
            {
                "sentence1": fields[5],
                "sentence2": fields[6],
                "score": parse_score(fields[4], str(path), number),
                "task": "STSBenchmark",
                "subset": "STSBenchmark",
                "split": split,
                "source": str(path),
                "line": number,
            }
        )
    if not records:
        raise DataError(path, "no data rows (empty file)")
    return make_pairs(records)


def read_sick_file(path: Path, split: str) -> pd.DataFrame:
    """One SICK file: a header naming ``sentence_A``, ``sentence_B``, ``relatedness_score``, then rows."""
    lines = read_text_lines(path)
    if not lines:
        raise DataError(path, "empty file; expected a header line", 1)
    header = lines[0].split("\t")
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:
        raise DataError(path, f"duplicate column(s) {', '.join(repeated)} in the header: which one holds the data "
                              "is ambiguous", 1)
    missing = [field for field in _SICK_FIELDS if field not in header]
    if missing:
        raise DataError(path, f"header lacks {', '.join(missing)} (found: {', '.join(header)})", 1)
    first, second, score = (header.index(field) for field in _SICK_FIELDS)
    records = []
    for number, text in enumerate(lines[1:], start=2):
        fields = text.split("\t")
        if len(fields) != len(header):
            raise DataError(path, f"expected {len(header)} tab-separated columns like the header, found {len(fields)}", number)
        records.append(
            {
                "sentence1": fields[first],
                "sentence2": fields[second],
                "score": parse_score(fields[score], str(path), number),
                "task": "SICKRelatedness",
                "subset": "SICKRelatedness",
                "split": split,
                "source": str(path),
                "line": number,
            }
        )
    if not records:
        raise DataError(path, "no data rows (only the header line)")
    return make_pairs(records)


def read_senteval(directory: str | Path) -> pd.DataFrame:
    """Every STS12-16, STS Benchmark and SICK file present under a SentEval directory.

    Order: STS12..STS16, STS-B train/dev/test, SICK train/trial/test. A directory holding none
    of these files is an error.
    """
    root = Path(directory)
    if not root.is_dir():
        raise DataError(root, "SentEval directory not found")
    frames = []
    for task in STS_SUBSETS:
        year_dir = root / "STS" / f"{task}-en-test"
        if year_dir.is_dir():
            frames.append(read_sts_year(year_dir, task))
    for split, name in STSB_FILES.items():
        path = root / "STS" / "STSBenchmark" / name
        if path.exists():
            frames.append(read_stsb_file(path, split))
    for split, name in SICK_FILES.items():
        path = root / "SICK" / name
        if path.exists():
            frames.append(read_sick_file(path, split))
    pairs = concat_pairs(frames)
    if pairs.empty:
        raise DataError(
            root,
            "no STS or SICK pairs found; expected STS/STS12-en-test/..STS16-en-test, "
            "STS/STSBenchmark/sts-{train,dev,test}.csv or SICK/SICK_{train,trial,test_annotated}.txt",
        )
    return pairs


def _column_message(allowed: tuple[int, ...], found: int, layout: str) -> str:
    expected = " or ".join(str(count) for count in allowed)
    return f"expected {expected} tab-separated columns ({layout}), found {found}"
