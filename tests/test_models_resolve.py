"""Model name resolution: local folders, packaged Hub ids, online/offline, split-zip unpacking."""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path

import pytest

from mixsp_core.errors import CheckpointError
from mixsp_core.models import resolve
from mixsp_core.models.resolve import (
    MINILM_ID,
    MPNET_ID,
    MPNET_ZIP_SIZE,
    ModelNotAvailableError,
    canonical_id,
    join_parts,
    mpnet_part_paths,
    resolve_model,
    unpack_split_zip,
    verify_sha256,
)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MIXSP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("MIXSP_PREFER_PACKAGED", raising=False)


def _go_online(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def test_existing_directory_is_returned_as_is(tmp_path):
    assert resolve_model(tmp_path) == str(tmp_path)
    assert resolve_model(str(tmp_path)) == str(tmp_path)


def test_missing_local_path_is_an_error(tmp_path):
    with pytest.raises(ModelNotAvailableError, match="not a model directory"):
        resolve_model(str(tmp_path / "nope"))
    a_file = tmp_path / "weights.bin"
    a_file.write_bytes(b"x")
    with pytest.raises(ModelNotAvailableError, match="not a model directory"):
        resolve_model(str(a_file))


def test_canonical_ids():
    assert canonical_id("all-MiniLM-L6-v2") == MINILM_ID
    assert canonical_id("sentence-transformers/all-minilm-l6-v2") == MINILM_ID
    assert canonical_id("all-mpnet-base-v2") == MPNET_ID
    assert canonical_id("bert-base-uncased") is None


def test_offline_packaged_minilm_is_verified_and_stamped(minilm_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert Path(resolve_model("all-MiniLM-L6-v2")) == minilm_dir
    stamps = list((tmp_path / "cache" / "verified").glob("*.json"))
    assert len(stamps) == 1
    assert Path(resolve_model(MINILM_ID)) == minilm_dir


def test_offline_unknown_id_names_packaged_ids(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotAvailableError) as err:
        resolve_model("someone/unknown-model-xyz")
    msg = str(err.value)
    assert "someone/unknown-model-xyz" in msg and MINILM_ID in msg and MPNET_ID in msg
    assert "local model directory" in msg


def test_online_returns_hub_id_unless_packaged_preferred(minilm_dir, monkeypatch):
    _go_online(monkeypatch)
    assert resolve_model("all-MiniLM-L6-v2") == MINILM_ID
    assert resolve_model("someone/unknown-model-xyz") == "someone/unknown-model-xyz"
    monkeypatch.setenv("MIXSP_PREFER_PACKAGED", "1")
    assert Path(resolve_model("all-MiniLM-L6-v2")) == minilm_dir
    assert resolve_model("someone/unknown-model-xyz") == "someone/unknown-model-xyz"


def test_mpnet_parts_are_installed_and_sum_to_the_zip_size():
    parts = mpnet_part_paths()
    assert [p.name for p in parts] == [f"all-mpnet-base-v2.zip.{n:03d}" for n in range(1, 6)]
    assert sum(p.stat().st_size for p in parts) == MPNET_ZIP_SIZE


# --------------------------------------------------------------------------- hashing


def test_verify_sha256_names_the_file_and_stamps(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"weights")
    good = hashlib.sha256(b"weights").hexdigest()
    stamps = tmp_path / "stamps"
    verify_sha256(f, good, stamps)
    assert len(list(stamps.iterdir())) == 1
    with pytest.raises(CheckpointError, match=r"model\.safetensors: sha256"):
        verify_sha256(f, "0" * 64)
    # A changed file (new size/mtime) is re-hashed despite the stamp.
    f.write_bytes(b"tampered weights")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        verify_sha256(f, good, stamps)
    with pytest.raises(CheckpointError, match="missing"):
        verify_sha256(tmp_path / "absent", good)


# --------------------------------------------------------------------------- split zip


def _fake_split_zip(tmp_path: Path, weights: bytes, n_parts: int = 3) -> tuple[list[Path], int]:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("fake-model/", "")
        zf.writestr("fake-model/model.safetensors", weights)
        zf.writestr("fake-model/config.json", '{"model_type": "bert"}')
        zf.writestr("fake-model/desktop.ini", "[.ShellClassInfo]")
        zf.writestr("fake-model/1_Pooling/config.json", "{}")
        zf.writestr("fake-model/1_Pooling/desktop.ini", "[.ShellClassInfo]")
    data = buf.getvalue()
    step = len(data) // n_parts + 1
    parts = []
    for i in range(n_parts):
        part = tmp_path / "parts" / f"fake.zip.{i + 1:03d}"
        part.parent.mkdir(exist_ok=True)
        part.write_bytes(data[i * step : (i + 1) * step])
        parts.append(part)
    return parts, len(data)


WEIGHTS = b"\x00\x01fake safetensors payload" * 100
WEIGHTS_SHA = hashlib.sha256(WEIGHTS).hexdigest()


def test_join_parts_streams_in_order(tmp_path):
    parts, size = _fake_split_zip(tmp_path, WEIGHTS)
    joined = join_parts(parts, tmp_path / "joined.zip", expected_size=size)
    assert joined.read_bytes() == b"".join(p.read_bytes() for p in parts)
    with pytest.raises(CheckpointError, match="joined size"):
        join_parts(parts[:-1], tmp_path / "short.zip", expected_size=size)


def test_unpack_split_zip_once_and_reuse(tmp_path, monkeypatch):
    parts, size = _fake_split_zip(tmp_path, WEIGHTS)
    target = tmp_path / "models" / "fake-model"
    target.parent.mkdir()
    out = unpack_split_zip(parts, target, {"model.safetensors": WEIGHTS_SHA}, expected_size=size)
    assert out == target
    assert (target / "model.safetensors").read_bytes() == WEIGHTS
    assert (target / "config.json").is_file() and (target / "1_Pooling" / "config.json").is_file()
    assert not list(target.rglob("desktop.ini"))
    assert sorted(p.name for p in target.parent.iterdir() if not p.name.endswith(".lock")) == ["fake-model"]

    # Second call reuses the folder: joining again would fail loudly.
    def no_join(*args, **kwargs):
        raise AssertionError("joined again")

    monkeypatch.setattr(resolve, "join_parts", no_join)
    assert unpack_split_zip(parts, target, {"model.safetensors": WEIGHTS_SHA}, expected_size=size) == target
    # A later corruption of the unpacked weights is caught on reuse.
    (target / "model.safetensors").write_bytes(WEIGHTS + b"!")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        unpack_split_zip(parts, target, {"model.safetensors": WEIGHTS_SHA}, expected_size=size)


@pytest.mark.parametrize("bad", ["sha", "size"])
def test_failed_unpack_leaves_no_folder(tmp_path, bad):
    parts, size = _fake_split_zip(tmp_path, WEIGHTS)
    target = tmp_path / "models" / "fake-model"
    target.parent.mkdir()
    sha = "f" * 64 if bad == "sha" else WEIGHTS_SHA
    expected_size = size + 1 if bad == "size" else size
    with pytest.raises(CheckpointError, match="model.safetensors" if bad == "sha" else "joined size"):
        unpack_split_zip(parts, target, {"model.safetensors": sha}, expected_size=expected_size)
    assert [p.name for p in target.parent.iterdir() if not p.name.endswith(".lock")] == []


def test_zip_member_escaping_the_folder_is_refused(tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("model/config.json", "{}")
        zf.writestr("../evil.txt", "x")
    part = tmp_path / "evil.zip.001"
    part.write_bytes(buf.getvalue())
    target = tmp_path / "models" / "m"
    target.parent.mkdir()
    with pytest.raises(CheckpointError, match="outside"):
        unpack_split_zip([part], target, {})
    assert not (tmp_path / "evil.txt").exists() and not target.exists()
