"""Checks on what a model folder loads: a tokenizer that belongs to the model, weights that are the bytes that
were saved, and numbers that are finite.

Without them a folder that lost its tokenizer files still loads (transformers then builds a 5-token
vocabulary and every sentence encodes as ``[CLS] [UNK] ... [SEP]``), and a weights file with flipped bits or
NaN bytes encodes NaN vectors, both with exit 0. Every refusal is a :class:`CheckpointError` naming the folder
or file (and the tensor).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch

from mixsp_core.errors import CheckpointError
from mixsp_core.io import sha256_file

# Files a Hugging Face tokenizer is built from (a fast tokenizer's tokenizer.json, or a slow tokenizer's
# vocabulary: WordPiece vocab.txt, BPE vocab.json + merges.txt, a sentencepiece model).
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model",
                   "sentencepiece.model", "tokenizer.model", "source.spm")
# A tokenizer with fewer tokens than this share of the embedding rows is not the model's own (the 5-token
# vocabulary transformers builds without files; real models pad their tables by at most a few percent).
MIN_VOCAB_SHARE = 0.5
# config.json key of a checkpoint: ``{"encoder/model.safetensors": hex sha256, ...}``, paths relative to it.
WEIGHTS_DIGEST_KEY = "weights_sha256"


# -- tokenizers ----------------------------------------------------------------------------------------


def check_tokenizer_files(folder: str | os.PathLike[str]) -> None:
    """Refuse a model folder that holds none of :data:`TOKENIZER_FILES`."""
    folder = Path(folder)
    if any((folder / name).is_file() for name in TOKENIZER_FILES):
        return
    raise CheckpointError(f"{folder}: no tokenizer files (none of {', '.join(TOKENIZER_FILES[:3])}, ...); "
                          "transformers would build a 5-token vocabulary and encode garbage; copy the tokenizer "
                          "the model was trained with into this folder")


def embedding_rows(model: torch.nn.Module) -> int | None:
    """Rows of a transformers model's input embedding table (its config's ``vocab_size`` when the model does
    not expose the table); None when neither is known."""
    get = getattr(model, "get_input_embeddings", None)
    table = get() if callable(get) else None
    rows = getattr(table, "num_embeddings", None)
    if rows is None:
        rows = getattr(getattr(model, "config", None), "vocab_size", None)
    return int(rows) if rows else None


def check_tokenizer_fits(tokenizer: Any, model: torch.nn.Module, where: str | os.PathLike[str]) -> None:
    """Refuse a tokenizer whose vocabulary does not fit ``model``'s embedding table: larger (token ids would
    index past the table: another model's tokenizer) or below :data:`MIN_VOCAB_SHARE` of it (a stand-in
    vocabulary). ``where`` names the folder in the message."""
    rows = embedding_rows(model)
    if rows is None:
        return
    size = len(tokenizer)
    if size > rows:
        raise CheckpointError(f"{where}: the tokenizer has {size} tokens but the model's embedding table only "
                              f"{rows} rows (config vocab_size): the tokenizer belongs to another model")
    if size < MIN_VOCAB_SHARE * rows:
        raise CheckpointError(f"{where}: the tokenizer has only {size} tokens for the model's {rows} embedding "
                              "rows: not the model's own tokenizer (tokenizer files missing or replaced)")


# -- finiteness ----------------------------------------------------------------------------------------


def non_finite_tensors(tensors: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of the floating-point tensors holding a NaN or an infinity (integer tensors cannot)."""
    return [name for name, tensor in tensors
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]


def check_finite_model(model: torch.nn.Module, where: str | os.PathLike[str]) -> None:
    """Refuse a model whose parameters or buffers hold NaN / inf; ``where`` names the folder or file."""
    bad = non_finite_tensors([*model.named_parameters(), *model.named_buffers()])
    if bad:
        raise CheckpointError(f"{where}: tensor {bad[0]} holds NaN or infinite values"
                              f"{f' (and {len(bad) - 1} more)' if len(bad) > 1 else ''}: the weights are corrupt")


def check_loaded_hf_encoder(source: str | os.PathLike[str], tokenizer: Any, model: torch.nn.Module) -> None:
    """The checks for a plain Hugging Face encoder just loaded from ``source`` (a folder or a Hub id):
    tokenizer files present (folders only), tokenizer fitting the embedding table, finite weights."""
    if Path(os.fspath(source)).is_dir():
        check_tokenizer_files(source)
    check_tokenizer_fits(tokenizer, model, source)
    check_finite_model(model, source)


def check_finite_vectors(vectors: np.ndarray, where: str) -> None:
    """Refuse output vectors with NaN / inf rows (``where``: who produced them, for the message)."""
    finite = np.isfinite(np.asarray(vectors).reshape(len(vectors), -1)).all(axis=1)
    if finite.all():
        return
    bad = np.flatnonzero(~finite)
    raise CheckpointError(f"{where}: produced NaN or infinite vectors for {len(bad)} of {len(vectors)} inputs "
                          f"(first: row {int(bad[0])}); nothing was written")


# -- weight digests ------------------------------------------------------------------------------------


def weight_digests(directory: str | os.PathLike[str], files: Iterable[Path]) -> dict[str, str]:
    """``{path relative to directory (posix): hex sha256}`` of those ``files`` that exist."""
    directory = Path(directory)
    return {Path(f).relative_to(directory).as_posix(): sha256_file(f) for f in files if Path(f).is_file()}


def verify_weight_digests(directory: str | os.PathLike[str], recorded: Any, config_path: Path) -> None:
    """Check every weights file ``recorded`` (a checkpoint config's :data:`WEIGHTS_DIGEST_KEY` value) against
    its sha256. None (a checkpoint saved before digests were recorded) checks nothing. A changed or missing
    file, or a malformed record, raises CheckpointError naming it."""
    if recorded is None:
        return
    if not isinstance(recorded, Mapping) or not all(isinstance(k, str) and isinstance(v, str)
                                                    for k, v in recorded.items()):
        raise CheckpointError(f"{config_path}: '{WEIGHTS_DIGEST_KEY}' must map weight file paths to hex sha256")
    directory = Path(directory)
    for relative, expected in recorded.items():
        parts = PurePosixPath(relative).parts
        if not parts or PurePosixPath(relative).is_absolute() or ".." in parts:
            raise CheckpointError(f"{config_path}: '{WEIGHTS_DIGEST_KEY}' names {relative!r}, not a path inside "
                                  "the checkpoint")
        path = directory.joinpath(*parts)
        if not path.is_file():
            raise CheckpointError(f"{path}: missing ({config_path.name} records its sha256)")
        actual = sha256_file(path)
        if actual != expected.lower():
            raise CheckpointError(f"{path}: content hash mismatch, file changed or corrupt (sha256 {actual[:16]}..., "
                                  f"{config_path.name} records {expected[:16]}...)")
