"""The ``bi`` student: encoder -> routed projectors -> output projection to k dims.

Each sentence is encoded alone. The projectors transform its pooled state h (mean pooling by
default); the router sees ``concat(mean-pooled state, [CLS] state)``. The routed vector goes through
HPD's output layer ``Dense(d -> k)`` (tanh by default), whose output is the embedding (distilled
towards the PCA_k-projected teacher when HPD is on). Similarity is the cosine of two embeddings.
``forward(batch, layers=[i, ...])`` also embeds from earlier encoder layers through the same heads
(2DMSE / ESE training), which is what the model cut to its first i layers computes.

``encode`` takes the fast path of :mod:`mixsp_core.models.encode_loop` (bulk tokenisation, unpadded
batches of equal token count, ``inference_mode``, CPU batches side by side); ``fast = False`` keeps
the plain padded loop as the reference.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModel, AutoTokenizer, BatchEncoding, PreTrainedModel

from mixsp_core.data.corpus import check_sentences
from mixsp_core.errors import ConfigError
from mixsp_core.models.batching import BulkTokenizer
from mixsp_core.models.encode_loop import encode_with
from mixsp_core.models.inference import InferenceCopy, resolve_inference
from mixsp_core.models.openvino_backend import first_sentences
from mixsp_core.models.pooling import pool
from mixsp_core.models.routing import RoutedProjector, RoutingOutput
from mixsp_core.training.config import ModelConfig

# --------------------------------------------------------------------------- loading the base encoder


def pretrained_encoder(name_or_path: str) -> tuple[PreTrainedModel, object]:
    """The base encoder's pretrained weights and tokenizer (Hub ids resolved to offline copies); a folder
    without tokenizer files, a tokenizer that does not fit the weights or non-finite weights are refused
    (CheckpointError naming the folder)."""
    from mixsp_core.models.encoder import load_hf_model  # SDPA where the architecture has it, else eager
    from mixsp_core.models.integrity import check_loaded_hf_encoder
    from mixsp_core.models.resolve import check_hf_folder, resolve_model

    source = resolve_model(name_or_path)
    if os.path.isdir(source):
        check_hf_folder(source)
    model, tokenizer = load_hf_model(source), AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    check_loaded_hf_encoder(source, tokenizer, model)
    return model, tokenizer


def empty_encoder(folder: str | os.PathLike[str]) -> tuple[PreTrainedModel, object]:
    """An encoder built from the HF config in ``folder`` (weights to be loaded by the caller) and its
    tokenizer; used to rebuild a saved checkpoint without touching the base model."""
    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    try:
        model = AutoModel.from_config(config, attn_implementation="sdpa")
    except ValueError:
        model = AutoModel.from_config(config, attn_implementation="eager")
    return model, AutoTokenizer.from_pretrained(folder, trust_remote_code=False)


def position_limit(encoder: PreTrainedModel, tokenizer) -> int | None:
    """The most tokens ``encoder`` can take: its position table, capped by the tokenizer's own limit (which
    also accounts for RoBERTa-style position offsets); None when neither is known."""
    limits = [getattr(encoder.config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
    known = [int(n) for n in limits if n and n < 1_000_000]  # tokenizers without a limit report ~1e30
    return min(known) if known else None


def check_max_length(config: ModelConfig, encoder: PreTrainedModel, tokenizer) -> None:
    """Refuse ``model.max_length`` beyond what the encoder can take, now rather than at the first long batch
    of training (an index error deep inside the embeddings)."""
    limit = position_limit(encoder, tokenizer)
    if limit is not None and config.max_length > limit:
        raise ConfigError("model.max_length", f"{config.max_length} exceeds the {limit} token positions of encoder "
                          f"{config.encoder}; use at most {limit}")


def autocast_for(device: torch.device, dtype: torch.dtype = torch.bfloat16):
    """bf16 autocast on CUDA, nothing on CPU (bf16 matmuls are slower than fp32 on small CPUs)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


# --------------------------------------------------------------------------- the model


