"""Sharded teacher encoding in the asset graph and the CLI, with a tiny random teacher: shard assets
materialised one by one (as separate processes or machines would) then merged by ``teacher_embeddings``;
a multiprocess-executor run encoding the shards in parallel processes; `mixsp teacher --shard/--merge-shards`."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import numpy as np
import pytest
import yaml

from mixsp_core.teacher.cache import TeacherCache
from tests.pipeline_helpers import (
    graph_definitions,
    teacher_shard_names,
    tiny_run_config,
    tiny_sections,
    write_tiny_senteval,
)

REPO = Path(__file__).resolve().parents[1]
DATA = ["sts_pairs", "sentence_corpus"]


@pytest.fixture
def source(tmp_path: Path, senteval_dir: Path) -> Path:
    return write_tiny_senteval(senteval_dir, tmp_path / "senteval", pairs_per_file=20, corpus_lines=30)


def materialize(workdir: Path, source: Path, teacher: Path, selection: list[str]) -> dg.ExecuteInProcessResult:
    from pipelines.defs.resources import MlflowResource, ModelGateResource, PathsResource

    return dg.materialize(
        graph_definitions(),
        selection=selection,
        resources={"paths": PathsResource(data_root=str(workdir / "data"), device="cpu"),
                   "mlflow": MlflowResource(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}"),
                   "model_gate": ModelGateResource()},
        run_config=tiny_run_config(source, teacher, teacher, selection),
        raise_on_error=False,
    )


def meta(events, asset: str) -> dict:
    [event] = [e for e in events if e.asset_key == dg.AssetKey(asset)]
    return {key: value.value for key, value in event.metadata.items()}


def one_shot(corpus: list[str], teacher: Path, where: Path) -> np.ndarray:
    from mixsp_core.models.encoder import Encoder

    vectors, _ = TeacherCache(where, "one-shot").encode(corpus, Encoder(teacher, device="cpu"), show_progress=False)
    return vectors


def test_shard_assets_then_merge_asset(tmp_path, source, tiny_teacher_dir):
    shards = teacher_shard_names()
    assert shards == ["teacher_shard_1_of_2", "teacher_shard_2_of_2"]  # params.yaml teacher.shards: 2
    assert materialize(tmp_path, source, tiny_teacher_dir, DATA).success
    for name in shards:  # one run per shard, as separate processes or machines would run them
        result = materialize(tmp_path, source, tiny_teacher_dir, [name])
        assert result.success
        assert meta(result.asset_materializations_for_node(name), name)["encoded"] > 0
    merged = materialize(tmp_path, source, tiny_teacher_dir, ["teacher_embeddings"])
    assert merged.success
    record = meta(merged.asset_materializations_for_node("teacher_embeddings"), "teacher_embeddings")
    corpus = (tmp_path / "data" / "corpus" / "corpus.txt").read_text(encoding="utf-8").splitlines()
    assert (record["encoded"], record["encoded_in_this_step"], record["reused"]) == (len(corpus), 0, 0)
    assert (record["shards"], record["dim"]) == (2, 48)
    cache = TeacherCache(tmp_path / "data" / "teacher", str(tiny_teacher_dir))
    np.testing.assert_allclose(cache.lookup(corpus), one_shot(corpus, tiny_teacher_dir, tmp_path / "one"), atol=1e-5)


def test_multiprocess_run_encodes_shards_in_parallel_processes(tmp_path, source, tiny_teacher_dir):
    import os

    from pipelines.run import EXECUTOR

    job = dg.build_reconstructable_job(
        "tests.pipeline_helpers", "teacher_job",
        # the step processes import the job from tests/ (a fixture, not part of the package)
        reconstructor_working_directory=str(Path(__file__).resolve().parents[1]),
        reconstructable_kwargs={"data_root": str(tmp_path / "data"), "tracking_uri": f"sqlite:///{tmp_path / 'm.db'}"})
    shards = teacher_shard_names()
    config = tiny_run_config(source, tiny_teacher_dir, tiny_teacher_dir, [*DATA, *shards, "teacher_embeddings"])
    multiprocess = {"multiprocess": {**EXECUTOR["multiprocess"], "max_concurrent": 2}}
    (tmp_path / "dagster_home").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster_home")) as instance:
        result = dg.execute_job(job, instance, run_config={**config, "execution": {"config": multiprocess}})
        assert result.success, [e.message for e in result.all_events if e.is_step_failure]
        order = [(e.event_type_value, e.step_key) for e in result.all_events if e.step_key in shards
                 and e.event_type_value in ("STEP_WORKER_STARTING", "STEP_SUCCESS")]
    # The executor launched both shard processes before either shard finished: they ran side by side.
    assert {kind for kind, _ in order[:2]} == {"STEP_WORKER_STARTING"}, order
    events = result.get_asset_materialization_events()
    pids = {meta([e.materialization for e in events], name)["pid"] for name in shards}
    assert len(pids) == 2 and os.getpid() not in pids
    record = meta([e.materialization for e in events], "teacher_embeddings")
    corpus = (tmp_path / "data" / "corpus" / "corpus.txt").read_text(encoding="utf-8").splitlines()
    assert (record["encoded"], record["encoded_in_this_step"]) == (len(corpus), 0)
    cache = TeacherCache(tmp_path / "data" / "teacher", str(tiny_teacher_dir))
    np.testing.assert_allclose(cache.lookup(corpus), one_shot(corpus, tiny_teacher_dir, tmp_path / "one"), atol=1e-5)


def test_cli_shard_then_merge(tmp_path, source, tiny_teacher_dir, capsys):
    from mixsp_core.cli import main

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for name, values in tiny_sections(source, tiny_teacher_dir, tiny_teacher_dir).items():
        params[name].update(values)
    params["data"]["root"] = str(tmp_path / "data")
    config = tmp_path / "params.yaml"
    config.write_text(yaml.safe_dump(params))
    assert main(["prepare", "--config", str(config)]) == 0
    cache = tmp_path / "data" / "teacher"

    assert main(["teacher", "--config", str(config), "--shard", "2/2"]) == 0
    assert main(["teacher", "--config", str(config), "--merge-shards"]) == 2
    assert "shard-1-of-2: shard 1/2 is missing" in capsys.readouterr().err
    assert not cache.exists()  # a refused merge writes nothing

    assert main(["teacher", "--config", str(config), "--shard", "1/3"]) == 2
    assert "teacher.shards" in capsys.readouterr().err
    assert main(["teacher", "--config", str(config), "--shard", "1/2"]) == 0
    assert main(["teacher", "--config", str(config), "--shard", "1/2"]) == 0
    assert "already done, nothing encoded" in capsys.readouterr().out
    assert main(["teacher", "--config", str(config), "--merge-shards"]) == 0
    corpus = (tmp_path / "data" / "corpus" / "corpus.txt").read_text(encoding="utf-8").splitlines()
    assert f"{len(corpus)} rows added from 2 shards" in capsys.readouterr().out
    assert main(["teacher", "--config", str(config)]) == 0  # the DVC stage: everything cached already
    assert f"0 sentences encoded, {len(corpus)} reused" in capsys.readouterr().out
