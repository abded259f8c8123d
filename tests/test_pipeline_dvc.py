"""DVC and Dagster describe the same chain: same stages (DVC stage = Dagster asset group), same order,
same dependencies, and both read their defaults from params.yaml."""

from __future__ import annotations

import graphlib
import os
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("DVC_NO_ANALYTICS", "1")


def _dvc_stage_edges() -> tuple[list[str], set[tuple[str, str]]]:
    from dvc.repo import Repo

    with Repo(str(REPO)) as repo:
        names = [stage.name for stage in repo.index.stages]
        # DVC's graph points from a stage to the stages it depends on.
        edges = {(up.addressing, down.addressing) for down, up in repo.index.graph.edges}
    return names, edges


def _dagster_group_edges() -> tuple[list[str], set[tuple[str, str]]]:
    from pipelines.definitions import defs

    graph = defs().resolve_asset_graph()
    group = {key: graph.get(key).group_name for key in graph.get_all_asset_keys()}
    edges = set()
    for key in group:
        for parent in graph.get(key).parent_keys:
            if group[parent] != group[key]:
                edges.add((group[parent], group[key]))
    return sorted(set(group.values())), edges


def _order(names: list[str], edges: set[tuple[str, str]]) -> list[str]:
    sorter = graphlib.TopologicalSorter({name: set() for name in names})
    for up, down in edges:
        sorter.add(down, up)
    order = list(sorter.static_order())
    # Same order only means something when the chain is linear: every consecutive pair is an edge.
    assert all((a, b) in edges for a, b in zip(order, order[1:])), f"stages do not form one chain: {edges}"
    return order


def test_dvc_stages_and_asset_groups_are_the_same_chain():
    dvc_names, dvc_edges = _dvc_stage_edges()
    dg_names, dg_edges = _dagster_group_edges()
    assert sorted(dvc_names) == dg_names
    assert dvc_edges == dg_edges
    assert _order(dvc_names, dvc_edges) == _order(dg_names, dg_edges)
    assert _order(dg_names, dg_edges)[:2] == ["prepare", "teacher"]


def test_dvc_params_sections_exist_in_params_yaml():
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        for entry in stage.get("params", []):
            section = entry if isinstance(entry, str) else next(iter(entry))
            assert section.split(".")[0] in params, f"dvc.yaml stage {name} reads params.{section}: missing"


def test_dagster_config_defaults_come_from_params_yaml():
    from pipelines.defs.assets.prepare import CorpusConfig, PairsConfig
    from pipelines.defs.assets.teacher import TeacherConfig
    from pipelines.defs.resources import PathsResource

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    assert PairsConfig().spec == params["data"]["spec"]
    assert CorpusConfig().max_sentences == params["data"]["max_corpus_sentences"]
    assert CorpusConfig().seed == params["data"]["seed"]
    assert TeacherConfig().model == params["teacher"]["model"]
    assert TeacherConfig().batch_size == params["teacher"]["batch_size"]
    assert PathsResource().data_root == params["data"]["root"]

    from pipelines.defs.assets.compress import CompressConfig
    from pipelines.defs.assets.evaluate import EvaluateConfig
    from pipelines.defs.assets.merge import MergeConfig
    from pipelines.defs.assets.promote import ChampionConfig
    from pipelines.defs.assets.train import StudentOverrides
    from pipelines.defs.resources import MlflowResource, ModelGateResource, pipeline_params

    assert StudentOverrides().overrides == []  # the launchpad starts from params.yaml's student as it is
    assert pipeline_params().student.train.epochs == params["student"]["train"]["epochs"]
    assert CompressConfig().variants == params["compress"]["variants"]
    assert (MergeConfig().methods, MergeConfig().p) == (params["merge"]["methods"], params["merge"]["p"])
    assert EvaluateConfig().grid_dims == params["evaluate"]["grid_dims"]
    assert ModelGateResource().min_dev_spearman == params["evaluate"]["min_dev_spearman"]
    assert ChampionConfig().alias == params["promote"]["alias"]
    assert MlflowResource().registered_model == params["promote"]["registered_model"]


def test_every_dvc_stage_runs_its_mixsp_subcommand_on_params_yaml():
    from mixsp_core.cli import build_parser

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert list(stages) == ["prepare", "teacher", "train", "compress", "merge", "evaluate", "promote"]
    for name, stage in stages.items():
        argv = stage["cmd"].split()
        assert argv[0] == "mixsp" and argv[-2:] == ["--config", "params.yaml"], name
        assert build_parser().parse_args(argv[1:]).config == "params.yaml"


def test_every_dvc_stage_depends_on_its_stage_module():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        module = f"mixsp_core/stages/{name}.py"
        assert module in stage["deps"], f"dvc.yaml stage {name} does not depend on {module}"
        assert (REPO / module).is_file()
        assert all((REPO / dep).exists() or dep.startswith(("data/", "../")) for dep in stage["deps"]), name


def test_dvc_params_diff_shows_a_changed_training_epoch(tmp_path):
    """The student's training config is DVC params: changing student.train.epochs shows in `dvc params diff`."""
    import shutil
    import subprocess

    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO / name, tmp_path / name)
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    dvc = str(Path(os.sys.executable).parent / "dvc")

    def run(*argv: str) -> str:
        return subprocess.run(argv, cwd=tmp_path, env=env, check=True, capture_output=True, text=True).stdout

    run("git", "init", "-q")
    run(dvc, "init", "-q")
    run("git", "add", "-A")
    run("git", "commit", "-qm", "params")
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    epochs = params["student"]["train"]["epochs"]
    text = (tmp_path / "params.yaml").read_text().replace(f"    epochs: {epochs}\n", f"    epochs: {epochs + 1}\n")
    (tmp_path / "params.yaml").write_text(text)
    diff = run(dvc, "params", "diff", "--all")
    assert "student.train.epochs" in diff and str(epochs + 1) in diff, diff


@pytest.mark.parametrize("path", ["dvc.yaml", "params.yaml", ".dvc/config"])
def test_dvc_files_present(path):
    assert (REPO / path).is_file()
