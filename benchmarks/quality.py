"""What the reduced-precision CPU options cost in quality: STS-B dev + SICK trial Spearman (the
project's dev metric, as ``mixsp evaluate`` reports it) in fp32, int8 and bf16 on torch, and fp32 and
static int8 on OpenVINO."""

from __future__ import annotations

from pathlib import Path
from typing import Any

SETTINGS = {"fp32": {}, "int8": {"quantize": "int8"}, "bf16": {"precision": "bf16"},
            "openvino fp32": {"backend": "openvino"}, "openvino int8": {"backend": "openvino", "quantize": "int8"}}


def dev_pairs(senteval_dir: str | Path):
    """The dev split (STS-B dev, SICK trial) of the SentEval folder."""
    from mixsp_core.data.sources import load_pairs

    pairs = load_pairs(f"senteval:{senteval_dir}")
    return pairs[pairs["split"] == "dev"]


def dev_scores(embedder: Any, pairs, model: str) -> dict[str, Any]:
    """``{"dev": mean, "tasks": {name: spearman}}`` of anything with ``encode(sentences, batch_size)``."""
    from mixsp_core.evaluate.sts import evaluate_embedder

    result = evaluate_embedder(embedder, pairs, model=model)
    return {"dev": result["dev"], "tasks": {k: v["spearman"] for k, v in result["tasks"].items()}}


def dev_cost(model: str | Path, senteval_dir: str | Path, calibration: list[str] | None = None) -> dict[str, Any]:
    """``{setting: {"dev", "tasks": {name: spearman}}}`` plus ``"delta"`` (setting minus fp32), on CPU.
    ``calibration``: the sentences OpenVINO int8 is calibrated on (the peers' corpus sentences; None: the
    first dev sentences, no labels read)."""
    from mixsp_core.models.encoder import Encoder

    pairs = dev_pairs(senteval_dir)
    if pairs.empty:
        return {"note": f"no dev pairs under {senteval_dir}"}
    out: dict[str, Any] = {"model": str(model), "pairs": int(len(pairs))}
    for name, kwargs in SETTINGS.items():
        encoder = Encoder(model, device="cpu", show_progress=False, **kwargs)
        encoder.calibration = calibration
        out[name] = dev_scores(encoder, pairs, str(model))
    out["delta"] = {name: out[name]["dev"] - out["fp32"]["dev"] for name in SETTINGS if name != "fp32"}
    return out
