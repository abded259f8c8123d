"""The model a fresh run starts from: the pretrained encoder with new heads, or the weights of
``train.init_checkpoint`` (how a stage of a multi-stage run continues from the previous stage).

Only the weights are taken from the checkpoint: the optimizer, the schedule and the step start afresh (a
new stage is a new run), and the dropout rates are the checkpoint encoder's own config's again. The
checkpoint must hold the same architecture as ``model``: a different one is refused, naming the field.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

from torch import nn

from mixsp_core.errors import ConfigError
from mixsp_core.models.checkpoint import build_model, load_checkpoint
from mixsp_core.training.config import RunConfig

log = logging.getLogger(__name__)


def initial_model(config: RunConfig) -> nn.Module:
    """``build_model(config.model)``, or the model of ``train.init_checkpoint`` when one is set."""
    path = config.train.init_checkpoint
    if not path:
        return build_model(config.model)
    if not Path(path).is_dir():
        raise ConfigError("train.init_checkpoint", f"{path}: no checkpoint directory there")
    model = load_checkpoint(path)
    saved, wanted = asdict(model.model_config), asdict(config.model)
    differing = [key for key in wanted if saved.get(key) != wanted[key]]
    if differing:
        key = differing[0]
        raise ConfigError("train.init_checkpoint", f"{path} holds a model with model.{key}={saved.get(key)!r}, "
                          f"this config has {wanted[key]!r}: the weights cannot carry over")
    log.info("starting from the weights of %s", path)
    return model
