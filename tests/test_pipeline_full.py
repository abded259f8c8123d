"""The whole asset graph through ``dagster.materialize`` with tiny random models and tiny real data:
every asset's outputs, every check, the MLflow runs and registry; a second promotion that is not better
leaves the alias; bad data stops the graph before training and leaves the champion untouched."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import numpy as np
import pytest

from pipelines.metadata import file_md5
from tests.pipeline_helpers import corrupt_pairs, graph_definitions, tiny_run_config, write_tiny_senteval

ALL_CHECKS = {"pairs_valid", "corpus_valid", "student_weights_finite", "student_embedding_shape",
              "student_dev_floor", "merged_weights_finite", "best_dev_floor", "champion_loads"}


def materialize(workdir: Path, source: Path, teacher: Path, encoder: Path,
                selection: list[str] | None = None, floor: float = -100.0) -> dg.ExecuteInProcessResult:
    from pipelines.defs.resources import MlflowResource, ModelGateResource, PathsResource

    return dg.materialize(
        graph_definitions(),
        selection=selection,
        resources={"paths": PathsResource(data_root=str(workdir / "data"), device="cpu"),
                   "mlflow": MlflowResource(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}"),
                   "model_gate": ModelGateResource(min_dev_spearman=floor)},
        run_config=tiny_run_config(source, teacher, encoder, selection),
        raise_on_error=False,
    )


def meta(result: dg.ExecuteInProcessResult, asset: str) -> dict:
    [event] = result.asset_materializations_for_node(asset)
    return {key: value.value for key, value in event.metadata.items()}


def client(workdir: Path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, senteval_dir, tiny_teacher_dir, tiny_bert_dir):
    workdir = tmp_path_factory.mktemp("full")
    source = write_tiny_senteval(senteval_dir, workdir / "senteval", pairs_per_file=30, corpus_lines=40)
    result = materialize(workdir, source, tiny_teacher_dir, tiny_bert_dir)
    return workdir, source, result


def test_full_graph_outputs_checks_and_mlflow(full_run, tiny_bert_dir):
    workdir, _, result = full_run
    assert result.success, [e.message for e in result.all_events if e.is_step_failure]
    assert {e.check_name: e.passed for e in result.get_asset_check_evaluations()} == dict.fromkeys(ALL_CHECKS, True)
    data = workdir / "data"

    student = meta(result, "student")
    assert isinstance(student["dev/mean"], float) and isinstance(student["dev/STSBenchmark"], float)
    assert "data:image/png;base64," in student["plot/dev-spearman"]
    assert (data / "models" / "student" / "best" / "encoder" / "model.safetensors").is_file()

    compressed = meta(result, "compressed_variants")
    assert compressed["bytes_per_vector/pca8"] == 32 and compressed["bytes_per_vector/int8"] == 16
    assert {p.name for p in (data / "models" / "compressed").iterdir() if p.is_dir()} == {"pca8", "int8"}

    merged = meta(result, "merged_model")
    merge_record = json.loads((data / "models" / "merged" / "merge.json").read_text())
    assert set(merge_record["methods"]) == {"uniform", "greedy", "fusion"}
    assert merged["best_method"] == max(merge_record["methods"], key=merge_record["methods"].get)
    # Epochs of one run: the snapshots every 2 steps, from the run's own step-0 checkpoint.
    assert [Path(p).name for p in merge_record["inputs"]] == ["step-2", "step-4"]
    assert merge_record["start"] == str(data / "models" / "student" / "start")
    assert student["snapshots"] == 2
    assert (data / "models" / "merged" / "model" / "encoder" / "model.safetensors").is_file()

    report = json.loads((data / "reports" / "evaluation.json").read_text())
    assert set(report["variants"]) == {"student", "compressed/pca8", "compressed/int8", "merged"}
    assert report["best_dev"] == max(report["dev"].values())
    assert report["variants"]["compressed/int8"]["bytes_per_vector"] == 16
    metrics = json.loads((data / "reports" / "metrics.json").read_text())  # what `dvc metrics show` reads
    assert metrics["best_dev"] == report["best_dev"] and metrics["dev"] == report["dev"]
    for name in ("evaluation.md", "evaluation.png", "grid.json", "grid.png"):
        assert (data / "reports" / name).is_file()
    assert meta(result, "evaluation_report")["best"] == report["best"]
    # the analyses of the best variant: in the report, as metadata (tables and plots) and as files
    assert report["analyses"]["model"] == report["best"] and "TwoNN" in meta(result, "evaluation_report")["analyses"]
    assert "data:image/png;base64," in meta(result, "evaluation_report")["analyses_transfer_plot"]
    assert (data / "reports" / "analyses_prefix.png").is_file()

    # Registry: version 1, alias champion on it, the checkpoint copied where `mixsp encode` loads it.
    champion = meta(result, "champion")
    assert (champion["version"], champion["promoted"]) == ("1", True)
    mlflow = client(workdir)
    version = mlflow.get_model_version_by_alias("mixsp-student", "champion")
    assert str(version.version) == "1" and float(version.tags["dev/mean"]) == pytest.approx(report["best_dev"], abs=1e-4)
    record = json.loads((data / "models" / "champion" / "champion.json").read_text())
    assert record["champion_version"] == "1" and record["model_name"] == report["best"]
    # The generated model card: the champion's own dev figures, base model, dims plot, how to load.
    card = (data / "models" / "champion" / "README.md").read_text()
    assert f"**{report['best_dev']:.2f}**" in card and "version 1 (champion)" in card
    assert f"Base model: `{tiny_bert_dir.name}" in card or str(tiny_bert_dir) in card
    assert "load_embedder" in card
    assert "![dev Spearman against dims](dims.png)" in card and (data / "models" / "champion" / "dims.png").is_file()
    assert "Training time:" in card

    # One MLflow run per training / evaluation / promotion, each tagged with this Dagster run and nested
    # under the Dagster run's parent run; one dev vocabulary; the version's source run is the training run.
    runs = mlflow.search_runs([mlflow.get_experiment_by_name("mixsp").experiment_id],
                              filter_string=f"tags.`dagster.run_id` = '{result.run_id}'")
    stages = {run.data.tags.get("mixsp.stage"): run for run in runs}
    assert set(stages) == {"pipeline", "train", "evaluate", "promote"}
    assert all(run.data.tags["git.commit"] for run in runs)
    parent = stages["pipeline"].info.run_id
    assert all(stages[s].data.tags["mlflow.parentRunId"] == parent for s in ("train", "evaluate", "promote"))
    for stage in ("train", "evaluate", "promote"):
        assert {"dev/STSBenchmark", "dev/SICK", "dev/mean"} <= set(stages[stage].data.metrics), stage
    assert stages["evaluate"].data.metrics["dev/mean"] == pytest.approx(report["best_dev"])
    trained = json.loads((data / "models" / "student" / "metrics.json").read_text())["best"]
    assert stages["train"].data.metrics["dev/mean"] == pytest.approx(trained["primary"])  # its best, not its last
    assert version.run_id == stages["train"].info.run_id
    assert float(version.tags["dev/mean"]) == pytest.approx(stages["promote"].data.metrics["dev/mean"])
    import mlflow.pyfunc

    champion_model = mlflow.pyfunc.load_model(version.source)
    assert champion_model.predict(["A man plays the guitar."]).shape == (1, report["variants"][report["best"]]["dims"])

    from mixsp_core.cli import main

    sentences = workdir / "sentences.txt"
    sentences.write_text("A man plays the guitar.\nA dog runs.\n")
    assert main(["encode", "--model", str(data / "models" / "champion"), "--input", str(sentences),
                 "--output", str(workdir / "vectors.npy"), "--device", "cpu"]) == 0
    vectors = np.load(workdir / "vectors.npy")
    assert vectors.shape == (2, report["variants"][report["best"]]["dims"])


def test_promotion_that_is_not_better_leaves_the_alias(full_run, tiny_teacher_dir, tiny_bert_dir):
    workdir, source, _ = full_run
    champion_dir = workdir / "data" / "models" / "champion"
    before = file_md5(champion_dir / "2_MixSPHead" / "model.safetensors")
    card_before = file_md5(champion_dir / "README.md")
    # The same evaluated model again: not strictly better, so a challenger.
    again = materialize(workdir, source, tiny_teacher_dir, tiny_bert_dir, selection=["champion"])
    assert again.success
    assert (meta(again, "champion")["version"], meta(again, "champion")["promoted"]) == ("2", False)
    mlflow = client(workdir)
    assert str(mlflow.get_model_version_by_alias("mixsp-student", "champion").version) == "1"
    assert mlflow.get_model_version("mixsp-student", "2").tags["role"] == "challenger"
    assert file_md5(champion_dir / "2_MixSPHead" / "model.safetensors") == before
    assert file_md5(champion_dir / "README.md") == card_before  # the card still describes version 1


def test_model_below_the_dev_floor_is_not_promoted(full_run, tiny_teacher_dir, tiny_bert_dir):
    workdir, source, _ = full_run
    mlflow = client(workdir)
    versions = len(mlflow.search_model_versions("name='mixsp-student'"))
    result = materialize(workdir, source, tiny_teacher_dir, tiny_bert_dir,
                         selection=["evaluation_report", "champion"], floor=1000.0)
    assert not result.success
    assert {e.check_name: e.passed for e in result.get_asset_check_evaluations()} == {"best_dev_floor": False}
    assert "champion" not in {e.step_key for e in result.all_events if e.is_step_start}
    assert len(mlflow.search_model_versions("name='mixsp-student'")) == versions


def test_bad_data_stops_the_graph_and_keeps_the_champion(full_run, tiny_teacher_dir, tiny_bert_dir):
    workdir, source, _ = full_run
    data = workdir / "data"
    head = Path("2_MixSPHead") / "model.safetensors"
    kept = [data / "pairs" / "pairs.parquet", data / "models" / "student" / "best" / head,
            data / "models" / "champion" / head, data / "reports" / "evaluation.json"]
    before = {path: file_md5(path) for path in kept}
    mlflow = client(workdir)
    versions = len(mlflow.search_model_versions("name='mixsp-student'"))
    alias = mlflow.get_model_version_by_alias("mixsp-student", "champion").version

    corrupt_pairs(source)
    result = materialize(workdir, source, tiny_teacher_dir, tiny_bert_dir)
    assert not result.success
    assert {e.check_name: e.passed for e in result.get_asset_check_evaluations()} == {"pairs_valid": False}
    assert {e.step_key for e in result.all_events if e.is_step_start} == {"sts_pairs"}
    assert {path: file_md5(path) for path in kept} == before
    assert len(mlflow.search_model_versions("name='mixsp-student'")) == versions
    assert mlflow.get_model_version_by_alias("mixsp-student", "champion").version == alias