@dataclass
class StudentOutput:
    """``embedding``: ``[batch, k]`` before normalisation; ``routing``: the router's outputs;
    ``layer_embeddings``: ``{i: [batch, k]}`` for the earlier layers asked for (2DMSE / ESE), each computed
    from the pooled output of encoder layer i (1-based) through the same router, projectors and output layer."""

    embedding: torch.Tensor
    routing: RoutingOutput
    layer_embeddings: dict[int, torch.Tensor] = field(default_factory=dict)


class BiStudent(nn.Module):
    """Sentence embedder with MixSP routed projectors and an HPD output layer.

    Build with :meth:`from_config` (pretrained base encoder) or through
    :func:`mixsp_core.models.checkpoint.load_checkpoint`.
    """

    kind = "bi"

    def __init__(self, config: ModelConfig, encoder: PreTrainedModel, tokenizer):
        super().__init__()
        check_max_length(config, encoder, tokenizer)
        self.model_config = config
        self.encoder = encoder
        self.tokenizer = tokenizer
        d = int(encoder.config.hidden_size)
        self.hidden_dim = d
        self.routed = RoutedProjector(d, 2 * d, config.num_projectors, config.routing,
                                      config.projector_mult, config.projector_residual)
        self.output = nn.Linear(d, config.output_dim, bias=config.output_bias) if config.output_dim else None
        self.dims: int | None = None  # keep only the first `dims` outputs in encode (compression)
        # encode's inference-only settings (configure_inference); not part of the checkpoint
        self.fast = True
        self.inference: dict[str, Any] = {"precision": "auto", "quantize": None, "token_budget": "auto",
                                          "backend": "torch"}
        self._encoder_copy = InferenceCopy()

    @classmethod
    def from_config(cls, config: ModelConfig) -> BiStudent:
        encoder, tokenizer = pretrained_encoder(config.encoder)
        return cls(config, encoder, tokenizer)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def configure_inference(self, precision: str = "auto", quantize: str | None = None,
                            token_budget: int | str | None = "auto", fast: bool = True,
                            backend: str = "torch") -> BiStudent:
        """Set how :meth:`encode` runs (not the weights): ``precision`` / ``quantize`` apply to the
        encoder only (a cast / int8-weight copy; pooling, router, projectors and output layer stay float32),
        ``token_budget`` sizes the batches, ``fast=False`` takes the plain loop, ``backend="openvino"`` runs
        the encoder in OpenVINO on the CPU (int8: static, calibrated on the first sentences of the first
        encode; :mod:`mixsp_core.models.openvino_backend`). ``"auto"`` values are
        resolved on the device of each call (see :func:`mixsp_core.models.inference.resolve_inference`);
        bad values raise ValueError now. Returns ``self``."""
        resolve_inference(precision, quantize, token_budget, self.device, backend)
        self.inference = {"precision": precision, "quantize": quantize, "token_budget": token_budget,
                          "backend": backend}
        self.fast = bool(fast)
        return self

    @property
    def dim(self) -> int:
        full = self.model_config.output_dim or self.hidden_dim
        return min(self.dims, full) if self.dims else full

    def tokenize(self, sentences: Sequence[str]) -> BatchEncoding:
        """Padded, truncated (``max_length``) token tensors on the model's device."""
        batch = self.tokenizer(list(sentences), padding=True, truncation=True,
                               max_length=self.model_config.max_length, return_tensors="pt")
        return batch.to(self.device)

    @property
    def num_layers(self) -> int:
        """Transformer layers of the encoder (a checkpoint cut to fewer layers reports its own count)."""
        return int(self.encoder.config.num_hidden_layers)

    @num_layers.setter
    def num_layers(self, value: int) -> None:
        # only the recorded count: compress.layers.limited_layers swaps the layer stack itself and sets this
        self.encoder.config.num_hidden_layers = int(value)

    def route(self, hidden: torch.Tensor, mask: torch.Tensor) -> RoutingOutput:
        """Routed projection of token states ``[batch, tokens, d]`` (any layer's): the projectors see
        the pooled state, the router ``concat(mean-pooled state, first-token state)``."""
        h = pool(self.model_config.pooling, hidden, mask)
        router_input = torch.cat([pool("mean", hidden, mask), hidden[:, 0]], dim=-1)
        return self.routed(h, router_input)

    def features(self, batch: BatchEncoding) -> RoutingOutput:
        """Routed projection of each sentence's pooled state (before the output layer)."""
        return self.route(self.encoder(**batch).last_hidden_state, batch["attention_mask"])

    def head(self, z: torch.Tensor) -> torch.Tensor:
        """The output layer: ``Dense(d -> k)`` then tanh (or identity when there is none)."""
        if self.output is None:
            return z
        y = self.output(z)
        return torch.tanh(y) if self.model_config.output_activation == "tanh" else y

    def forward(self, batch: BatchEncoding, layers: Sequence[int] = ()) -> StudentOutput:
        """Embeddings of a tokenized batch; ``layers`` (1-based, at most ``num_layers``) also gives the
        embedding from each of those earlier layers. A model cut to its first L layers computes exactly
        ``layer_embeddings[L]`` of the full model as its ``embedding``."""
        layers = sorted(set(int(i) for i in layers))
        if any(not 1 <= i <= self.num_layers for i in layers):
            raise ValueError(f"layers must lie in 1..{self.num_layers}, got {layers}")
        mask = batch["attention_mask"]
        out = self.encoder(**batch, output_hidden_states=bool(layers))
        routing = self.route(out.last_hidden_state, mask)
        # hidden_states[0] is the embedding layer's output, hidden_states[i] the output of layer i
        extra = {i: self.head(self.route(out.hidden_states[i], mask).z) for i in layers}
        return StudentOutput(self.head(routing.z), routing, extra)

    def encode(self, sentences: Sequence[str], batch_size: int = 64, show_progress: bool = True,
               normalize: bool | None = None) -> np.ndarray:
        """Embeddings ``(n, k)`` float32, row i for ``sentences[i]``; L2-normalised unless
        ``normalize=False`` (default: the model config's ``normalize``). Runs in eval mode (the
        training mode is restored after), on the fast path unless ``self.fast`` is False."""
        sentences = check_sentences(sentences)
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        normalize = self.model_config.normalize if normalize is None else normalize
        was_training = self.training
        self.eval()
        try:
            if not self.fast:
                return self._encode_plain(sentences, batch_size, show_progress, normalize)
            precision, quantize, budget = resolve_inference(device=self.device, **self.inference)
            max_length, backend = self.model_config.max_length, self.inference["backend"]
            encoder = self._encoder_copy.get(
                self.encoder, precision, quantize, backend,
                lambda: BulkTokenizer(self.tokenizer, max_length)(first_sentences(sentences)),
                streams=torch.get_num_threads())
            return encode_with(sentences, self.tokenizer, self.model_config.max_length,
                               self._fast_forward(encoder, normalize), self.dim, self.device, batch_size,
                               show_progress, token_budget=budget)
        finally:
            self.train(was_training)

    def _fast_forward(self, encoder: nn.Module, normalize: bool):
        """The fast path's forward: ids (and a mask for padded batches) -> final embeddings (float32)."""

        def forward(ids: torch.Tensor, mask: torch.Tensor | None) -> dict[int, torch.Tensor]:
            # no attention mask for an unpadded batch (SDPA's fastest kernel); pooling still needs one
            kwargs = {} if mask is None else {"attention_mask": mask.long()}
            hidden = encoder(input_ids=ids, **kwargs).last_hidden_state.float()
            full = torch.ones_like(ids) if mask is None else mask.long()
            return {-1: self._finish(self.head(self.route(hidden, full).z).float(), normalize)}

        return forward

    def _finish(self, vec: torch.Tensor, normalize: bool) -> torch.Tensor:
        """The first ``dims`` outputs (compression), L2-normalised when ``normalize``."""
        if self.dims:
            vec = vec[:, : self.dims]
        return F.normalize(vec, p=2, dim=-1) if normalize else vec

    @torch.inference_mode()
    def _encode_plain(self, sentences: list[str], batch_size: int, show_progress: bool,
                      normalize: bool) -> np.ndarray:
        """The reference loop: padded batches in character-length order, tokenised per batch
        (fp32 weights, bf16 autocast on CUDA)."""
        result = np.empty((len(sentences), self.dim), dtype=np.float32)
        order = np.argsort([-len(s) for s in sentences], kind="stable")  # similar lengths share a batch
        with autocast_for(self.device), tqdm(total=len(sentences), desc="encode", unit="sent",
                                             disable=not show_progress, leave=False) as bar:
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                vec = self._finish(self(self.tokenize([sentences[i] for i in idx])).embedding.float(), normalize)
                result[idx] = vec.cpu().numpy()
                bar.update(len(idx))
        return result

    def score_pairs(self, left: Sequence[str], right: Sequence[str], batch_size: int = 64,
                    show_progress: bool = False) -> np.ndarray:
        """Cosine similarity of each pair ``(left[i], right[i])``; each distinct sentence encoded once."""
        left, right = check_sentences(left), check_sentences(right)
        unique = list(dict.fromkeys(left + right))
        vectors = self.encode(unique, batch_size=batch_size, show_progress=show_progress, normalize=True)
        row = {s: i for i, s in enumerate(unique)}
        a = vectors[[row[s] for s in left]]
        b = vectors[[row[s] for s in right]]
        return np.einsum("ij,ij->i", a.astype(np.float64), b.astype(np.float64))



