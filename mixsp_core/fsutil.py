"""Atomic replacement of artifact directories: writers fill a work directory beside the target and swap it
in at the end, so a failed or interrupted write never leaves a half-made directory in place of a good one."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def replace_dir(work: Path, target: Path) -> None:
    """Rename the finished directory ``work`` over ``target`` (the old one removed after the swap)."""
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(work, target)
    shutil.rmtree(old, ignore_errors=True)

