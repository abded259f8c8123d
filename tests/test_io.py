"""mixsp_core.io: atomic file and directory replacement, shared modes, hashes."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import pytest

from mixsp_core import io
from mixsp_core.io import (
    atomic_write,
    exclusive_lock,
    replace_dir,
    sha256_file,
    sha256_text,
    write_json_atomic,
    write_text_atomic,
    writing_dir,
)


@pytest.fixture
def strict_umask():
    """A umask that would make new files 0600 and folders 0700: the writers must set the modes themselves."""
    previous = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# -- files -----------------------------------------------------------------------------------------

def test_atomic_write_replaces_the_file_shared_and_leaves_no_temporary(tmp_path, strict_umask):
    path = tmp_path / "sub" / "out.bin"
    assert atomic_write(path, lambda tmp: tmp.write_bytes(b"first")) == path  # parent created
    assert atomic_write(path, lambda tmp: tmp.write_bytes(b"second")) == path
    assert path.read_bytes() == b"second"
    assert _mode(path) == 0o644
    assert _siblings(path.parent) == ["out.bin"]


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_failing_write_keeps_the_old_file_and_removes_the_temporary(tmp_path, error):
    path = tmp_path / "out.txt"
    path.write_text("old", encoding="utf-8")

    def fail(tmp: Path) -> None:
        tmp.write_text("half", encoding="utf-8")
        raise error

    with pytest.raises(type(error)):
        atomic_write(path, fail)
    assert path.read_text(encoding="utf-8") == "old"
    assert _siblings(tmp_path) == ["out.txt"]


def test_failing_write_of_a_new_file_leaves_nothing(tmp_path):
    def fail(tmp: Path) -> None:
        raise ValueError("no")

    with pytest.raises(ValueError):
        atomic_write(tmp_path / "new.txt", fail)
    assert _siblings(tmp_path) == []


def test_text_and_json_writers_keep_the_exact_bytes(tmp_path, strict_umask):
    record = {"b": 1, "a": [1.5, "é"], "path": Path("x/y")}
    path = write_json_atomic(tmp_path / "r.json", record, default=str)
    assert path.read_bytes() == (json.dumps(record, indent=2, default=str) + "\n").encode("utf-8")
    plain = write_json_atomic(tmp_path / "p.json", {"k": 2})
    assert plain.read_bytes() == b'{\n  "k": 2\n}\n'
    text = write_text_atomic(tmp_path / "t.md", "line\r\nnext é\n")
    assert text.read_bytes() == "line\r\nnext é\n".encode("utf-8")  # no newline translation
    assert {_mode(p) for p in (path, plain, text)} == {0o644}
    with pytest.raises(UnicodeEncodeError):
        write_text_atomic(tmp_path / "keys.txt", "é\n", encoding="ascii")
    assert not (tmp_path / "keys.txt").exists()
    assert _siblings(tmp_path) == ["p.json", "r.json", "t.md"]


# -- directories -----------------------------------------------------------------------------------

def _old_dir(target: Path) -> None:
    target.mkdir(parents=True)
    (target / "old.txt").write_text("old", encoding="utf-8")


def _assert_old_dir(target: Path) -> None:
    assert _siblings(target) == ["old.txt"]
    assert (target / "old.txt").read_text(encoding="utf-8") == "old"


def test_writing_dir_swaps_in_a_shared_tree(tmp_path, strict_umask):
    target = tmp_path / "models" / "model"
    _old_dir(target)
    with writing_dir(target) as work:
        assert work.parent == target.parent and work != target and _siblings(work) == []
        (work / "sub" / "deeper").mkdir(parents=True)
        (work / "config.json").write_text("{}", encoding="utf-8")
        (work / "sub" / "deeper" / "w.bin").write_bytes(b"w")
        os.chmod(work / "config.json", 0o600)
        os.symlink("missing-target", work / "link")  # a link is left alone, not followed
    assert _siblings(target) == ["config.json", "link", "sub"]
    assert _mode(target) == _mode(target / "sub") == _mode(target / "sub" / "deeper") == 0o755
    assert _mode(target / "config.json") == _mode(target / "sub" / "deeper" / "w.bin") == 0o644
    assert os.readlink(target / "link") == "missing-target"
    assert _siblings(target.parent) == ["model"]  # no work or .old directory left


@pytest.mark.parametrize("error", [RuntimeError("export failed"), KeyboardInterrupt()])
def test_writing_dir_interrupted_before_the_rename_keeps_the_old_directory(tmp_path, error):
    target = tmp_path / "model"
    _old_dir(target)
    with pytest.raises(type(error)):
        with writing_dir(target) as work:
            (work / "new.txt").write_text("half", encoding="utf-8")
            raise error
    _assert_old_dir(target)
    assert _siblings(tmp_path) == ["model"]


def test_writing_dir_whose_swap_fails_keeps_the_old_directory(tmp_path, monkeypatch):
    target = tmp_path / "model"
    _old_dir(target)

    def no_rename(src, dst):
        raise OSError("rename refused")

    monkeypatch.setattr(io.os, "replace", no_rename)  # the first rename (old directory aside) fails
    with pytest.raises(OSError, match="rename refused"):
        with writing_dir(target) as work:
            (work / "new.txt").write_text("new", encoding="utf-8")
    _assert_old_dir(target)
    assert _siblings(tmp_path) == ["model"]


def test_replace_dir_creates_or_replaces_the_target(tmp_path, strict_umask):
    work = tmp_path / "work"
    work.mkdir()
    (work / "a.txt").write_text("a", encoding="utf-8")
    target = tmp_path / "out" / "target"
    target.parent.mkdir()
    replace_dir(work, target)
    assert _siblings(target) == ["a.txt"] and not work.exists()
    assert _mode(target) == 0o755 and _mode(target / "a.txt") == 0o644
    second = tmp_path / "second"
    second.mkdir()
    (second / "b.txt").write_text("b", encoding="utf-8")
    replace_dir(second, target)
    assert _siblings(target) == ["b.txt"]
    assert _siblings(target.parent) == ["target"]


# -- locks and hashes ------------------------------------------------------------------------------

def test_exclusive_lock_creates_its_file(tmp_path):
    lock = tmp_path / "deep" / ".lock"
    with exclusive_lock(lock):
        assert lock.is_file()
    with exclusive_lock(lock):  # released: can be taken again
        pass


def test_hashes(tmp_path):
    data = os.urandom(10_000)
    path = tmp_path / "blob"
    path.write_bytes(data)
    expected = hashlib.sha256(data).hexdigest()
    assert sha256_file(path) == sha256_file(path, chunk=7) == expected
    assert sha256_text("é x") == hashlib.sha256("é x".encode("utf-8")).hexdigest()
