"""A sentence encoder over any Hugging Face encoder folder: AutoModel + pooling (+ L2 normalisation)."""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, AutoTokenizer, BatchEncoding, PretrainedConfig, PreTrainedModel

from mixsp_core.data.corpus import check_sentences
from mixsp_core.models.batching import BulkTokenizer, default_chunk_size
from mixsp_core.models.encode_loop import encode_planned, iter_planned, key_blocks
from mixsp_core.models.inference import InferenceCopy, resolve_inference
from mixsp_core.models.integrity import check_loaded_hf_encoder
from mixsp_core.models.malloc_tuning import tune_malloc
from mixsp_core.models.pooling import POOLINGS, mean_pool, pool
from mixsp_core.models.resolve import canonical_id, check_hf_folder, packaged_model_path, resolve_model
from mixsp_core.models.openvino_backend import first_sentences
from mixsp_core.models.tokenize_pool import TokenizerProcessPool
from mixsp_core.progress import encode_bar

log = logging.getLogger(__name__)


def load_hf_model(source: str) -> PreTrainedModel:
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

    ``encode`` / ``encode_layers`` take the fast path (``fast=True``, see :mod:`mixsp_core.models.batching`):
    bulk tokenisation, batches of sentences of exactly equal token count (no padding, no attention
    mask), ``inference_mode``. Inference-only settings:

    * ``precision``: ``"auto"`` (bf16 weights on CUDA, fp32 on CPU), ``"fp32"``, ``"bf16"``, ``"fp16"``;
      a non-fp32 precision runs a cast copy of the model (pooling and outputs stay float32);
    * ``quantize``: ``"int8"`` runs a copy with dynamically quantised weights (``nn.Linear`` in int8; CPU,
      fp32 only; see :mod:`mixsp_core.models.inference`);
    * ``token_budget``: tokens per batch (``batch_size`` then gives way to ``token_budget // length``);
      ``"auto"``: 65536 on CUDA, None (``batch_size`` sentences) on CPU;
    * ``cpu_workers`` (attribute): on CPU, batches run side by side on this many threads with one
      intra-op thread each (default: ``torch.get_num_threads()``; 1 splits each op across threads);
    * ``tokenize_processes`` (attribute): tokenise in this many worker processes
      (:class:`~mixsp_core.models.tokenize_pool.TokenizerProcessPool`, started at the first encode; a
      fast tokenizer only); 0: threads in this process. Default: on CUDA the host's cores but two (the
      GPU outruns one process's tokeniser), on CPU 0 (the cores are the model's);
    * ``backend``: ``"torch"``, or ``"openvino"`` (CPU: the transformer converted and compiled by OpenVINO,
      fp32 equal to torch's vectors, bf16, or static int8 calibrated on the first sentences encoded; see
      :mod:`mixsp_core.models.openvino_backend`);
    * ``fast=False``: the plain loop (padded batches in character-length order, fp32 weights with
      bf16 autocast on CUDA), kept as the reference.

    The copies are rebuilt when the weights of ``self.model`` change in place (training).
    """

    def __init__(
        self,
        name_or_path: str | os.PathLike[str],
        pooling: str = "mean",
        normalize: bool = True,
        device: str | torch.device | None = None,
        max_length: int = 256,
        show_progress: bool = True,
        precision: str = "auto",
        quantize: str | None = None,
        token_budget: int | str | None = "auto",
        fast: bool = True,
        backend: str = "torch",
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
        settings = resolve_inference(precision, quantize, token_budget, self.device, backend)
        self.backend = backend
        self.precision: str = settings[0]
        self.quantize: str | None = settings[1]
        self.token_budget: int | None = settings[2]
        self.fast = fast
        # On CUDA each chunk's rare lengths go into a few padded batches (fewer launches, and nothing
        # carried: a chunk runs on the GPU while the next is tokenised); on CPU every FLOP counts.
        self.merge_tail = self.device.type == "cuda"
        self.chunk_size = default_chunk_size(self.device.type)
        self.tokenize_threads: int | None = None
        self.tokenize_processes: int = _default_tokenize_processes(self.device)
        # CPU: batches run side by side on this many threads, one intra-op thread each (None: torch's count)
        self.cpu_workers: int | None = None
        # sentences that calibrate OpenVINO int8 when it is first built (None: the first 300 encoded)
        self.calibration: Sequence[str] | None = None
        self._infer_copy = InferenceCopy()
        self._bulk: tuple[tuple, BulkTokenizer | TokenizerProcessPool] | None = None
        self.source = resolve_model(self.name)
        if Path(self.source).is_dir():
            check_hf_folder(self.source)  # an empty folder or pickle-only weights: one clear error, no traceback
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.source, trust_remote_code=False)
            self.model = load_hf_model(self.source)
        except OSError:
            # The design's "Hub unreachable" case: a packaged id falls back to its offline copy.
            if Path(self.source).is_dir() or canonical_id(self.source) is None:
                raise
            log.warning("could not load %s from the Hub; using the packaged copy", self.source)
            self.source = str(packaged_model_path(self.source))
            self.tokenizer = AutoTokenizer.from_pretrained(self.source, trust_remote_code=False)
            self.model = load_hf_model(self.source)
        # a folder without tokenizer files loads with a 5-token vocabulary; corrupt weights encode NaN
        check_loaded_hf_encoder(self.source, self.tokenizer, self.model)
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
            f"device={str(self.device)!r}, max_length={self.max_length}, dim={self.dim}, "
            f"precision={self.precision!r}, quantize={self.quantize!r}, token_budget={self.token_budget}, "
            f"backend={self.backend!r})"
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
        sentences = check_sentences(sentences)
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        show = self.show_progress if show_progress is None else show_progress
        if not self.fast:
            return self._run_plain(sentences, batch_size, show, layers)
        if self.device.type == "cpu":
            tune_malloc()
        return encode_planned(sentences, chunk_size=self.chunk_size,
                              **self._fast_settings(batch_size, show, layers, sentences))

    def encode_stream(self, chunks: Iterable[Sequence[str]], batch_size: int = 64,
                      show_progress: bool | None = None, total: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``encode`` for sentences that arrive in consecutive lists (a file read lazily): yields blocks
        ``(rows, vectors)``, ``rows`` numbering the sentences across all chunks, every row once, in plan
        order; only one chunk's ids and vectors are held at a time (``total``: the count, for the bar).
        Chunks of :func:`~mixsp_core.models.batching.chunk_sizes` ``(self.chunk_size)`` give the very
        batches, so the very vectors, of ``encode`` on the whole list."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not self.fast:
            raise ValueError("encode_stream runs the fast path; this encoder has fast=False")
        show = self.show_progress if show_progress is None else show_progress
        if self.device.type == "cpu":
            tune_malloc()
        chunks = iter(chunks)
        first = check_sentences(next(chunks, []))  # read now: its first sentences may calibrate int8
        rest = (check_sentences(chunk) for chunk in chunks)
        blocks = iter_planned(itertools.chain([first], rest), total=total,
                              **self._fast_settings(batch_size, show, None, first))
        return key_blocks(blocks, -1)

    def _fast_settings(self, batch_size: int, show: bool, layers: list[int] | None,
                       sentences: Sequence[str]) -> dict:
        """The fast path's arguments (:func:`~mixsp_core.models.encode_loop.iter_planned`) but the input
        (``sentences``: its first ones, which calibrate an int8 OpenVINO model when it is first built)."""
        keys = layers if layers is not None else [-1]
        pad_id = self.tokenizer.pad_token_id
        if layers is not None and self.backend != "torch":
            raise ValueError(f"encode_layers runs on backend 'torch' (this encoder: {self.backend!r})")
        bulk = self._bulk_tokenizer()
        calibration = self.calibration if self.calibration is not None else sentences
        return {
            "tokenize": bulk,
            "forward": self._pooled_forward(self.inference_model(lambda: bulk(first_sentences(calibration))), layers),
            "widths": {k: self.dim for k in keys},
            "device": self.device,
            "batch_size": batch_size,
            "token_budget": self.token_budget,
            "merge_tail": self.merge_tail,
            "pad_id": 0 if pad_id is None else int(pad_id),
            "show_progress": show,
            "workers": self.cpu_workers if self.cpu_workers is not None else torch.get_num_threads(),
        }

    def _bulk_tokenizer(self) -> BulkTokenizer | TokenizerProcessPool:
        processes = self.tokenize_processes if getattr(self.tokenizer, "is_fast", False) else 0
        key = (id(self.tokenizer), self.max_length, self.tokenize_threads, processes)
        if self._bulk is None or self._bulk[0] != key:
            if self._bulk is not None and isinstance(self._bulk[1], TokenizerProcessPool):
                self._bulk[1].close()
            bulk = (TokenizerProcessPool(self.tokenizer, self.max_length, processes) if processes > 0
                    else BulkTokenizer(self.tokenizer, self.max_length, self.tokenize_threads))
            self._bulk = (key, bulk)
        if isinstance(self._bulk[1], TokenizerProcessPool):
            self._bulk[1].start()  # forked here, in the calling thread, before the prefetch threads run
        return self._bulk[1]

    def _pooled_forward(self, model: torch.nn.Module, layers: list[int] | None):
        """The fast path's forward: ids (and a mask for padded batches) -> pooled float32 vectors."""

        def forward(ids: torch.Tensor, mask: torch.Tensor | None) -> dict[int, torch.Tensor]:
            kwargs = {} if mask is None else {"attention_mask": mask.long()}
            output = model(input_ids=ids, output_hidden_states=layers is not None, **kwargs)
            states = {-1: output.last_hidden_state} if layers is None else {k: output.hidden_states[k] for k in layers}
            return {k: self._pool_fast(h, mask) for k, h in states.items()}

        return forward

    def _pool_fast(self, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if self.pooling == "cls":
            pooled = hidden[:, 0].float()
        elif mask is None:  # an unpadded batch: every token counts
            pooled = hidden.mean(dim=1, dtype=torch.float32)
        else:
            pooled = mean_pool(hidden.float(), mask)
        return F.normalize(pooled, p=2, dim=-1) if self.normalize else pooled

    def inference_model(self, calibration=None):
        """The module the fast path runs: ``self.model`` in fp32, else a cached cast / int8-weight copy or
        the compiled OpenVINO model (rebuilt when ``self.model``'s weights have changed since);
        ``calibration``: a callable giving the token ids that calibrate OpenVINO int8."""
        workers = self.cpu_workers if self.cpu_workers is not None else torch.get_num_threads()
        return self._infer_copy.get(self.model, self.precision, self.quantize, self.backend, calibration,
                                    streams=workers)

    def _run_plain(
        self, sentences: list[str], batch_size: int, show: bool, layers: list[int] | None
    ) -> dict[int, np.ndarray]:
        """The reference loop: padded batches in character-length order, tokenised per batch."""
        keys = layers if layers is not None else [-1]
        result = {k: np.empty((len(sentences), self.dim), dtype=np.float32) for k in keys}
        # Longest first: similar lengths share a batch, so little padding; rows go back by index.
        order = np.argsort([-len(s) for s in sentences], kind="stable")
        bar = encode_bar(len(sentences), "encode", show)  # the running stage's one bar, else its own
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


def _default_tokenize_processes(device: torch.device) -> int:
    """Tokeniser processes an encoder starts by default: on CUDA all usable cores but two (the main
    thread and the prefetch thread), when there are at least 4 (fewer: the threads of one process do as
    well); on CPU none. On the H200 host (16 cores, 100k sentences, 1,024 per task) 14 processes tokenised
    257k sentences/s and 8 174k/s, against 104-109k/s for 8 threads of one process."""
    if device.type != "cuda":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return cores - 2 if cores >= 4 else 0


def _chunks(order: np.ndarray, size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(order), size):
        yield order[start : start + size]


def load_config(name_or_path: str) -> PretrainedConfig:
    """The model's config only (cheap): for dims and layer counts without loading weights."""
    return AutoConfig.from_pretrained(resolve_model(name_or_path), trust_remote_code=False)
