"""make bench's peers: sentence-transformers' own torch, ONNX Runtime and OpenVINO backends, run as a user
runs them (``pip install sentence-transformers[onnx,openvino]``, then the calls below).

Those extras cannot be installed beside the product's pins (benchmarks/requirements.txt says why), so the
peers live in a venv of their own, ``.venv-bench`` (built by ``make bench``): every peer process is
:mod:`benchmarks.encode_worker` started with that venv's python. This module is imported in both venvs, so at
module level it needs only what both have (the standard library, numpy, pure-Python project code on
``PYTHONPATH``); sentence-transformers and its backends are imported inside the functions run in the bench venv.

Each peer (:data:`PEERS`) is ``SentenceTransformer(folder, backend=..., model_kwargs={"file_name": ...},
device="cpu")`` on a folder that sentence-transformers' own calls build once (:func:`export_peer`) into
``data/bench_cache/<model>-<peer>-<key>``, the key binding the model's weights, the peer, the recipe, the
bench venv's package versions and (static int8 only) the calibration sentences:

- ``torch``: ``SentenceTransformer(model_dir)`` in the bench venv's versions, no export: it separates the
  version difference from the backend difference in the other rows;
- ``onnx``: ``SentenceTransformer(model_dir, backend="onnx")`` (optimum exports the graph on load), then
  ``model.save_pretrained(folder)``;
- ``onnx-o3``: ``export_optimized_onnx_model(model, "O3", folder)``, optimum's highest CPU level (O4 adds fp16,
  for GPUs only);
- ``onnx-int8``: ``export_dynamic_quantized_onnx_model(model, <this CPU's config>, folder)``, the config from
  ``/proc/cpuinfo`` (:func:`int8_config_name`);
- ``openvino``: ``SentenceTransformer(model_dir, backend="openvino")``, then ``model.save_pretrained(folder)``;
  on a CPU with bf16 support OpenVINO then runs in bf16 (its default precision hint);
- ``openvino-f32``: the same export loaded with ``model_kwargs={"ov_config": {"INFERENCE_PRECISION_HINT":
  "f32"}}``: what a user who needs fp32 outputs runs;
- ``openvino-int8``: ``export_static_quantized_openvino_model(model, OVQuantizationConfig(), folder,
  dataset_name=<a local folder>, ...)``: the function loads its calibration set with ``datasets.load_dataset``,
  which also takes a local folder of data files, so it gets a ``train.jsonl`` of corpus sentences and needs no
  network (``OVQuantizationConfig()``'s defaults then calibrate on 128 of them, shuffled).

A peer's plain file (``onnx/model.onnx``, ``openvino/openvino_model.xml``) is removed from an O3 / int8 folder
once the derived file is written: the row loads only its own file.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.corpus import REPO_ROOT

CACHE_ROOT = REPO_ROOT / "data" / "bench_cache"
BENCH_PYTHON = REPO_ROOT / ".venv-bench" / "bin" / "python"
RECIPE = 1  # bump when an export call below changes: the cache key includes it
INFO = "peer.json"
O_LEVEL = "O3"
CALIBRATION_SENTENCES = 300
# the bench venv's packages that shape an exported file or the runtime that runs it
VERSIONED = ("sentence-transformers", "transformers", "torch", "optimum", "optimum-onnx", "optimum-intel",
             "onnx", "onnxruntime", "openvino", "nncf", "datasets")


@dataclass(frozen=True)
class Peer:
    key: str
    label: str
    backend: str  # SentenceTransformer(..., backend=)
    step: str | None = None  # the sentence_transformers.backend export that adds its file; None: the plain export
    ov_config: tuple[tuple[str, str], ...] = ()  # OpenVINO properties passed at load (model_kwargs["ov_config"])


PEERS: dict[str, Peer] = {p.key: p for p in (
    Peer("torch", "st torch fp32", "torch"),
    Peer("onnx", "st onnx fp32", "onnx"),
    Peer("onnx-o3", f"st onnx {O_LEVEL}", "onnx", "optimized"),
    Peer("onnx-int8", "st onnx int8 dynamic", "onnx", "dynamic-int8"),
    Peer("openvino", "st openvino", "openvino"),
    Peer("openvino-f32", "st openvino f32", "openvino", ov_config=(("INFERENCE_PRECISION_HINT", "f32"),)),
    Peer("openvino-int8", "st openvino int8 static", "openvino", "static-int8"),
)}


def int8_config_name(cpuinfo: str | None = None) -> str:
    """The ``export_dynamic_quantized_onnx_model`` config matching this CPU (``/proc/cpuinfo`` flags)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            cpuinfo = ""
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
    if "avx512_vnni" in flags:
        return "avx512_vnni"
    if "avx512f" in flags:
        return "avx512"
    if "avx2" in flags:
        return "avx2"
    if "asimd" in flags:
        return "arm64"
    raise RuntimeError("/proc/cpuinfo: none of avx512_vnni, avx512f, avx2, asimd; sentence-transformers has no "
                       "dynamic int8 config for this CPU")


