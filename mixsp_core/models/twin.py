"""JTCSE's twin-tower ensemble: a second tower and the cross-attention between the two towers' token states.

JTCSE (Zong et al., 2025) trains two BERT towers together; cross-attention layers placed among the encoder
layers let each tower's tokens (its [CLS] above all, which plain self-attention neglects: "attention
sinking") attend to the other tower's, the ensemble embedding is the sum of the towers' outputs, and the
ensemble is finally distilled into one tower for inference. Here, what this project keeps of it:

* tower A is the student being trained (:class:`~mixsp_core.models.student.BiStudent`), the one saved;
  tower B (:class:`TwinTowers.tower`) is a copy of it whose router and projectors are rebuilt from another
  seed (and its output layer too when ``model.output_init`` is random: a data-fitted one is kept), its
  encoder weights optionally jittered (``model.twin_encoder_noise``). The paper starts from two
  separately pretrained encoders; there is one released MiniLM, so the towers differ by their heads and noise.
* :class:`TowerCrossAttention` runs *after* the encoders' last layer (the paper interleaves it with the
  encoder layers, which needs a patched transformer): ``twin_layers`` blocks in which A's token states
  attend to B's and B's to A's (same tokenizer, same tokens, padding masked), residual, pre-norm, with the
  output projections zero-initialised, so at step 0 it is the identity and the ensemble starts as the mean of
  the two plain towers.

The inference model is tower A alone, without cross-attention: the training side
(:mod:`mixsp_core.training.jtcse`) distils the ensemble into it. The cross-attention's config and weights are
saved as a module folder (``config.json`` + ``model.safetensors``, like the MixSP head's), tower B as a normal
checkpoint, both only inside a resumable ``last/`` (:data:`TWIN_DIR`).
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from mixsp_core.errors import CheckpointError, ConfigError
from mixsp_core.io import write_json_atomic, writing_dir
from mixsp_core.paths import WEIGHTS_FILE
from mixsp_core.training.config import ModelConfig, build_dataclass

TWIN_DIR = "twin"  # inside a resumable last/: tower/ (checkpoint), cross_attention/ (module), state.json
CONFIG_FILE = "config.json"


@dataclass
class CrossAttentionConfig:
    """What :class:`TowerCrossAttention` is built from (saved as its ``config.json``)."""

    hidden_dim: int
    num_heads: int = 4
    num_layers: int = 1
    dropout: float = 0.1

    @classmethod
    def from_model(cls, config: ModelConfig, hidden_dim: int) -> CrossAttentionConfig:
        if hidden_dim % config.twin_heads:
            raise ConfigError("model.twin_heads", f"{config.twin_heads} heads do not divide the encoder width "
                              f"{hidden_dim}")
        return cls(hidden_dim, config.twin_heads, config.twin_layers, config.twin_dropout)


class CrossBlock(nn.Module):
    """One direction of one block: ``x + Attention(LN(x), LN(other), LN(other))``, keys masked by ``other_mask``."""

    def __init__(self, config: CrossAttentionConfig):
        super().__init__()
        self.query_norm = nn.LayerNorm(config.hidden_dim)
        self.key_norm = nn.LayerNorm(config.hidden_dim)
        self.attention = nn.MultiheadAttention(config.hidden_dim, config.num_heads, dropout=config.dropout,
                                               batch_first=True)
        # identity at initialisation: the pretrained towers' states pass through unchanged at step 0
        nn.init.zeros_(self.attention.out_proj.weight)
        nn.init.zeros_(self.attention.out_proj.bias)

    def forward(self, x: torch.Tensor, other: torch.Tensor, other_mask: torch.Tensor) -> torch.Tensor:
        keys = self.key_norm(other)
        attended, _ = self.attention(self.query_norm(x), keys, keys, key_padding_mask=~other_mask.bool(),
                                     need_weights=False)
        return x + attended


class TowerCrossAttention(nn.Module):
    """Cross-attention between two towers' token states of the same tokens.

    ``forward(a, b, mask)``: ``a``, ``b`` ``[batch, tokens, hidden_dim]`` (tower A's and B's last hidden
    states), ``mask`` ``[batch, tokens]`` (the attention mask, 1 = token); returns ``(a', b')`` of the same
    shapes, where in each of ``num_layers`` blocks A attends to B and B to A (both from the block's inputs).
    ``enabled = False`` returns ``(a, b)`` unchanged: the plain towers.
    """

    def __init__(self, config: CrossAttentionConfig):
        super().__init__()
        self.config = config
        self.enabled = True
        self.a_from_b = nn.ModuleList(CrossBlock(config) for _ in range(config.num_layers))
        self.b_from_a = nn.ModuleList(CrossBlock(config) for _ in range(config.num_layers))

    def forward(self, a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.enabled:
            return a, b
        for a_block, b_block in zip(self.a_from_b, self.b_from_a, strict=True):
            a, b = a_block(a, b, mask), b_block(b, a, mask)
        return a, b

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """``directory/config.json`` (:class:`CrossAttentionConfig`) + ``model.safetensors``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        write_json_atomic(directory / CONFIG_FILE, asdict(self.config))
        save_model(self, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> TowerCrossAttention:
        """The module :meth:`save` wrote (config checked, weights strict); CheckpointError naming the file."""
        directory = Path(directory)
        try:
            raw = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
            config = build_dataclass(CrossAttentionConfig, raw, "cross_attention")
        except (OSError, ValueError, ConfigError) as err:
            raise CheckpointError(f"{directory / CONFIG_FILE}: not a cross-attention config: {err}") from err
        module = cls(config)
        try:
            load_model(module, str(directory / WEIGHTS_FILE), strict=True)
        except (OSError, RuntimeError, ValueError) as err:
            raise CheckpointError(f"{directory / WEIGHTS_FILE}: does not match its config: {err}") from err
        return module


class TwinTowers(nn.Module):
    """Tower B (a :class:`~mixsp_core.models.student.BiStudent`) and the cross-attention, beside tower A (the
    student, held by the caller). :meth:`ensemble` embeds a tokenized batch with both."""

    def __init__(self, tower: nn.Module, cross: TowerCrossAttention):
        super().__init__()
        self.tower, self.cross = tower, cross

    @classmethod
    def build(cls, student: nn.Module, seed: int) -> TwinTowers:
        """Tower B from ``student`` (see the module doc) and a fresh cross-attention, both seeded by ``seed``;
        on the student's device. The global RNG is left as it was (the run's dropout stream is unchanged)."""
        from mixsp_core.models.routing import RoutedProjector

        config: ModelConfig = student.model_config
        tower = copy.deepcopy(student)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            d = tower.hidden_dim
            tower.routed = RoutedProjector(d, 2 * d, config.num_projectors, config.routing, config.projector_mult,
                                           config.projector_residual)
            if tower.output is not None and config.output_init == "random":
                tower.output = nn.Linear(d, config.output_dim, bias=config.output_bias)
            if config.twin_encoder_noise > 0:
                with torch.no_grad():
                    for param in tower.encoder.parameters():
                        param.mul_(1 + config.twin_encoder_noise * torch.randn(param.shape).to(param))
            cross = TowerCrossAttention(CrossAttentionConfig.from_model(config, d))
        return cls(tower, cross).to(student.device)

    def ensemble(self, student: nn.Module, batch, hidden_a: torch.Tensor | None = None) -> torch.Tensor:
        """The ensemble embedding ``[batch, k]`` of a tokenized ``batch`` (pre-normalisation): the mean of the
        two towers' heads over their cross-attended token states (the paper sums; cosines do not tell).
        ``hidden_a``: tower A's last hidden states of ``batch`` when the caller has them."""
        mask = batch["attention_mask"]
        if hidden_a is None:
            hidden_a = student.encoder(**batch).last_hidden_state
        hidden_b = self.tower.encoder(**batch).last_hidden_state
        a, b = self.cross(hidden_a, hidden_b, mask)
        return (student.head(student.route(a, mask).z) + self.tower.head(self.tower.route(b, mask).z)) / 2

    def save(self, directory: str | os.PathLike[str], step: int) -> Path:
        """``directory/`` (replaced atomically): ``tower/`` (a checkpoint), ``cross_attention/``, ``state.json``."""
        from mixsp_core.models.checkpoint import save_checkpoint

        with writing_dir(directory) as work:
            save_checkpoint(self.tower, work / "tower")
            self.cross.save(work / "cross_attention")
            write_json_atomic(work / "state.json", {"step": int(step)})
        return Path(directory)

    def load_state(self, directory: str | os.PathLike[str], step: int) -> None:
        """Fill this twin from what :meth:`save` wrote at ``step``; CheckpointError when it is missing, of
        another step or another shape (resuming without it would restart the twin and break the trajectory)."""
        from mixsp_core.models.checkpoint import load_checkpoint

        directory = Path(directory)
        state_file = directory / "state.json"
        try:
            saved_step = json.loads(state_file.read_text(encoding="utf-8"))["step"]
        except (OSError, ValueError, KeyError) as err:
            raise CheckpointError(f"{state_file}: missing or unreadable: the twin towers cannot resume "
                                  f"(set train.resume: false): {err}") from err
        if saved_step != step:
            raise CheckpointError(f"{state_file}: twin saved at step {saved_step}, the run resumes at step {step}")
        with torch.random.fork_rng(devices=[]):  # rebuilding the modules draws their random init: keep the run's RNG
            cross = TowerCrossAttention.load(directory / "cross_attention")
            tower = load_checkpoint(directory / "tower")
        if cross.config != self.cross.config:
            raise CheckpointError(f"{directory / 'cross_attention' / CONFIG_FILE}: {cross.config} differs from "
                                  f"this run's {self.cross.config}")
        device = next(self.parameters()).device
        self.tower.load_state_dict(tower.state_dict())
        self.cross.load_state_dict(cross.state_dict())
        self.to(device)