# --------------------------------------------------------------------------- output-layer initialisation


@torch.no_grad()
def routed_features(model: BiStudent, sentences: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """The routed features z ``(n, d)`` that feed the output layer."""
    was_training = model.training
    model.eval()
    rows = []
    try:
        with autocast_for(model.device):
            for start in range(0, len(sentences), batch_size):
                batch = model.tokenize(sentences[start:start + batch_size])
                rows.append(model.features(batch).z.float().cpu().numpy())
    finally:
        model.train(was_training)
    return np.concatenate(rows).astype(np.float64)


@torch.no_grad()
def init_output_layer(model: BiStudent, sentences: Sequence[str], targets: np.ndarray | None = None,
                      batch_size: int = 64) -> dict[str, float]:
    """Initialise the output layer from data instead of at random.

    Without ``targets``: the top-k principal directions of the student's own routed features
    (uncentred, as HPD's PCA), so the first output keeps the most variance. With ``targets``
    ``(n, k)`` (the PCA_k-projected teacher embeddings of ``sentences``): the least-squares linear map
    from the features to the targets (through atanh when the layer ends in tanh), so distillation
    starts from the best linear fit. The bias, if any, is set to zero. Returns fit statistics.
    """
    if model.output is None:
        raise ValueError("the model has no output layer (output_dim is 0)")
    feats = routed_features(model, list(sentences), batch_size)
    k = model.output.out_features
    if targets is None:
        if feats.shape[0] < k:
            raise ValueError(f"pca init needs at least {k} sentences, got {feats.shape[0]}")
        from sklearn.decomposition import TruncatedSVD  # uncentred, unlike sklearn's PCA

        svd = TruncatedSVD(n_components=k, algorithm="randomized", random_state=0).fit(feats)
        # scale so the first component's RMS is 1: outputs O(1), tanh not saturated from the start
        scale = 1.0 / max(float(np.sqrt(np.mean(svd.transform(feats)[:, 0] ** 2))), 1e-6)
        weight = svd.components_ * scale
        stats = {"explained_variance_ratio": float(svd.explained_variance_ratio_.sum())}
    else:
        targets = np.asarray(targets, dtype=np.float64)
        if targets.shape != (feats.shape[0], k):
            raise ValueError(f"targets must be ({feats.shape[0]}, {k}), got {targets.shape}")
        if model.model_config.output_activation == "tanh":
            targets = np.arctanh(np.clip(targets, -0.995, 0.995))
        solution, *_ = np.linalg.lstsq(feats, targets, rcond=None)
        weight = solution.T
        residual = targets - feats @ solution
        stats = {"r2": float(1 - residual.var() / max(targets.var(), 1e-12))}
    model.output.weight.copy_(torch.as_tensor(weight, dtype=model.output.weight.dtype))
    if model.output.bias is not None:
        model.output.bias.zero_()
    return stats

