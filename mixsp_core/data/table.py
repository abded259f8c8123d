"""The pairs table: column contract, evaluation names, and helpers that build frames with the right dtypes.

Every loader (SentEval, Hub, plain files) returns a frame made by :func:`make_pairs` or
:func:`pairs_from_frame`, so downstream code can rely on ``PAIR_COLUMNS`` and their dtypes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from mixsp_core.errors import DataError

PAIR_COLUMNS: tuple[str, ...] = ("sentence1", "sentence2", "score", "task", "subset", "split", "source", "line")
TEXT_COLUMNS: tuple[str, ...] = ("sentence1", "sentence2", "task", "subset", "split", "source")
REQUIRED_INPUT_COLUMNS: tuple[str, ...] = ("sentence1", "sentence2", "score")
TASKS: tuple[str, ...] = ("STS12", "STS13", "STS14", "STS15", "STS16", "STSBenchmark", "SICKRelatedness")
SPLITS: tuple[str, ...] = ("train", "dev", "test")
SCORE_RANGE: tuple[float, float] = (0.0, 5.0)

# Split names found in the wild, mapped onto the contract's three splits.
_SPLIT_ALIASES: dict[str, str] = {
    "train": "train",
    "dev": "dev",
    "validation": "dev",
    "valid": "dev",
    "trial": "dev",
    "test": "test",
}
_DEV_NAMES: dict[str, str] = {"STSBenchmark": "STSBenchmark-dev", "SICKRelatedness": "SICK-trial"}


def eval_name(task: str, split: str) -> str:
    """Name under which a (task, split) is evaluated and reported.

    Test splits keep the task name (``STS12``), the two dev sets are ``STSBenchmark-dev`` and
    ``SICK-trial``, and anything else is ``f"{task}-{split}"``.
    """
    if split == "test":
        return task
    if split == "dev" and task in _DEV_NAMES:
        return _DEV_NAMES[task]
    return f"{task}-{split}"


def normalize_split(name: str) -> str | None:
    """Map a split name (``validation``, ``trial``, ...) onto ``train``/``dev``/``test``; None if unknown."""
    return _SPLIT_ALIASES.get(str(name).strip().lower())


def parse_score(text: object, path: str, line: int) -> float:
    """Parse one gold score; raise ``DataError(path:line)`` unless it is a finite number."""
    try:
        value = float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise DataError(path, f"score {text!r} is not a number", line) from None
    if not math.isfinite(value):
        raise DataError(path, f"score {text!r} is not a finite number", line)
    return value


def empty_pairs() -> pd.DataFrame:
    """A pairs frame with no rows and the contract's dtypes."""
    return _typed(pd.DataFrame({column: [] for column in PAIR_COLUMNS}))


def make_pairs(records: Iterable[Mapping[str, object]]) -> pd.DataFrame:
    """Build a pairs frame from records holding exactly the keys of ``PAIR_COLUMNS``."""
    rows = list(records)
    if not rows:
        return empty_pairs()
    return _typed(pd.DataFrame.from_records(rows, columns=list(PAIR_COLUMNS)))


