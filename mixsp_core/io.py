"""The library's only writers: atomic replacement of files and directories, and content hashes.

A file is written through a temporary sibling that is renamed over the target in one step; a directory is
filled in a work directory beside the target and swapped in at the end. Either way a failed or interrupted
write never leaves a half-made artifact in place of a good one, and no temporary is left behind (short of
a hard kill). What lands is group/world readable, files 0644 and directories 0755, because artifacts are
meant to be shared (``mkstemp`` / ``mkdtemp`` create 0600 / 0700).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

FILE_MODE = 0o644
DIR_MODE = 0o755
HASH_CHUNK = 1 << 20  # bytes read per step when hashing a file (bounded memory)


# -- files -----------------------------------------------------------------------------------------

@contextlib.contextmanager
def replacing_file(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty temporary file beside ``path`` (its parent folder is created) for the block to fill.

    When the block finishes without error the temporary is made 0644 and renamed over ``path``; otherwise
    it is removed and ``path`` stays as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):  # gone already after a successful rename
            os.remove(tmp)


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` to fill a temporary file beside ``path``, then rename it over ``path`` in one step
    (see :func:`replacing_file`). Returns ``path``."""
    with replacing_file(path) as tmp:
        write(tmp)
    return Path(path)


def write_text_atomic(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` (no newline translation) to ``path`` atomically. Returns ``path``."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding=encoding))


def json_text(data: Any, default: Callable[[Any], Any] | None = None) -> str:
    """The project's JSON file text: indented by 2, one trailing newline (``default`` as for ``json.dumps``)."""
    return json.dumps(data, indent=2, default=default) + "\n"


def write_json_atomic(path: str | os.PathLike[str], data: Any,
                      default: Callable[[Any], Any] | None = None) -> Path:
    """Write ``data`` as :func:`json_text` (UTF-8) to ``path`` atomically. Returns ``path``."""
    return write_text_atomic(path, json_text(data, default=default))


# -- directories -----------------------------------------------------------------------------------

def share_tree(root: str | os.PathLike[str]) -> None:
    """Make ``root`` and every directory below it 0755 and every file 0644 (symbolic links left alone)."""
    for folder, _, files in os.walk(root):  # does not descend into linked directories
        os.chmod(folder, DIR_MODE)
        for name in files:
            file = os.path.join(folder, name)
            if not os.path.islink(file):
                os.chmod(file, FILE_MODE)


def replace_dir(work: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
    """Make the finished directory ``work`` shared (:func:`share_tree`) and rename it over ``target``
    (the old one is moved aside first and removed after the swap)."""
    work, target = Path(work), Path(target)
    share_tree(work)
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(work, target)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def writing_dir(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty work directory beside ``target`` (its parent folder is created); when the block
    finishes without error it replaces ``target`` (:func:`replace_dir`), otherwise it is removed and
    ``target`` stays as it was."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial"))
    try:
        yield work
        replace_dir(work, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold an exclusive advisory lock on the file ``path`` (created if missing) for the block, so two
    processes do not write the same artifact at once. Without POSIX ``fcntl`` it does not lock: writers
    then rely on the atomic renames alone."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# -- hashes ----------------------------------------------------------------------------------------

def file_digest(path: str | os.PathLike[str], algorithm: str = "sha256", chunk: int = HASH_CHUNK) -> str:
    """Hex digest of the file ``path`` (``algorithm``: a hashlib name), read ``chunk`` bytes at a time."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_file(path: str | os.PathLike[str], chunk: int = HASH_CHUNK) -> str:
    """Hex sha256 of the file ``path``: what packaged weights and fine-tuned teachers are checked by."""
    return file_digest(path, "sha256", chunk)


def sha256_text(text: str) -> str:
    """Hex sha256 of ``text``'s UTF-8 bytes."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
