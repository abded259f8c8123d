"""The library's only writers: atomic replacement of files and directories, and content hashes.

A file is written through a temporary sibling that is renamed over the target in one step; a directory is
filled in a work directory beside the target and swapped in at the end. Either way a failed or interrupted
write never leaves a half-made artifact in place of a good one, and no temporary is left behind (short of
a hard kill). What lands is group/world readable, files 0644 and directories 0755, because artifacts are
meant to be shared (``mkstemp`` / ``mkdtemp`` create 0600 / 0700).

One writer per output: a stage holds :func:`output_lock` on its output while it writes it, so a second
writer (another CLI run, the Dagster asset, the DVC stage) is refused at once, naming the holder, instead
of mixing its files with the first one's. Under that lock :func:`sweep_leftovers` clears what hard-killed
writes left behind (``.*.partial`` work directories, a swap cut short, see :func:`repair_swap`).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import hashlib
import json
import logging
import os
import shlex
import shutil
import socket
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from mixsp_core.errors import OutputBusyError

log = logging.getLogger(__name__)

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


NPY_WRITE_ROWS = 4096  # rows copied into order and written per step: what a write holds beside its input


@contextlib.contextmanager
def writing_npy_rows(path: str | os.PathLike[str], shape: tuple[int, int],
                     dtype: str = "float32") -> Iterator[Callable[[Any, Any], None]]:
    """Fill the ``.npy`` file ``path`` (a matrix of ``shape``) block by block, atomically: yields
    ``write(rows, values)`` (``rows``: row indices in any order, or a slice; ``values``: their rows) for the
    block to call as often as it likes; when the block finishes without error the file is flushed to disk and
    renamed over ``path`` (:func:`replacing_file`); otherwise it is removed and ``path`` stays as it was.

    The header comes from ``numpy.lib.format.open_memmap`` and the file's full size is reserved on disk
    first (a full disk fails here with ENOSPC, not mid-stream). Rows go to disk with ``pwrite``, in runs of
    consecutive rows, :data:`NPY_WRITE_ROWS` at a time, never through a memory map: written rows sit in the
    page cache, not in this process's resident memory, so a matrix larger than memory costs one step of it.
    """
    import numpy as np
    from numpy.lib.format import open_memmap

    dtype_ = np.dtype(dtype)
    n, width = shape
    row_bytes = width * dtype_.itemsize
    with replacing_file(path) as tmp:
        header = open_memmap(tmp, mode="w+", dtype=dtype_, shape=shape)  # the header; the file sized (sparse)
        data_start = header.offset
        del header  # unmapped again: nothing is written through it
        with open(tmp, "r+b") as fh:
            fd = fh.fileno()
            size = os.fstat(fd).st_size
            if size and hasattr(os, "posix_fallocate"):
                os.posix_fallocate(fd, 0, size)

            def write(rows: Any, values: Any) -> None:
                index = np.arange(*rows.indices(n)) if isinstance(rows, slice) else np.asarray(rows, dtype=np.int64)
                values = np.asarray(values, dtype=dtype_)
                if values.shape != (len(index), width):
                    raise ValueError(f"{path}: {len(index)} rows of width {width} expected, got {values.shape}")
                if len(index) and (index.min() < 0 or index.max() >= n):
                    raise IndexError(f"{path}: rows {index.min()}..{index.max()} outside the matrix's {n}")
                order = np.argsort(index, kind="stable")
                for first in range(0, len(order), NPY_WRITE_ROWS):
                    take = order[first:first + NPY_WRITE_ROWS]
                    block, targets = np.ascontiguousarray(values[take]), index[take]
                    breaks = np.flatnonzero(np.diff(targets) != 1) + 1  # where a run of consecutive rows ends
                    for lo, hi in zip(np.r_[0, breaks], np.r_[breaks, len(take)]):
                        _pwrite_all(fd, memoryview(block[lo:hi]).cast("B"), data_start + int(targets[lo]) * row_bytes)

            yield write
            os.fsync(fd)  # a failing disk reports here at the latest, before the rename


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """``data`` at ``offset`` of ``fd``, however many calls ``pwrite`` takes."""
    while len(data):
        done = os.pwrite(fd, data, offset)
        data, offset = data[done:], offset + done


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


def old_path(target: str | os.PathLike[str]) -> Path:
    """Where :func:`replace_dir` moves ``target`` aside during a swap: ``.<name>.old`` beside it."""
    target = Path(target)
    return target.with_name(f".{target.name}.old")


def _remove(path: Path) -> None:
    """Remove the file, link or directory tree ``path`` (whatever is left of it)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def repair_swap(target: str | os.PathLike[str]) -> bool:
    """Finish a :func:`replace_dir` swap that a kill cut short. Killed between its two renames, it left
    ``target`` missing and the previous version at ``.<name>.old``: that is renamed back (with a warning),
    so a training run still resumes from its ``last/``. Killed after the swap, both exist: the ``.old`` is
    removed. Returns True when ``target`` was put back."""
    target = Path(target)
    old = old_path(target)
    if not os.path.lexists(old):
        return False
    if os.path.lexists(target):
        _remove(old)
        return False
    try:
        os.replace(old, target)
    except FileNotFoundError:  # another process put it back first
        return False
    except OSError as err:
        if err.errno in (errno.ENOTEMPTY, errno.EEXIST):  # a writer made a new target meanwhile
            return False
        raise
    log.warning("%s: put back from %s, left by a replacement that was interrupted", target, old.name)
    return True


