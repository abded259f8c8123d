"""Atomic replacement of artifact directories: a failed or interrupted write never leaves a half-made
directory in place of a good one."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def replace_dir(work: Path, target: Path) -> None:
    """Rename the finished directory ``work`` over ``target`` (the old one removed after the swap)."""
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(work, target)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield an empty work directory beside ``target``; on success it replaces ``target`` in one rename,
    on error it is removed and ``target`` stays as it was."""
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial"))
    try:
        yield work
        replace_dir(work, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
