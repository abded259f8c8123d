"""``load_pairs(spec)``: one entry point for every pair source.

A spec is one or more of ``senteval:DIR``, ``hf:ID``, ``hf-disk:DIR``, ``file:PATH``, joined by
commas; the frames are concatenated in the order given.
"""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd

from mixsp_core.data.hub import load_hub, load_hub_disk
from mixsp_core.data.pairs_file import load_pairs_file
from mixsp_core.data.senteval import read_senteval
from mixsp_core.data.table import concat_pairs
from mixsp_core.errors import DataError

LOADERS: dict[str, Callable[[str], pd.DataFrame]] = {
    "senteval": read_senteval,
    "hf": load_hub,
    "hf-disk": load_hub_disk,
    "file": load_pairs_file,
}


def parse_spec(spec: str) -> list[tuple[str, str]]:
    """Split ``spec`` into ``(scheme, target)`` parts; an empty part or unknown scheme is a ``DataError``."""
    parts = []
    for part in str(spec).split(","):
        part = part.strip()
        scheme, colon, target = part.partition(":")
        if not colon or scheme not in LOADERS or not target.strip():
            raise DataError(
                part or "(empty)",
                f"not a data source in spec {spec!r}; use senteval:DIR, hf:ID, hf-disk:DIR or file:PATH"
                " (several joined by commas)",
            )
        parts.append((scheme, target.strip()))
    return parts


def load_pairs(spec: str) -> pd.DataFrame:
    """Load and concatenate the pairs of every source in ``spec`` (see the module docstring)."""
    return concat_pairs([LOADERS[scheme](target) for scheme, target in parse_spec(spec)])

