"""A sentence encoder over any Hugging Face encoder folder: AutoModel + pooling (+ L2 normalisation)."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModel, AutoTokenizer, BatchEncoding, PretrainedConfig, PreTrainedModel

from mixsp_core.models.pooling import POOLINGS, pool
from mixsp_core.models.resolve import canonical_id, packaged_model_path, resolve_model

log = logging.getLogger(__name__)


def _load_model(source: str) -> PreTrainedModel:
    """AutoModel from safetensors in float32, with SDPA attention where the architecture has it."""
    kwargs = {"use_safetensors": True, "trust_remote_code": False, "dtype": torch.float32}
    try:
        return AutoModel.from_pretrained(source, attn_implementation="sdpa", **kwargs)
    except ValueError as err:
        if "attention" not in str(err):  # only the "no SDPA for this architecture" refusal
            raise
        log.debug("%s has no SDPA attention, using eager: %s", source, err)
        return AutoModel.from_pretrained(source, attn_implementation="eager", **kwargs)


class Encoder:
    """Encode sentences with a transformer encoder.

    ``name_or_path``: a local HF folder or a Hub id (see :func:`resolve_model`); ``pooling``:
    ``"mean"`` (masked mean of token states) or ``"cls"``; ``normalize``: L2-normalise outputs;
    ``device``: ``"cpu"``, ``"cuda"`` (bf16 autocast while encoding) or None for CUDA when present;
    ``max_length``: tokens kept per sentence (capped by the tokenizer's and the position table's limits);
    ``show_progress``: the default for ``encode``'s tqdm bar.
    """

    def __init__(
        self,
        name_or_path: str | os.PathLike[str],
        pooling: str = "mean",
        normalize: bool = True,
        device: str | torch.device | None = None,
        max_length: int = 256,
        show_progress: bool = True,
    ):
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {max_length}")
        self.name = os.fspath(name_or_path)
        self.pooling = pooling
        self.normalize = normalize
        self.show_progress = show_progress
        self.device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        self.source = resolve_model(self.name)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.source, trust_remote_code=False)
            self.model = _load_model(self.source)
        except OSError:
            # The design's "Hub unreachable" case: a packaged id falls back to its offline copy.
            if Path(self.source).is_dir() or canonical_id(self.source) is None:
                raise
            log.warning("could not load %s from the Hub; using the packaged copy", self.source)
            self.source = str(packaged_model_path(self.source))
            self.tokenizer = AutoTokenizer.from_pretrained(self.source, trust_remote_code=False)
            self.model = _load_model(self.source)
        self.model.to(self.device).eval()
        config = self.model.config
        self.dim: int = int(config.hidden_size)
        self.num_layers: int = int(config.num_hidden_layers)
        # Never feed more tokens than the tokenizer or the position table allows (tiny test models have 128).
        limits = [max_length, getattr(config, "max_position_embeddings", None), self.tokenizer.model_max_length]
        self.max_length = min(int(n) for n in limits if n and n < 1_000_000)

    @property
    def attn_implementation(self) -> str:
        """The attention kernel transformers chose (``"sdpa"`` or ``"eager"``)."""
        return str(getattr(self.model.config, "_attn_implementation", "eager"))

    def __repr__(self) -> str:
        return (
            f"Encoder({self.name!r}, pooling={self.pooling!r}, normalize={self.normalize}, "
            f"device={str(self.device)!r}, max_length={self.max_length}, dim={self.dim})"
        )

    # ------------------------------------------------------------------ differentiable API

    def tokenize(self, sentences: Sequence[str]) -> BatchEncoding:
        """Tokenize a batch (padded, truncated to ``max_length``) as tensors on ``self.device``."""
        batch = self.tokenizer(
            list(sentences), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return batch.to(self.device)

    def forward_pooled(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Pooled (and normalised when ``normalize``) sentence vectors (B, dim); keeps gradients."""
        output = self.model(**batch)
        return self._finish(output.last_hidden_state, batch["attention_mask"])

    def forward_layers(self, batch: Mapping[str, torch.Tensor], layers: Sequence[int]) -> dict[int, torch.Tensor]:
        """Pooled (and normalised) states of hidden layers ``layers`` (0 = embeddings, L = last)."""
        layers = self._check_layers(layers)
        output = self.model(**batch, output_hidden_states=True)
        states = output.hidden_states
        return {layer: self._finish(states[layer], batch["attention_mask"]) for layer in layers}

    def _finish(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        pooled = pool(self.pooling, hidden.float(), mask)  # pool in float32 even under autocast
        return F.normalize(pooled, p=2, dim=-1) if self.normalize else pooled

    def _check_layers(self, layers: Sequence[int]) -> list[int]:
        out = [int(layer) for layer in layers]
        if not out:
            raise ValueError("layers: give at least one layer index")
        bad = [layer for layer in out if not 0 <= layer <= self.num_layers]
        if bad:
            raise ValueError(f"layers {bad} out of range: this model has layers 0..{self.num_layers} (0 = embeddings)")
        return list(dict.fromkeys(out))

    # ------------------------------------------------------------------ inference API

    def encode(
        self, sentences: Sequence[str], batch_size: int = 64, show_progress: bool | None = None
    ) -> np.ndarray:
        """Embeddings (n, dim) float32, row i for ``sentences[i]`` (``show_progress`` None: the instance default)."""
        out = self._run(sentences, batch_size, show_progress, layers=None)
        return out[-1]

    def encode_layers(
        self,
        sentences: Sequence[str],
        layers: Sequence[int],
        batch_size: int = 64,
        show_progress: bool | None = None,
    ) -> dict[int, np.ndarray]:
        """Pooled (and normalised) states of each requested hidden layer: ``{layer: (n, dim) float32}``."""
        return self._run(sentences, batch_size, show_progress, layers=self._check_layers(layers))

    def _run(
        self, sentences: Sequence[str], batch_size: int, show_progress: bool | None, layers: list[int] | None
    ) -> dict[int, np.ndarray]:
        sentences = _check_sentences(sentences)
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        keys = layers if layers is not None else [-1]
        result = {k: np.empty((len(sentences), self.dim), dtype=np.float32) for k in keys}
        # Longest first: similar lengths share a batch, so little padding; rows go back by index.
        order = np.argsort([-len(s) for s in sentences], kind="stable")
        show = self.show_progress if show_progress is None else show_progress
        bar = tqdm(total=len(sentences), desc="encode", unit="sent", disable=not show, leave=False)
        with torch.inference_mode(), self._autocast(), bar:
            for idx in _chunks(order, batch_size):
                batch = self.tokenize([sentences[i] for i in idx])
                if layers is None:
                    pooled = {-1: self.forward_pooled(batch)}
                else:
                    pooled = self.forward_layers(batch, layers)
                for k, vec in pooled.items():
                    result[k][idx] = vec.float().cpu().numpy()
                bar.update(len(idx))
        return result

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()


def _check_sentences(sentences: Sequence[str]) -> list[str]:
    if isinstance(sentences, str):
        raise TypeError("encode expects a sequence of sentences, not one string")
    out = list(sentences)
    for i, s in enumerate(out):
        if not isinstance(s, str):
            raise TypeError(f"sentence {i} is {type(s).__name__}, not str")
    return out


def _chunks(order: np.ndarray, size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(order), size):
        yield order[start : start + size]


def load_config(name_or_path: str) -> PretrainedConfig:
    """The model's config only (cheap): for dims and layer counts without loading weights."""
    return AutoConfig.from_pretrained(resolve_model(name_or_path), trust_remote_code=False)
