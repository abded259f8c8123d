"""Teacher fine-tuning on a tiny random BERT: `mixsp finetune-teacher` trains two steps and exports a plain
encoder folder that Encoder loads with the trained vectors; the teacher cache keys it by its weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from mixsp_core.cli import main
from mixsp_core.errors import CheckpointError, ConfigError
from mixsp_core.models.checkpoint import build_model, load_checkpoint, save_checkpoint
from mixsp_core.models.encoder import Encoder
from mixsp_core.paths import PipelinePaths
from mixsp_core.stages.teacher import encode_with_teacher
from mixsp_core.teacher.cache import FINETUNED_TEACHER_FILE, teacher_identity
from mixsp_core.teacher.finetune import check_teacher_config, export_teacher
from tests.train_helpers import one_thread, small_pairs, tiny_config

_one_thread = pytest.fixture(scope="module", autouse=True)(one_thread)

SENTENCES = ["A man is playing a guitar.", "Two dogs run on the beach.", "The cat sleeps."]
TEACHER_MODEL = {"kind": "bi", "num_projectors": 0, "output_dim": 0, "max_length": 32}


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, senteval_dir, tiny_bert_dir):
    """`mixsp finetune-teacher` run for two steps on a few real pairs (read from a file: data.spec)."""
    tmp = tmp_path_factory.mktemp("teacher-ft")
    pairs = small_pairs(senteval_dir, n_train=16, n_dev=12)
    pairs[["sentence1", "sentence2", "score", "task", "subset", "split"]].to_parquet(tmp / "pairs.parquet")
    config = {"name": "tiny-teacher", "seed": 3,
              "model": {**TEACHER_MODEL, "encoder": str(tiny_bert_dir)},
              "data": {"spec": f"file:{tmp / 'pairs.parquet'}"},
              "loss": {"cosent": 1.0},
              "train": {"max_steps": 2, "batch_size": 8, "lr": 1e-3, "eval_every": 2, "warmup_ratio": 0.0,
                        "eval_batch_size": 32},
              "tracking": {"enabled": False}}
    (tmp / "config.yaml").write_text(yaml.safe_dump(config))
    assert main(["finetune-teacher", "--config", str(tmp / "config.yaml"), "--out", str(tmp / "out")]) == 0
    return tmp / "out"


def test_exported_teacher_gives_the_trained_vectors(finetuned, tiny_bert_dir):
    teacher = finetuned / "teacher"
    assert (teacher / "model.safetensors").is_file() and (teacher / "1_Pooling" / "config.json").is_file()
    trained = load_checkpoint(finetuned / "run" / "best", device="cpu").encode(SENTENCES, show_progress=False)
    exported = Encoder(teacher, device="cpu").encode(SENTENCES, show_progress=False)
    np.testing.assert_allclose(exported, trained, atol=1e-5)
    base = Encoder(tiny_bert_dir, device="cpu").encode(SENTENCES, show_progress=False)
    assert np.abs(exported - base).max() > 1e-3  # the two steps changed the weights

    record = json.loads((teacher / FINETUNED_TEACHER_FILE).read_text())
    assert record["base_encoder"] == str(tiny_bert_dir) and record["best_step"] == 2
    assert set(record["dev"]) >= {"STSBenchmark-dev", "SICK-trial", "primary"}
    assert teacher_identity(teacher) == f"{tiny_bert_dir}+finetuned@sha256:{record['weights_sha256']}"


def test_teacher_cache_of_a_finetuned_teacher_is_keyed_by_its_weights(finetuned, tiny_bert_dir, tmp_path):
    teacher = finetuned / "teacher"
    paths = PipelinePaths(tmp_path)
    encode_with_teacher(SENTENCES, paths, str(tiny_bert_dir))  # a plain teacher: teacher/ as before
    vectors, stats = encode_with_teacher(SENTENCES, paths, str(teacher))
    identity = teacher_identity(teacher)
    folder = paths.teacher_cache(identity)
    assert folder.parent == paths.teacher and folder.name.startswith("finetuned-")
    assert json.loads((folder / "meta.json").read_text())["model"] == identity
    assert json.loads((paths.teacher / "meta.json").read_text())["model"] == str(tiny_bert_dir)
    assert stats.encoded == len(SENTENCES)
    np.testing.assert_allclose(vectors, Encoder(teacher, device="cpu").encode(SENTENCES, show_progress=False),
                               atol=1e-6)


def test_only_a_plain_encoder_can_be_a_teacher(tiny_bert_dir, tmp_path):
    with pytest.raises(ConfigError, match="num_projectors"):
        check_teacher_config(tiny_config(tiny_bert_dir))
    with pytest.raises(ConfigError, match="loss.matryoshka"):
        check_teacher_config(tiny_config(tiny_bert_dir, model=TEACHER_MODEL, loss={"routing": 0.0, "matryoshka": 1.0}))
    with pytest.raises(ConfigError, match="data.silver_pairs"):
        check_teacher_config(tiny_config(tiny_bert_dir, model=TEACHER_MODEL, loss={"routing": 0.0},
                                         data={"silver_pairs": 10}))
    student = tiny_config(tiny_bert_dir).model
    save_checkpoint(build_model(student), tmp_path / "student")
    with pytest.raises(CheckpointError, match="not a plain encoder"):
        export_teacher(tmp_path / "student", tmp_path / "teacher")
    assert not (tmp_path / "teacher").exists()