def concat_pairs(frames: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """Concatenate pairs frames in order, with a fresh 0..n-1 index."""
    frames = [frame for frame in frames if len(frame)]
    if not frames:
        return empty_pairs()
    return _typed(pd.concat([frame.loc[:, list(PAIR_COLUMNS)] for frame in frames], ignore_index=True))


def pairs_from_frame(
    raw: pd.DataFrame,
    *,
    source: str,
    lines: Sequence[int],
    default_task: str,
    default_split: str,
    row_source: str | None = None,
    numeric_scores: bool = False,
) -> pd.DataFrame:
    """Turn a user frame (``sentence1``, ``sentence2``, ``score``; optional ``task``/``subset``/``split``)
    into a pairs frame.

    ``source`` names the input in errors, ``lines[i]`` is row i's line (or row) number there, and
    ``row_source`` (default ``source``) is stored in the ``source`` column. Sentences must be strings
    and scores finite numbers (never booleans; with ``numeric_scores``, as for JSON, parquet and Hub data,
    numbers and not text), else ``DataError(source:line)``. A duplicated column name and a frame with no
    rows are ``DataError(source)``. Range and emptiness of values are left to validation, which reports
    every offending row at once.
    """
    duplicated = sorted({str(column) for column in raw.columns[raw.columns.duplicated()]})
    if duplicated:
        raise DataError(source, f"duplicate column(s) {', '.join(duplicated)}: which one holds the data is ambiguous")
    if len(raw) == 0:
        raise DataError(source, "no data rows (only a header, or nothing at all); expected at least one pair")
    missing = [column for column in REQUIRED_INPUT_COLUMNS if column not in raw.columns]
    if missing:
        raise DataError(
            source,
            f"missing column(s) {', '.join(missing)}; need {', '.join(REQUIRED_INPUT_COLUMNS)}"
            f" (found: {', '.join(map(str, raw.columns)) or 'none'})",
        )
    if len(lines) != len(raw):
        raise ValueError(f"{source}: {len(lines)} line numbers for {len(raw)} rows")
    records = []
    for position, values in enumerate(raw.to_dict("records")):
        line = int(lines[position])
        for column in ("sentence1", "sentence2"):
            if not isinstance(values[column], str):
                raise DataError(source, f"{column} is {values[column]!r}, not text", line)
        task = _optional_text(values, "task", default_task, source, line)
        split_text = _optional_text(values, "split", default_split, source, line)
        split = normalize_split(split_text)
        if split is None:
            raise DataError(source, f"split {split_text!r} is not one of {', '.join(SPLITS)} (or validation/trial)", line)
        records.append(
            {
                "sentence1": values["sentence1"],
                "sentence2": values["sentence2"],
                "score": _row_score(values["score"], source, line, numeric_scores),
                "task": task,
                "subset": _optional_text(values, "subset", task, source, line),
                "split": split,
                "source": row_source or source,
                "line": line,
            }
        )
    return make_pairs(records)


def pair_counts_markdown(pairs: pd.DataFrame) -> str:
    """A Markdown table of pair counts per (task, split), with each one's evaluation name."""
    lines = ["| task | split | eval name | pairs |", "| --- | --- | --- | ---: |"]
    counts = pairs.groupby(["task", "split"], sort=False).size()
    for (task, split), count in counts.items():
        lines.append(f"| {task} | {split} | {eval_name(task, split)} | {count:,} |")
    lines.append(f"| **all** | | | {len(pairs):,} |")
    return "\n".join(lines)


def _row_score(value: object, source: str, line: int, numeric: bool = False) -> float:
    """A row's score; an absent cell (None/NaN, e.g. a jsonl record without the key) is named as such.

    A boolean is never a score (``float(True)`` would silently read 1.0); with ``numeric`` (typed sources:
    JSON, parquet, Hub datasets) text is refused too, since a quoted number there means a wrongly typed column.
    """
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise DataError(source, "score is missing (empty or NaN)", line)
    if isinstance(value, (bool, np.bool_)):
        raise DataError(source, f"score {value!r} is a boolean, not a number", line)
    if numeric and not isinstance(value, (int, float, np.integer, np.floating)):
        raise DataError(source, f"score {value!r} is {type(value).__name__}, not a number", line)
    return parse_score(value, source, line)


def _optional_text(values: Mapping[str, object], column: str, default: str, source: str, line: int) -> str:
    """An optional text column's value, or ``default`` when the column is absent or the cell empty."""
    value = values.get(column)
    if value is None or (isinstance(value, float) and math.isnan(value)) or value == "":
        return default
    if not isinstance(value, str):
        raise DataError(source, f"{column} is {value!r}, not text", line)
    return value


def _typed(frame: pd.DataFrame) -> pd.DataFrame:
    """Cast to the contract's dtypes: text as Python ``str`` objects, float64 score, int64 line."""
    frame = frame.loc[:, list(PAIR_COLUMNS)].copy()
    for column in TEXT_COLUMNS:
        frame[column] = frame[column].astype(object)
    frame["score"] = frame["score"].astype("float64")
    frame["line"] = frame["line"].astype("int64")
    return frame.reset_index(drop=True)
