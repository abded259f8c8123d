"""Content fingerprints of the source data, so the sensor can tell when it changed.

A fingerprint is the sha256 over (relative path, sha256 of bytes) of every file a data spec or corpus
file list names, in sorted order. Hub datasets (``hf:ID``) contribute their id only: their content is
not local.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

from mixsp_core.io import sha256_file

_LOCAL_SCHEMES = ("senteval", "hf-disk", "file")


def _files_under(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    return []


def fingerprint_paths(paths: Iterable[Path], labels: Iterable[str] = ()) -> str:
    """sha256 over the given labels and every file under ``paths`` (a missing path counts as 'missing')."""
    digest = hashlib.sha256()
    for label in labels:
        digest.update(f"label\0{label}\n".encode())
    for root in paths:
        files = _files_under(root)
        if not files:
            digest.update(f"missing\0{root}\n".encode())
        for file in files:
            digest.update(f"{file.relative_to(root) if file != root else file.name}\0{sha256_file(file)}\n".encode())
    return digest.hexdigest()


def spec_fingerprint(spec: str) -> str:
    """Fingerprint of the files a resolved data spec reads (``senteval:DIR`` hashes the whole folder)."""
    from mixsp_core.data.sources import parse_spec

    parts = parse_spec(spec)
    local = [Path(target) for scheme, target in parts if scheme in _LOCAL_SCHEMES]
    remote = [f"{scheme}:{target}" for scheme, target in parts if scheme not in _LOCAL_SCHEMES]
    return fingerprint_paths(local, labels=remote)


def files_fingerprint(files: Iterable[Path | object]) -> str:
    """Fingerprint of corpus files (paths or ``CorpusFile`` objects with a ``path``)."""
    return fingerprint_paths([Path(getattr(f, "path", f)) for f in files])
