"""Training configs: YAML loading, validation errors that name the field, and the repo's config files."""

from __future__ import annotations

from pathlib import Path

import pytest

from mixsp_core.errors import ConfigError
from mixsp_core.training.config import apply_overrides, config_from_dict, dump_config, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_defaults_are_valid():
    config = config_from_dict({})
    assert config.model.kind == "bi" and config.model.num_projectors == 2 and config.model.output_dim == 128


@pytest.mark.parametrize("raw, field", [
    ({"model": {"colour": 1}}, "model.colour"),
    ({"train": {"lr": "fast"}}, "train.lr"),
    ({"train": {"lr": -1.0}}, "train.lr"),
    ({"train": {"batch_size": 2.5}}, "train.batch_size"),
    ({"model": {"routing": "top2"}}, "model.routing"),
    ({"model": {"kind": "cross"}, "loss": {"cosent": 1.0}}, "loss.cosent"),
    ({"loss": {"routing": 1.0}, "model": {"num_projectors": 3}}, "loss.routing"),
    ({"loss": {"cosent": 0.0}}, "loss"),
    ({"loss": {"infonce": 1.0}}, "loss.infonce"),
    ({"loss": {"distill_sim": -0.5}}, "loss.distill_sim"),
    ({"model": {"kind": "cross"}, "loss": {"cosent": 0.0, "score_bce": 1.0, "distill_sim": 1.0}}, "loss.distill_sim"),
    ({"model": {"output_dim": 0}, "loss": {"distill_sim": 1.0}}, "loss.distill_sim"),
    ({"data": {"train_tasks": "STSBenchmark"}}, "data.train_tasks"),
    ({"train": {"device": "tpu"}}, "train.device"),
    ({"train": {"snapshot_every": -1}}, "train.snapshot_every"),
    ({"train": {"num_threads": -2}}, "train.num_threads"),
    ({"loss": {"matryoshka_dims": [32, 32]}}, "loss.matryoshka_dims"),
    ({"loss": {"layer_mode": "every"}}, "loss.layer_mode"),
    ({"loss": {"ese_alignment": 1.0, "ese_dim": 128}}, "loss.ese_dim"),
    ({"loss": {"cosent": 0.0, "distill": 1.0, "matryoshka": 1.0}}, "loss.matryoshka"),
    ({"model": {"kind": "cross"}, "loss": {"cosent": 0.0, "score_bce": 1.0, "layers": 1.0}}, "loss.layers"),
])
def test_bad_values_name_the_field(raw, field):
    with pytest.raises(ConfigError) as err:
        config_from_dict(raw)
    assert err.value.field == field


def test_yaml_file_section_overrides_and_round_trip(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("data: {spec: auto}\ntrain:\n  name: p\n  train:\n    lr: 5e-5\n    epochs: 2\n")
    config = load_config(path, section="train", overrides=["train.batch_size=32"])
    assert config.name == "p" and config.train.lr == 5e-5 and config.train.batch_size == 32
    again = load_config(dump_config(config, tmp_path / "dumped.yaml"))
    assert again == config
    assert apply_overrides({}, {"model.output_dim": 64}) == {"model": {"output_dim": 64}}


def test_file_errors_name_file_and_field(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  warmup_ratio: 1.5\n")
    with pytest.raises(ConfigError, match="bad.yaml") as err:
        load_config(path)
    assert err.value.field == "train.warmup_ratio"
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_repo_configs_load(path):
    assert load_config(path).name
