"""make bench's peer table logic (no timing): which variants a sweep adds, the per-repeat ratio to the
fastest sentence-transformers-side row, the markdown row, the int8 config choice, what a peer's cache key
depends on, and the bench venv's torch pin."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from benchmarks.corpus import REPO_ROOT
from benchmarks.models import MODELS
from benchmarks.peers import PEERS, cache_key, int8_config_name
from benchmarks.run import (ModelRun, Variant, _calibration_file, calibration_path, markdown, peer_variants, summarise,
                            variants_for)


def test_peer_variants_add_the_best_batch_only_where_it_differs():
    best = {key: 64 for key in PEERS} | {"onnx-o3": 32, "torch": 128}
    variants = peer_variants(best, 64)
    names = [v.name for v in variants]
    assert names.count("st onnx O3 b64") == 1 and "st onnx O3 b32" in names
    assert "st torch fp32 b64" in names and "st torch fp32 b128" in names  # the bench venv's torch, both sizes
    assert "st openvino b64" in names and len(names) == len(PEERS) + 2
    assert all(v.side == "peer" and v.baseline == "st fp32" for v in variants)
    assert {v.peer for v in variants} == set(PEERS)


def test_cpu_variants_run_ours_on_openvino_with_the_peers_calibration(tmp_path):
    variants = {v.name: v for v in variants_for(MODELS["minilm"], "cpu", int8=True)}
    ov, ov_int8 = variants["mixsp openvino fp32"], variants["mixsp openvino int8"]
    assert (ov.backend, ov.quantize, ov_int8.backend, ov_int8.quantize) == ("openvino", None, "openvino", "int8")
    assert variants["mixsp fp32"].backend == "torch"
    assert "mixsp openvino int8" not in {v.name for v in variants_for(MODELS["minilm"], "cpu", int8=False)}
    assert all(v.backend == "torch" for v in variants_for(MODELS["minilm"], "cuda", int8=True))
    run = _run({}, list(variants.values()))
    assert _calibration_file(tmp_path, run, ov_int8) is None  # no peers prepared: ours calibrates on its warm-up
    calibration_path(tmp_path, "minilm").write_text("a\n", encoding="utf-8")
    assert _calibration_file(tmp_path, run, ov_int8) == str(calibration_path(tmp_path, "minilm"))
    assert _calibration_file(tmp_path, run, ov) is None  # fp32 reads no calibration


def _run(rates: dict[str, list[float]], variants: list[Variant]) -> ModelRun:
    run = ModelRun(MODELS["minilm"], Path("/nowhere"), ["a"], 5.0, {}, variants)
    for name, values in rates.items():
        run.results[name] = [{"rate": r, "rss_delta_bytes": 2**20, "load_seconds": 1.0, "dim": 384, "threads": 2}
                             for r in values]
    run.peer_info = {"onnx-o3": {"best_batch": 32, "quality": {"dev": 80.5, "tasks": {"STSBenchmark-dev": 86.0}}}}
    return run


def test_fastest_ratio_is_per_repeat_against_the_fastest_st_side_row():
    variants = [Variant("st fp32", "st"), Variant("mixsp fp32", "mixsp", "fp32", baseline="st fp32"),
                Variant("st onnx O3 b32", "peer", peer="onnx-o3", batch_size=32, baseline="st fp32")]
    # repeat 1 the O3 row is 2x torch, repeat 2 4x; mixsp beats O3 in repeat 1 only
    run = _run({"st fp32": [100, 50], "mixsp fp32": [300, 150], "st onnx O3 b32": [200, 200]}, variants)
    rows = {r["variant"]: r for r in summarise(run, "cpu", None)["variants"]}
    assert {r["fastest"] for r in rows.values()} == {"st onnx O3 b32"}
    assert rows["mixsp fp32"]["ratio_fastest"]["min"] == 0.75 and rows["mixsp fp32"]["ratio_fastest"]["max"] == 1.5
    assert rows["st onnx O3 b32"]["ratio"]["median"] == 3.0  # (2 + 4) / 2 against st fp32
    assert rows["st onnx O3 b32"]["dev"]["dev"] == 80.5 and "dev" not in rows["mixsp fp32"]
    table = markdown({"encode": [summarise(run, "cpu", None)], "batch_size": 64, "notes": []})
    o3 = next(line for line in table.splitlines() if "| st onnx O3 b32 |" in line)
    assert "vs fastest ST (st onnx O3 b32)" in o3 and "batch 32" in o3 and "dev Spearman 80.50" in o3


def test_the_runtime_precision_a_peer_chose_shows_in_its_row():
    variant = Variant("st openvino b64", "peer", peer="openvino", batch_size=64, baseline="st fp32")
    run = _run({"st fp32": [100], "st openvino b64": [150]}, [Variant("st fp32", "st"), variant])
    run.results["st openvino b64"][0]["runtime"] = {"backend": "openvino", "threads": 2, "precision": "bf16"}
    table = markdown({"encode": [summarise(run, "cpu", None)], "batch_size": 64, "notes": []})
    row = next(line for line in table.splitlines() if "| st openvino b64 |" in line)
    assert "runs in bf16" in row and "1.50 (1.50-1.50)x vs st fp32" in row


def test_no_peer_rows_means_no_fastest_column():
    run = _run({"st fp32": [100], "mixsp fp32": [300]},
               [Variant("st fp32", "st"), Variant("mixsp fp32", "mixsp", "fp32", baseline="st fp32")])
    assert all("ratio_fastest" not in r for r in summarise(run, "cpu", None)["variants"])


def test_int8_config_follows_the_cpu_flags():
    assert int8_config_name("flags\t: fpu avx2 avx512f avx512_vnni\n") == "avx512_vnni"
    assert int8_config_name("flags\t: fpu avx2 avx512f\n") == "avx512"
    assert int8_config_name("flags\t: fpu avx2\n") == "avx2"
    assert int8_config_name("Features\t: fp asimd\n") == "arm64"
    with pytest.raises(RuntimeError, match="cpuinfo"):
        int8_config_name("flags\t: fpu sse2\n")


def test_cache_key_binds_weights_peer_versions_and_only_the_inputs_a_step_reads(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    versions = {"sentence-transformers": "5.7.0", "openvino": "2026.4.1"}

    def key(peer, versions=versions, calibration=("a", "b"), int8="avx2"):
        return cache_key(tmp_path, PEERS[peer], versions, list(calibration), int8)

    assert key("onnx") != key("onnx-o3") != key("openvino-int8")
    assert key("openvino-int8") != key("openvino-int8", versions={**versions, "openvino": "2026.5.0"})
    assert key("openvino-int8") != key("openvino-int8", calibration=("a", "c"))
    assert key("openvino") == key("openvino", calibration=("a", "c"))  # only the static step reads them
    assert key("onnx-int8") != key("onnx-int8", int8="avx512_vnni") and key("onnx") == key("onnx", int8="x")
    before = key("onnx")
    (tmp_path / "model.safetensors").write_bytes(b"new weights, another size")
    assert key("onnx") != before


def test_bench_venv_keeps_the_products_torch():
    def torch_pin(path: Path) -> str:
        pins = re.findall(r"^torch==(\S+)", path.read_text(encoding="utf-8"), flags=re.M)
        assert len(pins) == 1, path
        return pins[0]

    assert torch_pin(REPO_ROOT / "benchmarks" / "requirements.txt") == torch_pin(REPO_ROOT / "requirements.txt")


def test_only_and_peer_keys_narrow_a_run():
    from benchmarks.run import selected

    int8 = Variant("mixsp openvino int8", "mixsp")
    assert selected(int8, "") and selected(int8, "st fp32, int8") and not selected(int8, "st fp32")
    names = [v.name for v in peer_variants({"openvino-int8": 32}, 64)]  # only the peers that were prepared
    assert names == ["st openvino int8 static b64", "st openvino int8 static b32"]
