"""The champion's Hugging Face model card (front matter, usage for ST / MLflow / ONNX) and `mixsp push`:
its upload plan without the network, and a clear offline error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from mixsp_core.tracking.model_card import build_card

VARIANT = {"path": "data/models/merged/model", "dev": 86.25, "dims": 128, "vector_type": "float32",
           "bytes_per_vector": 512, "tasks": {"STSBenchmark-dev": {"spearman": 88.5}, "SICK-trial": {"spearman": 84.0}}}
EVALUATION = {"best": "merged", "variants": {"merged": VARIANT}, "dev_sets": ["STSBenchmark-dev", "SICK-trial"],
              "grid": {}, "grid_model": "merged"}
PROMOTION = {"registered_model": "mixsp-student", "version": "3", "model_name": "merged", "run_id": "train123",
             "promote_run_id": "promote456", "previous_version": "2", "previous_dev": 85.0}


def champion_dir(tmp_path: Path, encoder: str = "sentence-transformers/all-MiniLM-L6-v2",
                 matryoshka: float = 0.0) -> Path:
    folder = tmp_path / "champion"
    folder.mkdir()
    config = {"model": {"encoder": encoder, "kind": "bi", "output_dim": 128, "num_projectors": 2},
              "data": {"train_tasks": ["STSBenchmark", "SICKRelatedness"], "dev_sets": EVALUATION["dev_sets"]},
              "loss": {"cosent": 1.0, "matryoshka": matryoshka, "matryoshka_dims": [32, 64, 128, 256]},
              "train": {"epochs": 2}, "seed": 0}
    (folder / "config.json").write_text(json.dumps({"mixsp_kind": "bi", "training": {"config": config}}))
    return folder


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_card_is_a_hugging_face_model_card(tmp_path):
    card = build_card(champion_dir(tmp_path), EVALUATION, PROMOTION)
    header = front_matter(card)
    assert header["library_name"] == "sentence-transformers" and header["pipeline_tag"] == "sentence-similarity"
    assert header["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert header["datasets"] == ["mteb/stsbenchmark-sts", "mteb/sickr-sts"]
    assert {"sentence-transformers", "sentence-similarity"} <= set(header["tags"])
    [index] = header["model-index"]
    values = {r["dataset"]["name"]: r["metrics"][0]["value"] for r in index["results"]}
    assert values == {"STS-B dev": 0.885, "SICK trial": 0.84}
    assert all(r["metrics"][0]["type"] == "spearman_cosine" for r in index["results"])

    body = card.split("---\n", 2)[2]
    assert "**86.25**" in body and "version 3 (champion)" in body
    assert 'SentenceTransformer("data/models/champion", trust_remote_code=True)' in body
    assert 'mlflow.pyfunc.load_model("models:/mixsp-student@champion")' in body
    assert "mixsp export --model data/models/champion --format onnx --out DIR" in body
    assert "L2-normalised" in body and "128 dimensions" in body and 'precision="int8"' in body
    assert "mixsp push --model data/models/champion --repo-id" in body
    assert "train123" in body and "promote456" in body
    assert "truncate_dim" not in body  # not Matryoshka-trained: no prefixes promised


def test_card_names_matryoshka_prefixes_and_no_local_base_model(tmp_path):
    card = build_card(champion_dir(tmp_path, encoder=str(tmp_path / "local-bert"), matryoshka=1.0), EVALUATION,
                      PROMOTION)
    header = front_matter(card)
    assert "base_model" not in header and "matryoshka" in header["tags"]
    assert "truncate_dim=32" in card and "32, 64" in card


def model_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "champion"
    for name in ("config.json", "README.md", "modules.json", "encoder/model.safetensors", "trainer_state.json",
                 ".hidden", "__pycache__/x.pyc", "2_MixSPHead/config.json"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("{}")
    return folder


def test_push_plan_lists_the_model_files_only(tmp_path):
    from mixsp_core.tracking.hub_push import plan_push

    plan = plan_push(model_folder(tmp_path), "someone/mixsp-student")
    assert plan.repo_id == "someone/mixsp-student"
    assert plan.files == ["2_MixSPHead/config.json", "README.md", "config.json", "encoder/model.safetensors",
                          "modules.json"]


def test_push_uploads_the_plan_in_one_commit(tmp_path, monkeypatch):
    from mixsp_core.tracking.hub_push import plan_push, push_model

    calls = []

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id, kwargs))

        def upload_folder(self, **kwargs):
            calls.append(("upload_folder", kwargs["repo_id"], kwargs))
            return type("Commit", (), {"commit_url": "https://huggingface.co/someone/m/commit/1"})()

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    plan = plan_push(model_folder(tmp_path), "someone/m")
    assert push_model(plan, api=FakeApi()) == "https://huggingface.co/someone/m/commit/1"
    assert [(name, repo) for name, repo, _ in calls] == [("create_repo", "someone/m"), ("upload_folder", "someone/m")]
    upload = calls[1][2]
    assert upload["allow_patterns"] == plan.files and Path(upload["folder_path"]) == plan.folder


def test_push_without_network_is_a_clear_error(tmp_path, monkeypatch):
    import httpx2

    from mixsp_core.tracking.hub_push import HubOfflineError, plan_push, push_model

    class Unreachable:
        def create_repo(self, repo_id, **kwargs):
            raise httpx2.ConnectError("Name or service not known")

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    with pytest.raises(HubOfflineError, match="not reachable"):
        push_model(plan_push(model_folder(tmp_path), "someone/m"), api=Unreachable())


def test_cli_push_offline_exits_2_without_a_traceback(tmp_path, monkeypatch, capsys):
    from mixsp_core.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = model_folder(tmp_path)
    assert main(["push", "--model", str(folder), "--repo-id", "someone/m"]) == 2
    err = capsys.readouterr().err
    assert "HF_HUB_OFFLINE" in err and "Traceback" not in err
    assert main(["push", "--model", str(folder), "--repo-id", "someone/m", "--dry-run"]) == 0
    assert "encoder/model.safetensors" in capsys.readouterr().out
    # user errors: one line naming the option or the folder (the CLI's usage-error status)
    assert main(["push", "--model", str(folder), "--repo-id", "no spaces allowed"]) == 2
    assert "--repo-id" in capsys.readouterr().err
    assert main(["push", "--model", str(tmp_path / "missing"), "--repo-id", "someone/m"]) == 2
    err = capsys.readouterr().err
    assert "missing" in err and "Traceback" not in err
