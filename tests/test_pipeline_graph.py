"""The data and teacher stages of the asset graph through ``dagster.materialize`` on tiny real data and a
tiny random teacher: outputs on disk, metadata, blocking checks, the teacher cache reused, and bad data
stopping the graph. (The whole chain, training to champion: tests/test_pipeline_full.py.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd
import pytest

from pipelines.metadata import file_md5
from tests.pipeline_helpers import CORPUS_FILE, corrupt_pairs, graph_definitions, write_tiny_senteval

DATA_ASSETS = ["sts_pairs", "sentence_corpus", "teacher_embeddings"]


@pytest.fixture(scope="module")
def definitions() -> list:
    return graph_definitions()


@pytest.fixture
def tiny_source(tmp_path: Path, senteval_dir: Path) -> Path:
    return write_tiny_senteval(senteval_dir, tmp_path / "senteval", pairs_per_file=30, corpus_lines=40)


def materialize(definitions: list, workdir: Path, source: Path, teacher: Path,
                selection: list[str] | None = None) -> dg.ExecuteInProcessResult:
    """Materialise the data and teacher assets (or ``selection``) with every artifact and the MLflow store under ``workdir``."""
    from pipelines.defs.resources import MlflowResource, ModelGateResource, PathsResource

    selection = selection or DATA_ASSETS
    run_config: dict[str, Any] = {"ops": {
        "sts_pairs": {"config": {"spec": f"senteval:{source}"}},
        "sentence_corpus": {"config": {"corpus_files": [str(source / CORPUS_FILE)], "max_sentences": 500}},
        "teacher_embeddings": {"config": {"model": str(teacher), "batch_size": 16}},
    }}
    return dg.materialize(
        definitions,
        selection=selection,
        resources={
            "paths": PathsResource(data_root=str(workdir / "data"), device="cpu"),
            "mlflow": MlflowResource(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}"),
            "model_gate": ModelGateResource(),  # unused by these assets; the definitions require it
        },
        run_config={"ops": {k: v for k, v in run_config["ops"].items()
                            if k in selection}},
        raise_on_error=False,
    )


def check_results(result: dg.ExecuteInProcessResult) -> dict[str, bool]:
    return {e.check_name: e.passed for e in result.get_asset_check_evaluations()}


def materialization(result: dg.ExecuteInProcessResult, asset: str) -> dict[str, Any]:
    [event] = result.asset_materializations_for_node(asset)
    return {key: value.value for key, value in event.metadata.items()}


def test_graph_materialises_data_and_teacher_embeddings(definitions, tmp_path, tiny_source, tiny_teacher_dir):
    result = materialize(definitions, tmp_path, tiny_source, tiny_teacher_dir)
    assert result.success
    assert check_results(result) == {"pairs_valid": True, "corpus_valid": True}

    data = tmp_path / "data"
    pairs = pd.read_parquet(data / "pairs" / "pairs.parquet")
    assert len(pairs) == 4 * 30
    assert set(pairs["split"]) == {"train", "dev"}
    meta = materialization(result, "sts_pairs")
    assert meta["dagster/row_count"] == len(pairs)
    assert meta["rows/STSBenchmark/train"] == 30
    assert "STSBenchmark" in meta["counts"]
    assert meta["md5"] == file_md5(data / "pairs" / "pairs.parquet")

    corpus = (data / "corpus" / "corpus.txt").read_text(encoding="utf-8").splitlines()
    assert materialization(result, "sentence_corpus")["sentences"] == len(corpus)
    assert len(corpus) == len(set(corpus)) > 40  # training sentences plus the text file, de-duplicated

    teacher = materialization(result, "teacher_embeddings")
    assert (teacher["encoded"], teacher["reused"], teacher["dim"]) == (len(corpus), 0, 48)
    assert (data / "teacher" / "embeddings.npy").is_file()

    # A second run of the teacher stage encodes nothing: every sentence comes from the cache.
    again = materialize(definitions, tmp_path, tiny_source, tiny_teacher_dir, selection=["teacher_embeddings"])
    assert again.success
    assert (materialization(again, "teacher_embeddings")["encoded"],
            materialization(again, "teacher_embeddings")["reused"]) == (0, len(corpus))


def test_bad_data_fails_blocking_check_and_leaves_artifacts_untouched(definitions, tmp_path, tiny_source,
                                                                       tiny_teacher_dir):
    assert materialize(definitions, tmp_path, tiny_source, tiny_teacher_dir).success
    data = tmp_path / "data"
    kept = [data / "pairs" / "pairs.parquet", data / "corpus" / "corpus.txt", data / "teacher" / "embeddings.npy"]
    before = {path: file_md5(path) for path in kept}

    corrupt_pairs(tiny_source)
    result = materialize(definitions, tmp_path, tiny_source, tiny_teacher_dir)

    assert not result.success
    assert check_results(result) == {"pairs_valid": False}
    evaluation = result.get_asset_check_evaluations()[0]
    assert "sts-train.csv" in evaluation.metadata["report"].value  # failures name their origin file
    assert not result.asset_materializations_for_node("sts_pairs")
    started = {e.step_key for e in result.all_events if e.is_step_start}
    assert started == {"sts_pairs"}  # downstream steps never ran
    assert not result.asset_materializations_for_node("sentence_corpus")
    assert not result.asset_materializations_for_node("teacher_embeddings")
    assert {path: file_md5(path) for path in kept} == before
