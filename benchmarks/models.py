"""Models compared by the benchmark: where their folders come from, random initialisation from a
shipped config (for machines without the weights), FLOPs per sentence and the GPU's bf16 peak."""

from __future__ import annotations

import gzip
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from mixsp_core.errors import ConfigError

SPEC_ROOT = Path(__file__).resolve().parent / "models"
# Small files that describe a model without its weights (tokenizer.json is shipped gzipped).
SPEC_FILES = ("config.json", "tokenizer_config.json", "special_tokens_map.json", "modules.json",
              "sentence_bert_config.json", "config_sentence_transformers.json", "1_Pooling/config.json")


@dataclass(frozen=True)
class ModelSpec:
    key: str  # short name used by --models
    hub_id: str | None  # None: the trained student (a checkpoint directory)
    label: str


MODELS: dict[str, ModelSpec] = {
    "minilm": ModelSpec("minilm", "sentence-transformers/all-MiniLM-L6-v2", "all-MiniLM-L6-v2"),
    "student": ModelSpec("student", None, "student (trained, 128-d)"),
    "mpnet": ModelSpec("mpnet", "sentence-transformers/all-mpnet-base-v2", "all-mpnet-base-v2 (teacher)"),
}


def parse_models(text: str) -> list[ModelSpec]:
    """``minilm,student,mpnet`` -> specs; unknown names raise ConfigError naming ``--models``."""
    keys = [k.strip() for k in text.split(",") if k.strip()]
    bad = [k for k in keys if k not in MODELS]
    if bad or not keys:
        raise ConfigError("--models", f"unknown {bad or 'empty list'}; choose from {', '.join(MODELS)}")
    return [MODELS[k] for k in dict.fromkeys(keys)]


def spec_dir(spec: ModelSpec) -> Path:
    return SPEC_ROOT / spec.hub_id.split("/")[-1] if spec.hub_id else SPEC_ROOT / spec.key


def export_spec(source: str | Path, target: str | Path) -> Path:
    """Copy a model folder's small description files (config, tokenizer, sentence-transformers
    modules) into ``target``, with ``tokenizer.json`` gzipped: what ``random_init_dir`` needs."""
    source, target = Path(source), Path(target)
    for name in SPEC_FILES:
        if (source / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source / name, target / name)
    packed = target / "tokenizer.json.gz"
    with open(source / "tokenizer.json", "rb") as src, gzip.GzipFile(packed, "wb", mtime=0) as dst:
        shutil.copyfileobj(src, dst)
    return target


def random_init_dir(spec: ModelSpec, target: Path, seed: int = 0) -> Path:
    """A loadable model folder with random weights, built from the shipped config and tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModel

    source = spec_dir(spec)
    if not (source / "config.json").is_file():
        raise ConfigError("--random-init", f"{source / 'config.json'} is missing: no shipped config for {spec.key}")
    target.mkdir(parents=True, exist_ok=True)
    for name in SPEC_FILES:
        if (source / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source / name, target / name)
    with gzip.open(source / "tokenizer.json.gz", "rb") as src, open(target / "tokenizer.json", "wb") as dst:
        shutil.copyfileobj(src, dst)
    torch.manual_seed(seed)
    config = AutoConfig.from_pretrained(target, trust_remote_code=False)
    AutoModel.from_config(config).save_pretrained(target, safe_serialization=True)
    return target


def model_dir(spec: ModelSpec, random_init: bool, workdir: Path, student: Path | None) -> Path:
    """The folder both sides load: the offline copy (or a random-initialised one) or the student."""
    if spec.hub_id is None:
        if student is None:
            raise FileNotFoundError("no student checkpoint (pass --student DIR)")
        return student
    if random_init:
        return random_init_dir(spec, workdir / spec.key)
    from mixsp_core.models.resolve import resolve_model

    return Path(resolve_model(spec.hub_id))


def encoder_config(folder: Path) -> dict:
    """The HF config of a model folder or of a student checkpoint's ``encoder/``."""
    for candidate in (folder / "encoder" / "config.json", folder / "config.json"):
        if candidate.is_file():
            data = json.loads(candidate.read_text(encoding="utf-8"))
            if "hidden_size" in data:
                return data
    raise FileNotFoundError(f"{folder}: no HF config.json with hidden_size")


def flops_per_sentence(config: dict, tokens: float) -> float:
    """Forward FLOPs of one sentence of ``tokens`` tokens through the transformer layers.

    Per layer: Q, K, V, output projections ``8·T·H²``, feed-forward ``4·T·H·I``, attention scores and
    weighted sum ``4·T²·H`` (multiply-add = 2 FLOPs); embeddings and pooling are negligible.
    """
    h, i, n = int(config["hidden_size"]), int(config["intermediate_size"]), int(config["num_hidden_layers"])
    return n * (8 * tokens * h * h + 4 * tokens * h * i + 4 * tokens * tokens * h)


# Dense bf16 tensor-core peaks from the vendors' data sheets (TFLOP/s, no sparsity). First match wins, so
# the specific names (PCIe / NVL, GH200) come before the plain SXM ones; H200 SXM has H100 SXM's peak.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200 NVL", 835.0),
                    ("GH200", 989.4), ("H200", 989.4), ("A100", 312.0), ("L40S", 362.0), ("A10G", 70.0),
                    ("L4", 121.0))


def peak_bf16_tflops(device_name: str) -> float | None:
    """The data-sheet bf16 peak of a GPU named ``device_name`` (first match), None when unknown."""
    for key, value in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return value
    return None
