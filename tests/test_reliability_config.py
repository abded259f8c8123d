"""Issue 15, item 6 (config values): every value is validated, NaN and infinities are invalid (NaN passes
every `<` / `>` check, so ranges alone let it through), and the message names the file and the dotted field."""

from __future__ import annotations

import dataclasses
import re

import pytest
import yaml

from mixsp_core.errors import ConfigError
from mixsp_core.params import load_params
from mixsp_core.training.config import ModelConfig, RunConfig, config_from_dict, load_config


def _params_file(tmp_path, sections: dict) -> str:
    raw = {"student": {"name": "x"}}
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def _names(field: str, path: str) -> str:
    return rf"config field '{re.escape(field)}': .*\(in {re.escape(path)}\)$"


@pytest.mark.parametrize("section, values, field", [
    ("student", {"train": {"epochs": float("nan")}}, "student.train.epochs"),
    ("student", {"train": {"epochs": float("inf")}}, "student.train.epochs"),
    ("student", {"train": {"lr": float("nan")}}, "student.train.lr"),
    ("student", {"train": {"lr": "nan"}}, "student.train.lr"),  # a string YAML would read as text
    ("student", {"train": {"weight_decay": float("-inf")}}, "student.train.weight_decay"),
    ("student", {"train": {"epochs": "1e400"}}, "student.train.epochs"),  # overflows to inf
    ("student", {"loss": {"cosent_scale": float("nan")}}, "student.loss.cosent_scale"),
    ("merge", {"p": float("nan")}, "merge.p"),
    ("evaluate", {"min_dev_spearman": float("inf")}, "evaluate.min_dev_spearman"),
])
def test_nan_and_infinity_are_refused_naming_file_and_field(tmp_path, section, values, field):
    path = _params_file(tmp_path, {section: values})
    with pytest.raises(ConfigError, match=_names(field, path)) as caught:
        load_params(path)
    assert "finite" in str(caught.value)


def test_nan_in_a_training_config_file_names_it(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("name: x\ntrain:\n  lr: .nan\n")
    with pytest.raises(ConfigError, match=_names("train.lr", str(path))):
        load_config(path)
    path.write_text("name: x\n")
    with pytest.raises(ConfigError, match=r"train\.weight_decay.*finite"):
        load_config(path, overrides=["train.weight_decay=.inf"])


def test_nan_set_in_code_is_caught_by_validate():
    config = RunConfig(name="x")
    config.train = dataclasses.replace(config.train, lr=float("nan"))
    with pytest.raises(ConfigError, match=r"'train\.lr': must be a finite number, got nan"):
        config.validate()
    config.train = dataclasses.replace(config.train, lr=1e-4, head_lr=float("nan"))
    with pytest.raises(ConfigError, match=r"'train\.head_lr'"):  # _at_least alone used to pass NaN
        config.validate()


@pytest.mark.parametrize("section, values, field", [
    ("student", {"seed": -1}, "student.seed"),
    ("student", {"seed": 2**32}, "student.seed"),
    ("data", {"seed": -1}, "data.seed"),
])
def test_seeds_must_lie_in_the_32_bit_range(tmp_path, section, values, field):
    path = _params_file(tmp_path, {section: values})
    with pytest.raises(ConfigError, match=_names(field, path)):
        load_params(path)


@pytest.mark.parametrize("section, values, field, says", [
    ("data", {"root": 5}, "data.root", "must be a string, got int"),
    ("data", {"root": " "}, "data.root", "must name a folder"),
    ("teacher", {"batch_size": "abc"}, "teacher.batch_size", "must be an integer, got str"),
])
def test_wrong_types_name_file_and_field(tmp_path, section, values, field, says):
    path = _params_file(tmp_path, {section: values})
    with pytest.raises(ConfigError, match=_names(field, path)) as caught:
        load_params(path)
    assert says in str(caught.value)


def test_matryoshka_dims_all_at_least_the_output_width_are_refused():
    raw = {"name": "x", "model": {"output_dim": 64}, "loss": {"cosent": 1.0, "matryoshka": 1.0}}
    with pytest.raises(ConfigError, match=r"loss\.matryoshka_dims.*below model\.output_dim \(64\)"):
        config_from_dict({**raw, "loss": {**raw["loss"], "matryoshka_dims": [64, 128]}})
    config = config_from_dict({**raw, "loss": {**raw["loss"], "matryoshka_dims": [32, 64, 128]}})
    assert config.loss.matryoshka_dims == [32, 64, 128]  # one prefix below the width: the term has work


def test_max_length_beyond_the_encoder_positions_is_refused_when_the_model_is_built(tiny_bert_dir):
    from mixsp_core.models.cross import CrossScorer
    from mixsp_core.models.student import BiStudent

    # the tiny BERT has 128 positions; more would fail only at the first long batch of training
    config = ModelConfig(kind="bi", encoder=str(tiny_bert_dir), projector_mult=2, output_dim=16, max_length=200)
    with pytest.raises(ConfigError, match=r"model\.max_length.*200 exceeds the 128 token positions"):
        BiStudent.from_config(config)
    with pytest.raises(ConfigError, match=r"model\.max_length.*200 exceeds the 128"):
        CrossScorer.from_config(dataclasses.replace(config, kind="cross", output_dim=0))
    assert BiStudent.from_config(dataclasses.replace(config, max_length=128)).model_config.max_length == 128
