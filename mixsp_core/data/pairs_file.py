"""Pairs from one plain file (``file:PATH``): csv, tsv, jsonl or parquet.

Columns ``sentence1``, ``sentence2``, ``score`` are required; ``task`` (default: the file's stem),
``subset`` (default: the task) and ``split`` (default: ``test``) are optional. Row ``line`` is
the physical line where the record starts (csv/tsv, header = line 1), the line (jsonl), or the
1-based row number (parquet).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pandas as pd

from mixsp_core.data.senteval import read_text_lines
from mixsp_core.data.table import pairs_from_frame
from mixsp_core.errors import DataError

FILE_SUFFIXES: tuple[str, ...] = (".csv", ".tsv", ".jsonl", ".parquet")


def load_pairs_file(path: str | Path) -> pd.DataFrame:
    """Read a csv/tsv/jsonl/parquet file of pairs (see the module docstring for columns and lines)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in FILE_SUFFIXES:
        raise DataError(path, f"unsupported file type {suffix or '(none)'!r}; expected one of {', '.join(FILE_SUFFIXES)}")
    if not path.is_file():
        raise DataError(path, "file not found")
    if suffix == ".parquet":
        raw, lines = _read_parquet(path)
    elif suffix == ".jsonl":
        raw, lines = _read_jsonl(path)
    else:
        raw, lines = _read_delimited(path, "\t" if suffix == ".tsv" else ",")
    # csv/tsv cells are text by nature; jsonl and parquet are typed, so a quoted or boolean score is an error
    return pairs_from_frame(raw, source=str(path), lines=lines, default_task=path.stem, default_split="test",
                            numeric_scores=suffix != ".csv" and suffix != ".tsv")


def _read_delimited(path: Path, delimiter: str) -> tuple[pd.DataFrame, list[int]]:
    """csv/tsv with a header and standard quoting; records keep the physical line they start on."""
    # Decoding first gives undecodable bytes a line number; the csv module then parses the text.
    text = "\n".join(read_text_lines(path)) + "\n"
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        raise DataError(path, "empty file; expected a header line with sentence1, sentence2, score", 1) from None
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:
        raise DataError(path, f"duplicate column(s) {', '.join(repeated)} in the header: which one holds the data "
                              "is ambiguous", 1)
    rows: list[list[str]] = []
    lines: list[int] = []
    start = reader.line_num + 1
    try:
        for fields in reader:
            if fields:  # blank lines carry no record
                if len(fields) != len(header):
                    raise DataError(path, f"expected {len(header)} columns like the header, found {len(fields)}", start)
                rows.append(fields)
                lines.append(start)
            start = reader.line_num + 1
    except csv.Error as error:
        raise DataError(path, f"malformed {'tsv' if delimiter == chr(9) else 'csv'}: {error}", start) from None
    return pd.DataFrame(rows, columns=header, dtype=object), lines


def _read_jsonl(path: Path) -> tuple[pd.DataFrame, list[int]]:
    """One JSON object per line; blank lines are skipped."""
    records: list[dict] = []
    lines: list[int] = []
    for number, text in enumerate(read_text_lines(path), start=1):
        if not text.strip():
            continue
        try:
            record = json.loads(text, object_pairs_hook=_unique_keys)
        except json.JSONDecodeError as error:
            raise DataError(path, f"invalid JSON: {error.msg} (column {error.colno})", number) from None
        except _DuplicateKeyError as error:
            raise DataError(path, f"duplicate key {error.key!r} in one record: which one holds the data is "
                                  "ambiguous", number) from None
        if not isinstance(record, dict):
            raise DataError(path, f"expected a JSON object, found {type(record).__name__}", number)
        records.append(record)
        lines.append(number)
    columns = sorted({key for record in records for key in record}) if records else []
    return pd.DataFrame.from_records(records, columns=columns), lines


class _DuplicateKeyError(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """``json.loads`` hook: an object whose key repeats raises (plain ``json`` keeps the last silently)."""
    record: dict[str, object] = {}
    for key, value in pairs:
        if key in record:
            raise _DuplicateKeyError(key)
        record[key] = value
    return record


def _read_parquet(path: Path) -> tuple[pd.DataFrame, list[int]]:
    """A parquet table; ``line`` is the 1-based row number."""
    import pyarrow

    try:
        raw = pd.read_parquet(path)
    except (OSError, ValueError, pyarrow.ArrowException) as error:
        raise DataError(path, f"cannot read parquet: {error}") from None
    return raw.reset_index(drop=True), list(range(1, len(raw) + 1))
