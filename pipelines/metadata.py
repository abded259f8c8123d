"""Small helpers that turn artifacts into Dagster metadata (hashes, sizes, tables, embedded plots)."""

from __future__ import annotations

import base64
import io
import math
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np

from mixsp_core.io import file_digest


def file_md5(path: Path) -> str:
    """md5 of a file's bytes: the hash DVC records for it in dvc.lock."""
    return file_digest(path, "md5")


def tree_size(path: Path) -> int:
    """Bytes under a file or directory."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def file_metadata(path: Path) -> dict[str, Any]:
    """Path, size and md5 of one artifact file."""
    return {"path": dg.MetadataValue.path(str(path)), "bytes": path.stat().st_size, "md5": file_md5(path)}


DECIMALS = 2  # metric values shown as text: Spearman x100 to 2 decimals, as in the reports


def metric_text(value: Any) -> str:
    """A table cell: any float (numpy's float32 included) to :data:`DECIMALS` decimals, NaN as ``n/a``;
    ints, bools and text as they are."""
    if isinstance(value, (bool, int, np.integer)) or not isinstance(value, (float, np.floating)):
        return str(value)
    return "n/a" if not math.isfinite(float(value)) else f"{float(value):.{DECIMALS}f}"


def metric_value(value: Any) -> float:
    """A metric for numeric metadata, rounded to :data:`DECIMALS` decimals (what the UI shows as text)."""
    return round(float(value), DECIMALS)


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    """A GitHub-style markdown table (floats to 2 decimals, see :func:`metric_text`)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(metric_text(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def png_markdown(figure: Any, alt: str) -> dg.MetadataValue:
    """Embed a matplotlib figure as a base64 PNG inside markdown metadata (the UI renders it inline)."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(figure)
    encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
    return dg.MetadataValue.md(f"![{alt}](data:image/png;base64,{encoded})")


def png_file_markdown(path: Path, alt: str | None = None) -> dg.MetadataValue:
    """Embed a PNG file as a base64 image inside markdown metadata."""
    encoded = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return dg.MetadataValue.md(f"![{alt or Path(path).stem}](data:image/png;base64,{encoded})")
