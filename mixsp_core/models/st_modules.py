"""The MixSP head as a sentence-transformers module, and the loader that opens a mixsp folder with it.

:class:`MixSPHead` is what ``modules.json`` names after the Transformer and Pooling modules (see
:mod:`mixsp_core.models.st_layout`): it takes Pooling's ``sentence_embedding`` as the projectors' input
and the token states (mean and first token) as the router's, exactly as
:meth:`mixsp_core.models.student.BiStudent.route` / ``head`` do, and holds the same sub-modules
(``routed``, ``output``), so its weights file is the student's non-encoder weights.

sentence-transformers 6 imports a module class from outside its own package only with
``trust_remote_code=True``. A mixsp folder holds no code (every class comes from an installed package),
so the flag only lets ST import ``mixsp_core``; :func:`load_sentence_transformer` checks that before
passing it.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any, ClassVar

import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.modules.module import Module
from torch import nn

from mixsp_core.errors import CheckpointError
from mixsp_core.models.pooling import mean_pool
from mixsp_core.models.routing import RoutedProjector


class MixSPHead(Module):
    """Router + projectors + output layer over a Transformer and a Pooling module.

    Expects the features ``token_embeddings`` ``[batch, tokens, hidden_dim]`` (padded rows),
    ``attention_mask`` and ``sentence_embedding`` (the pooled state); replaces ``sentence_embedding`` by
    the head's output ``[batch, output_dim or hidden_dim]`` (not normalised: a Normalize module follows).
    """

    config_keys: ClassVar[list[str]] = ["hidden_dim", "num_projectors", "routing", "projector_mult",
                                        "projector_residual", "output_dim", "output_bias", "output_activation"]

    def __init__(self, hidden_dim: int, num_projectors: int = 2, routing: str = "hard", projector_mult: int = 10,
                 projector_residual: bool = False, output_dim: int = 0, output_bias: bool = True,
                 output_activation: str = "tanh"):
        super().__init__()
        self.hidden_dim, self.num_projectors, self.routing = int(hidden_dim), int(num_projectors), routing
        self.projector_mult, self.projector_residual = int(projector_mult), bool(projector_residual)
        self.output_dim, self.output_bias = int(output_dim), bool(output_bias)
        self.output_activation = output_activation
        self.routed = RoutedProjector(self.hidden_dim, 2 * self.hidden_dim, self.num_projectors, routing,
                                      self.projector_mult, self.projector_residual)
        self.output = nn.Linear(self.hidden_dim, self.output_dim, bias=self.output_bias) if self.output_dim else None

    def forward(self, features: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        hidden, mask = features["token_embeddings"], features["attention_mask"]
        router_input = torch.cat([mean_pool(hidden, mask), hidden[:, 0]], dim=-1)
        z = self.routed(features["sentence_embedding"], router_input).z
        if self.output is not None:
            z = self.output(z)
            if self.output_activation == "tanh":
                z = torch.tanh(z)
        features["sentence_embedding"] = z
        return features

    def get_embedding_dimension(self) -> int:
        return self.output_dim or self.hidden_dim

    def save(self, output_path: str, *args: Any, safe_serialization: bool = True, **kwargs: Any) -> None:
        self.save_config(output_path)
        if any(True for _ in self.parameters()):
            self.save_torch_weights(output_path, safe_serialization=safe_serialization)

    @classmethod
    def load(cls, model_name_or_path: str, subfolder: str = "", token: bool | str | None = None,
             cache_folder: str | None = None, revision: str | None = None, local_files_only: bool = False,
             **kwargs: Any) -> MixSPHead:
        hub = {"subfolder": subfolder, "token": token, "cache_folder": cache_folder, "revision": revision,
               "local_files_only": local_files_only}
        config = cls.load_config(model_name_or_path, **hub)
        accepted = set(inspect.signature(cls).parameters)
        head = cls(**{k: v for k, v in config.items() if k in accepted})
        if any(True for _ in head.parameters()):  # a head without projectors or output layer has no weights
            cls.load_torch_weights(model_name_or_path, model=head, **hub)
        return head


CODE_SUFFIXES = (".py", ".pyc", ".so")


def load_sentence_transformer(path: str | os.PathLike[str], **kwargs: Any) -> SentenceTransformer:
    """``SentenceTransformer(path, trust_remote_code=True, **kwargs)`` for a model folder mixsp wrote.

    Refuses (CheckpointError naming the file) a folder that carries code files or an HF ``auto_map``, or
    whose modules.json names a class outside ``sentence_transformers`` and ``mixsp_core``: then the flag
    can only import those installed packages. ``kwargs``: anything SentenceTransformer takes (device,
    truncate_dim, ...)."""
    from mixsp_core.models.st_layout import read_modules

    folder = Path(os.fspath(path))
    modules = read_modules(folder)
    if modules is None:
        raise CheckpointError(f"{folder / 'modules.json'}: missing (not a sentence-transformers folder)")
    for module in modules:
        if not str(module.get("type", "")).startswith(("sentence_transformers.", "mixsp_core.")):
            raise CheckpointError(f"{folder / 'modules.json'}: module class {module.get('type')!r} is neither "
                                  "sentence-transformers' nor mixsp_core's")
    for file in folder.rglob("*"):
        if file.suffix in CODE_SUFFIXES:
            raise CheckpointError(f"{file}: a model folder must not carry code")
        if file.name == "config.json" and '"auto_map"' in file.read_text(encoding="utf-8", errors="replace"):
            raise CheckpointError(f"{file}: 'auto_map' points at remote code")
    kwargs.pop("trust_remote_code", None)
    return SentenceTransformer(str(folder), trust_remote_code=True, **kwargs)