def replace_dir(work: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
    """Make the finished directory ``work`` shared (:func:`share_tree`) and rename it over ``target``
    (the old one is moved aside first and removed after the swap). A swap an earlier kill cut short is
    finished first (:func:`repair_swap`), so the previous version is never lost."""
    work, target = Path(work), Path(target)
    share_tree(work)
    old = old_path(target)
    repair_swap(target)
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


# -- one writer per output ---------------------------------------------------------------------------

# Lock files this process holds: path -> (thread ident, fd, token). A thread that already holds an
# output's lock may take it again (a stage locks its output, then the training loop inside it locks the
# same run directory); flock itself would refuse the second open of the file, even in one process.
_held: dict[str, tuple[int, int, object]] = {}
_held_guard = threading.Lock()


def _forget_held_locks() -> None:
    """In a forked child: close the inherited lock descriptors (never unlock them: that would release the
    parent's lock) so the child neither keeps an output locked after its parent dies nor thinks it holds it."""
    for entry in _held.values():
        with contextlib.suppress(OSError):
            os.close(entry[1])
    _held.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_held_locks)


def lock_path(target: str | os.PathLike[str]) -> Path:
    """The lock file of the output ``target``: ``.<name>.lock`` beside it (a hidden sibling, not inside it,
    so a DVC-tracked output directory is not changed by it)."""
    target = Path(os.path.realpath(target))  # two spellings of one output share its lock
    return target.with_name(f".{target.name}.lock")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return True


