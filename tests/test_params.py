"""params.yaml typed once (mixsp_core.params): sections, `auto` resolution, the inline student config, errors
that name the dotted field and the file."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mixsp_core.errors import ConfigError
from mixsp_core.params import HUB_DEFAULT_SPEC, PARAMS_FILE, load_params

REPO = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, change) -> Path:
    raw = yaml.safe_load(PARAMS_FILE.read_text(encoding="utf-8"))
    change(raw)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def test_repository_params_build_the_student_run():
    params = load_params()
    raw = yaml.safe_load(PARAMS_FILE.read_text(encoding="utf-8"))
    assert params.student.train.epochs == raw["student"]["train"]["epochs"]
    assert params.student.model.output_dim == raw["student"]["model"]["output_dim"]
    # the pipeline's student always writes to models/student/ and distils teacher.model
    assert Path(params.student.output_dir) == params.paths.student.root == REPO / "data" / "models" / "student"
    assert params.student.data.teacher == params.teacher.model


def test_auto_data_spec_is_the_shared_senteval_folder_else_the_hub(monkeypatch, tmp_path, senteval_dir):
    monkeypatch.setenv("MIXSP_SHARED_DIR", str(senteval_dir.parents[1]))
    assert load_params().data.resolved_spec() == f"senteval:{senteval_dir}"
    monkeypatch.setenv("MIXSP_SHARED_DIR", str(tmp_path))
    assert load_params().data.resolved_spec() == HUB_DEFAULT_SPEC == "hf:mteb/stsbenchmark-sts,hf:mteb/sickr-sts"
    assert load_params(overrides={"data.spec": "file:x.csv"}).data.resolved_spec() == "file:x.csv"


def test_overrides_reach_the_student_config():
    params = load_params(overrides=["student.train.epochs=1", "student.loss.distill_sim=10"])
    assert (params.student.train.epochs, params.student.loss.distill_sim) == (1.0, 10.0)


@pytest.mark.parametrize("change, field", [
    (lambda raw: raw["student"]["train"].update(epochs="four"), "student.train.epochs"),
    (lambda raw: raw["student"]["model"].update(kind="tree"), "student.model.kind"),
    (lambda raw: raw["student"]["train"].update(bogus=1), "student.train.bogus"),
    (lambda raw: raw["merge"].update(p=-1.0), "merge.p"),
    (lambda raw: raw["teacher"].update(shards=0), "teacher.shards"),
    (lambda raw: raw.update(trian={}), "trian"),
])
def test_bad_values_name_the_field_and_the_file(tmp_path, change, field):
    path = _write(tmp_path, change)
    with pytest.raises(ConfigError) as caught:
        load_params(path)
    assert caught.value.field == field and str(path) in str(caught.value)


def test_a_params_file_without_a_student_is_refused(tmp_path):
    path = _write(tmp_path, lambda raw: raw.pop("student"))
    with pytest.raises(ConfigError, match="student"):
        load_params(path)


def test_a_config_file_trains_as_the_pipelines_student():
    """The student asset's ``config_file``: the recipe's model and losses, the pipeline's run directory and teacher."""
    from mixsp_core.stages.train import student_config
    from mixsp_core.training.config import load_config

    params = load_params()
    recipe = load_config(REPO / "configs" / "bi_single.yaml")
    config = student_config(params, ["train.epochs=2"], config_file=REPO / "configs" / "bi_single.yaml")
    assert config.model == recipe.model and config.loss == recipe.loss and config.train.epochs == 2.0
    assert (config.output_dir, config.data.teacher) == (params.student.output_dir, params.student.data.teacher)
    with pytest.raises(ConfigError):
        student_config(params, ["train.epochs=soon"], config_file=REPO / "configs" / "bi_single.yaml")