def package_versions() -> dict[str, str]:
    """Installed versions of :data:`VERSIONED` (run in the bench venv)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in VERSIONED:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "absent"
    return out


def cache_key(model_dir: Path, peer: Peer, versions: dict[str, str], calibration: Sequence[str],
              int8_config: str) -> str:
    """What a peer's folder depends on: the model's weights (path, name, size, mtime), the peer and recipe,
    the package versions, and what only one step reads (the calibration sentences, the int8 config)."""
    from mixsp_core.io import sha256_text

    weights = sorted(model_dir.glob("*.safetensors"))
    stamp: list[Any] = [str(model_dir.resolve()), peer.key, RECIPE, versions,
                        [[p.name, p.stat().st_size, int(p.stat().st_mtime)] for p in weights]]
    if peer.step == "static-int8":
        stamp.append(sha256_text("\n".join(calibration)))
    if peer.step == "dynamic-int8":
        stamp.append(int8_config)
    return sha256_text(json.dumps(stamp))[:12]


def _model_files(folder: Path) -> set[Path]:
    return {p for p in folder.iterdir() if p.suffix in (".onnx", ".xml", ".bin", ".onnx_data")} \
        if folder.is_dir() else set()


def _run_step(peer: Peer, model: Any, folder: Path, calibration: Sequence[str], int8_config: str) -> None:
    """The sentence-transformers export call of ``peer.step`` into ``folder``."""
    from sentence_transformers.backend import (
        export_dynamic_quantized_onnx_model,
        export_optimized_onnx_model,
        export_static_quantized_openvino_model,
    )

    if peer.step == "optimized":
        export_optimized_onnx_model(model, O_LEVEL, str(folder))
    elif peer.step == "dynamic-int8":
        export_dynamic_quantized_onnx_model(model, int8_config, str(folder))
    elif peer.step == "static-int8":
        from optimum.intel import OVQuantizationConfig

        with tempfile.TemporaryDirectory(prefix="calibration-") as data:
            Path(data, "train.jsonl").write_text("".join(json.dumps({"sentence": s}) + "\n" for s in calibration),
                                                 encoding="utf-8")
            export_static_quantized_openvino_model(model, OVQuantizationConfig(), str(folder), dataset_name=data,
                                                   dataset_config_name="default", dataset_split="train",
                                                   column_name="sentence")
    else:
        raise ValueError(f"peer {peer.key}: unknown export step {peer.step!r}")


def export_peer(model_dir: Path, name: str, peer: Peer, calibration: Sequence[str], root: Path = CACHE_ROOT,
                log: Callable[[str], None] = print) -> dict[str, Any]:
    """``peer``'s folder for ``model_dir`` (built once, kept when complete) and its :data:`INFO` record;
    ``torch`` has none (it loads ``model_dir`` itself)."""
    import time

    from mixsp_core.io import write_json_atomic, writing_dir

    if peer.backend == "torch":
        return {"folder": str(model_dir), "file_name": None, "versions": package_versions()}
    versions, int8_config = package_versions(), int8_config_name()
    target = root / f"{name}-{peer.key}-{cache_key(model_dir, peer, versions, calibration, int8_config)}"
    if (target / INFO).is_file():
        return {"folder": str(target), **json.loads((target / INFO).read_text(encoding="utf-8"))}
    from sentence_transformers import SentenceTransformer

    t0 = time.perf_counter()
    with writing_dir(target) as work:
        model = SentenceTransformer(str(model_dir), backend=peer.backend, device="cpu")
        model.save_pretrained(str(work))  # the backend's plain export: onnx/model.onnx, openvino/openvino_model.*
        files = work / peer.backend
        plain = _model_files(files)
        if peer.step is not None:
            _run_step(peer, model, work, calibration, int8_config)
            derived = _model_files(files) - plain
            if not any(p.suffix in (".onnx", ".xml") for p in derived):
                raise RuntimeError(f"{peer.key}: {peer.step} wrote no model file into {files}")
            for path in plain:
                path.unlink()
        graph = sorted(p for p in _model_files(files) if p.suffix in (".onnx", ".xml"))
        if len(graph) != 1:
            raise RuntimeError(f"{peer.key}: expected one model file in {files}, found {[p.name for p in graph]}")
        info = {"peer": peer.key, "file_name": graph[0].relative_to(work).as_posix(), "recipe": RECIPE,
                "source": str(model_dir), "versions": versions, "export_seconds": time.perf_counter() - t0,
                **({"o_level": O_LEVEL} if peer.step == "optimized" else {}),
                **({"int8_config": int8_config} if peer.step == "dynamic-int8" else {}),
                **({"calibration_sentences": len(calibration)} if peer.step == "static-int8" else {})}
        write_json_atomic(work / INFO, info)
    log(f"bench cache: {peer.label} exported in {info['export_seconds']:.0f} s -> {target}")
    return {"folder": str(target), **info}


def load_peer(job: dict[str, Any]):
    """The ``SentenceTransformer`` of ``job["peer"]`` on ``job["peer_dir"]`` (torch: ``job["model_dir"]``);
    ``job["threads"]`` reaches ONNX Runtime's intra-op pool or OpenVINO's ``INFERENCE_NUM_THREADS``."""
    from sentence_transformers import SentenceTransformer

    peer = PEERS[job["peer"]]
    threads = job.get("threads")
    if peer.backend == "torch":
        return SentenceTransformer(job["model_dir"], device="cpu")
    folder = Path(job["peer_dir"])
    kwargs: dict[str, Any] = {"file_name": json.loads((folder / INFO).read_text(encoding="utf-8"))["file_name"]}
    if threads and peer.backend == "onnx":
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = int(threads)
        kwargs["session_options"] = options
    if peer.backend == "openvino" and (threads or peer.ov_config):
        kwargs["ov_config"] = {**dict(peer.ov_config), **({"INFERENCE_NUM_THREADS": int(threads)} if threads else {})}
    return SentenceTransformer(str(folder), backend=peer.backend, model_kwargs=kwargs, device="cpu")


def runtime_info(model: Any, peer_key: str) -> dict[str, Any]:
    """What the runtime chose where the user did not: threads (None: the runtime's default) and, for OpenVINO,
    the inference precision (on a CPU with bf16 support its default is bf16, not the graph's f32)."""
    backend = PEERS[peer_key].backend
    inner = model[0].auto_model
    if backend == "onnx":
        return {"backend": backend, "threads": inner.session.get_session_options().intra_op_num_threads or None}
    if backend == "openvino":
        request = inner.request  # compiled on first use: call after an encode
        return {"backend": backend, "threads": int(request.get_property("INFERENCE_NUM_THREADS")),
                "precision": request.get_property("INFERENCE_PRECISION_HINT").get_type_name()}
    import torch

    return {"backend": backend, "threads": torch.get_num_threads()}