def read_holder(lock: str | os.PathLike[str]) -> dict[str, Any]:
    """What the holder of ``lock`` recorded in it (pid, host, command, started, what); ``{}`` when nothing
    readable is there or the record is stale (its pid is dead on this host: the flock, not the file, says
    who holds the lock; a new holder may not have written its record yet)."""
    try:
        holder = json.loads(Path(lock).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(holder, dict):
        return {}
    pid = holder.get("pid")
    if holder.get("host") == socket.gethostname() and isinstance(pid, int) and not _alive(pid):
        return {}
    return holder


def _busy_message(target: Path, what: str, lock: Path, holder: dict[str, Any]) -> str:
    if holder:
        by = (f"{holder.get('what') or 'a writer'}: pid {holder.get('pid')} on {holder.get('host')}, "
              f"started {holder.get('started')}, command: {holder.get('command')}")
    else:
        by = "a process that has not recorded itself yet"
    text = (f"{target}: is being written by another process ({by}); {what} refused, nothing written. "
            f"Wait for it to finish or write elsewhere (lock file {lock})")
    return text.replace("\n", " ")


@contextlib.contextmanager
def output_lock(target: str | os.PathLike[str], what: str) -> Iterator[Path]:
    """Hold the advisory lock of the output ``target`` (a file or directory, made or not) for the block, or
    raise :class:`OutputBusyError` at once when another process holds it, naming that process (pid, host,
    command line, start time, read from the lock file it wrote). ``what``: this writer, e.g. ``compress
    stage``. Yields the lock file (:func:`lock_path`).

    The lock is ``fcntl.flock`` on the lock file: the kernel drops it when its holder dies, however it
    dies, so a killed writer never blocks the next one (the pid left in the file is not trusted). A thread
    may nest locks of the same output; another thread or process is refused. Without POSIX ``fcntl`` it
    does not lock: writers then rely on the atomic renames alone."""
    target = Path(target)
    lock = lock_path(target)
    key, me = str(lock), threading.get_ident()
    with _held_guard:
        entry = _held.get(key)
    if entry is not None and entry[0] == me:  # nested in this thread's own lock: the outer block releases it
        yield lock
        return
    try:
        import fcntl
    except ImportError:
        yield lock
        return
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        os.close(fd)
        if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        holder = read_holder(lock)
        raise OutputBusyError(_busy_message(target, what, lock, holder), holder) from None
    token = object()
    with _held_guard:
        _held[key] = (me, fd, token)
    try:
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "command": shlex.join([Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python",
                                         *sys.argv[1:]]),
                  "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "what": what}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode("utf-8"), 0)
        yield lock
    finally:
        with _held_guard:
            mine = _held.get(key, (None, None, None))[2] is token
            if mine:
                del _held[key]
        if mine:  # not in a forked child, whose copy of the descriptor is closed already
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)  # no stale record for the next reader
            os.close(fd)  # releases the lock


def _is_partial(name: str) -> bool:
    """A :func:`writing_dir` work directory (``.<name>.<random>.partial``)."""
    return name.startswith(".") and name.endswith(".partial")


def sweep_leftovers(root: str | os.PathLike[str], depth: int = 2) -> list[Path]:
    """Clear what hard-killed writes left in and beside the output ``root``: :func:`writing_dir` work
    directories (``.*.partial``) are removed; a :func:`replace_dir` swap cut short (``.<name>.old``) is
    finished by :func:`repair_swap` (put back over a missing ``<name>``, else removed). Looks ``depth``
    folders deep (a run's ``snapshots/`` sit one below its root). Returns the leftovers it dealt with.

    Call it only while holding ``root``'s :func:`output_lock`: a live writer's work directory looks the
    same as a dead one's."""
    root = Path(os.path.abspath(root))  # "." has no name to match its siblings by
    found: list[Path] = []

    def visit(folder: Path, level: int, only: str | None) -> None:
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except (FileNotFoundError, NotADirectoryError):
            return
        for entry in entries:
            name, path = entry.name, Path(entry.path)
            if only is not None and not name.startswith(only):
                continue
            if not entry.is_dir(follow_symlinks=False):
                continue
            if _is_partial(name):
                shutil.rmtree(path, ignore_errors=True)
                found.append(path)
            elif name.startswith(".") and name.endswith(".old") and len(name) > len("..old"):
                repair_swap(folder / name[1:-len(".old")])
                found.append(path)
            elif only is None and level < depth:
                visit(path, level + 1, None)

    visit(root.parent, depth, f".{root.name}.")  # root's own work directories and swap, beside it
    if root.is_dir() and not root.is_symlink():
        visit(root, 0, None)
    if found:
        log.warning("%s: cleared %d leftovers of interrupted writes: %s", root, len(found),
                    ", ".join(str(p.relative_to(root.parent)) for p in found))
    return found



@contextlib.contextmanager
def claim_output(target: str | os.PathLike[str], what: str) -> Iterator[Path]:
    """What every stage does before it writes ``target``: hold its :func:`output_lock` for the block and,
    holding it, :func:`sweep_leftovers` (so a swap cut short is put back before anything reads ``target``)."""
    with output_lock(target, what) as lock:
        sweep_leftovers(target)
        yield lock

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
