"""Decontaminated STS scores: which test pairs a model already saw, and its Spearman on the others.

STS-B train holds 32-50 % of the STS12-15 test pairs verbatim, so a model trained on it is partly scored on
memorised pairs. A pair is "seen" when the same two sentences (either order, after whitespace normalisation)
occur in the pairs the model was trained or selected on. Those pairs are recorded with the model as hashes
(``SEEN_PAIRS_FILE``, one 16-hex-digit key per line, sorted), so the evaluator needs neither the training data
nor the text of the pairs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from mixsp_core.errors import CheckpointError
from mixsp_core.io import write_text_atomic

SEEN_PAIRS_FILE = "seen_pairs.txt"


def normalize(text: str) -> str:
    """Runs of whitespace as one space, no leading or trailing space."""
    return " ".join(str(text).split())


def pair_key(first: str, second: str) -> str:
    """The order-free key of a sentence pair: 16 hex digits of the sha256 of the two normalised texts."""
    a, b = sorted((normalize(first), normalize(second)))
    return hashlib.sha256(f"{a}\t{b}".encode("utf-8")).hexdigest()[:16]


def pair_keys(pairs: pd.DataFrame) -> list[str]:
    """:func:`pair_key` of each row of a pairs table (columns sentence1, sentence2), in row order."""
    return [pair_key(a, b) for a, b in zip(pairs["sentence1"], pairs["sentence2"])]


def write_seen_pairs(keys: Iterable[str], directory: str | Path) -> Path:
    """Write the distinct ``keys`` (sorted, one per line) into ``directory``/seen_pairs.txt, atomically."""
    distinct = sorted(set(keys))
    return write_text_atomic(Path(directory) / SEEN_PAIRS_FILE, "".join(f"{k}\n" for k in distinct))


def read_seen_pairs(directory: str | Path) -> frozenset[str] | None:
    """The seen-pair keys recorded in a model directory; None when it records none (a Hub model, say)."""
    path = Path(directory) / SEEN_PAIRS_FILE
    if not path.is_file():
        return None
    keys = path.read_text(encoding="utf-8").split()
    bad = next((i for i, k in enumerate(keys, 1) if len(k) != 16 or any(c not in "0123456789abcdef" for c in k)), None)
    if bad is not None:
        raise CheckpointError(f"{path}:{bad}: not a 16-hex-digit pair key")
    return frozenset(keys)


def seen_mask(pairs: pd.DataFrame, seen: frozenset[str]) -> pd.Series:
    """True for the rows of ``pairs`` whose pair is in ``seen``."""
    return pd.Series([k in seen for k in pair_keys(pairs)], index=pairs.index, dtype=bool)


def seen_pairs_for(model: str | Path, pairs: pd.DataFrame) -> tuple[frozenset[str], str]:
    """The pairs ``model`` saw and where that came from: its own record (a model this project trained), else
    the training and dev splits of ``pairs`` (what a model trained the standard way on this data saw)."""
    recorded = read_seen_pairs(model) if Path(model).is_dir() else None
    if recorded is not None:
        return recorded, f"{Path(model) / SEEN_PAIRS_FILE} ({len(recorded)} pairs)"
    fitted = pairs[pairs["split"].isin(["train", "dev"])]
    keys = frozenset(pair_keys(fitted))
    return keys, f"the train and dev splits of the data ({len(keys)} pairs; the model records none)"
