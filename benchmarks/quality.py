"""What the reduced-precision CPU options cost in quality: STS-B dev + SICK trial Spearman (the
project's dev metric, as ``mixsp evaluate`` reports it) in fp32, int8 and bf16."""

from __future__ import annotations

from pathlib import Path
from typing import Any

SETTINGS = {"fp32": {}, "int8": {"quantize": "int8"}, "bf16": {"precision": "bf16"}}


def dev_cost(model: str | Path, senteval_dir: str | Path) -> dict[str, Any]:
    """``{setting: {"dev", "tasks": {name: spearman}}}`` plus ``"delta"`` (setting minus fp32), on CPU."""
    from mixsp_core.data.sources import load_pairs
    from mixsp_core.evaluate.sts import evaluate_embedder
    from mixsp_core.models.encoder import Encoder

    pairs = load_pairs(f"senteval:{senteval_dir}")
    pairs = pairs[pairs["split"] == "dev"]
    if pairs.empty:
        return {"note": f"no dev pairs under {senteval_dir}"}
    out: dict[str, Any] = {"model": str(model), "pairs": int(len(pairs))}
    for name, kwargs in SETTINGS.items():
        encoder = Encoder(model, device="cpu", show_progress=False, **kwargs)
        result = evaluate_embedder(encoder, pairs, model=str(model))
        out[name] = {"dev": result["dev"], "tasks": {k: v["spearman"] for k, v in result["tasks"].items()}}
    out["delta"] = {name: out[name]["dev"] - out["fp32"]["dev"] for name in SETTINGS if name != "fp32"}
    return out
