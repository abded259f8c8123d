"""Atomic replacement of artifact directories: writers fill a work directory beside the target and swap it
in at the end, so a failed or interrupted write never leaves a half-made directory in place of a good one."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def replace_dir(work: Path, target: Path) -> None:
    """Rename the finished directory ``work`` over ``target`` (the old one removed after the swap)."""
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(work, target)
    shutil.rmtree(old, ignore_errors=True)



@contextlib.contextmanager
def writing_dir(target: Path) -> Iterator[Path]:
    """Yield an empty work directory beside ``target``; when the block finishes without error it replaces
    ``target`` (:func:`replace_dir`), otherwise it is removed and ``target`` stays as it was."""
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial"))
    try:
        yield work
        os.chmod(work, 0o755)  # mkdtemp creates 0700; artifacts are meant to be shared
        replace_dir(work, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
