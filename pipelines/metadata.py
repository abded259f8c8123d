"""Small helpers that turn artifacts into Dagster metadata (hashes, sizes, tables, embedded plots)."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import dagster as dg

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


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    """A GitHub-style markdown table (floats to 2 decimals)."""
    def cell(value: Any) -> str:
        return f"{value:.2f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
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
