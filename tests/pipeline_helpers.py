"""Tiny real data for pipeline tests: a SentEval-layout folder cut from the shared SentEval files.

Used by tests/test_pipeline_*.py; plain functions (no pytest) so the tests' fixtures stay short.
"""

from __future__ import annotations

from pathlib import Path

# (relative path, has a header line) of the files a SentEval training folder holds.
_PAIR_FILES = (
    ("STS/STSBenchmark/sts-train.csv", False),
    ("STS/STSBenchmark/sts-dev.csv", False),
    ("SICK/SICK_train.txt", True),
    ("SICK/SICK_trial.txt", True),
)
CORPUS_FILE = "MR/rt-polarity.pos"


def _head(source: Path, target: Path, lines: int, header: bool, spread: bool) -> None:
    """Copy the header (if any) and ``lines`` lines: evenly spread over the file, or the first ones."""
    with open(source, encoding="utf-8") as handle:
        rows = handle.read().splitlines()
    head, body = (rows[:1], rows[1:]) if header else ([], rows)
    step = max(1, len(body) // lines) if spread else 1
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("\n".join(head + body[::step][:lines]) + "\n", encoding="utf-8")


def write_tiny_senteval(senteval_dir: Path, target: Path, pairs_per_file: int = 30,
                        corpus_lines: int = 40) -> Path:
    """A SentEval-layout copy of ``senteval_dir`` with ``pairs_per_file`` pairs per file (spread over the
    file so scores vary) and ``corpus_lines`` sentences of an unlabeled corpus file; returns ``target``."""
    for relative, header in _PAIR_FILES:
        _head(senteval_dir / relative, target / relative, pairs_per_file, header, spread=True)
    _head(senteval_dir / CORPUS_FILE, target / CORPUS_FILE, corpus_lines, False, spread=False)
    return target


def corrupt_pairs(senteval_dir: Path, relative: str = "STS/STSBenchmark/sts-train.csv") -> Path:
    """Break a parsable file the way validation (not parsing) must catch: a blank sentence and a
    score above 5 on the first row. Returns the file changed."""
    path = senteval_dir / relative
    rows = path.read_text(encoding="utf-8").splitlines()
    cells = rows[0].split("\t")
    cells[4], cells[5] = "9.000", "   "
    rows[0] = "\t".join(cells)
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def graph_definitions() -> list:
    """Every asset and asset-check definition of the defs folder, without the resources the
    Definitions bind, so ``dagster.materialize`` can be given test resources. Duplicates (one object
    imported into several defs modules) are dropped."""
    from pipelines.definitions import defs

    loaded = defs()
    unique: dict[int, object] = {}
    for definition in [*(loaded.assets or []), *(loaded.asset_checks or [])]:
        unique.setdefault(id(definition), definition)
    return list(unique.values())


def tiny_student_overrides(encoder: Path, max_steps: int = 4) -> list[str]:
    """``KEY=VALUE`` overrides that turn params.yaml's student into a seconds-long run of a tiny random
    BERT (16-d output, a few steps, evaluated and snapshotted every 2 steps when the trainer snapshots)."""
    from mixsp_core.training.config import TrainConfig

    overrides = [f"model.encoder={encoder}", "model.output_dim=16", "model.projector_mult=2", "model.max_length=32",
                 f"train.max_steps={max_steps}", "train.eval_every=2", "train.batch_size=8",
                 "train.distill_batch_size=8", "train.eval_batch_size=32", "train.device=cpu",
                 "train.output_init_sentences=60", "train.log_every=1", "tracking.log_checkpoint=false"]
    if "snapshot_every" in TrainConfig.__dataclass_fields__:  # the trainer's snapshots of one run, for merging
        overrides.append("train.snapshot_every=2")
    return overrides


def tiny_student(encoder: Path) -> dict:
    """The repository's params.yaml ``student`` section with :func:`tiny_student_overrides` applied."""
    import yaml

    from mixsp_core.params import PARAMS_FILE
    from mixsp_core.training.config import apply_overrides

    student = yaml.safe_load(PARAMS_FILE.read_text(encoding="utf-8"))["student"]
    return apply_overrides(student, tiny_student_overrides(encoder))


def tiny_sections(source: Path, teacher: Path, encoder: Path) -> dict:
    """params.yaml sections (data, teacher, student, compress, merge, evaluate) for the tiny data and models."""
    return {
        "data": {"spec": f"senteval:{source}", "corpus_files": [str(source / CORPUS_FILE)],
                 "max_corpus_sentences": 200},
        "teacher": {"model": str(teacher), "batch_size": 16, "device": "cpu"},
        "student": tiny_student(encoder),
        "compress": {"variants": ["pca:8", "int8"], "fit_sentences": 100},
        "merge": {"methods": ["uniform", "greedy", "fusion"], "p": 1.0},
        "evaluate": {"grid_layers": [], "grid_dims": [4, 8], "grid_vector_types": ["float32", "int8"],
                     "grid_fit_sentences": 100, "min_dev_spearman": -100.0,
                     "analyses_sentences": 100, "transfer_max_sentences": 40},
    }


def teacher_shard_names() -> list[str]:
    """The shard assets' names (``teacher_shard_K_of_N``, N = params.yaml teacher.shards)."""
    from pipelines.defs.assets.teacher import teacher_shards

    return [asset.key.to_user_string() for asset in teacher_shards]


def tiny_run_config(source: Path, teacher: Path, encoder: Path, selection: list[str] | None = None) -> dict:
    """Dagster run config (``ops``) with every asset's config set for the tiny data and models."""
    s = tiny_sections(source, teacher, encoder)
    ops = {
        "sts_pairs": {"spec": s["data"]["spec"]},
        "sentence_corpus": {"corpus_files": s["data"]["corpus_files"], "max_sentences": 200},
        "teacher_embeddings": {"model": s["teacher"]["model"], "batch_size": 16},
        **{name: {"model": s["teacher"]["model"], "batch_size": 16} for name in teacher_shard_names()},
        "student": {"overrides": tiny_student_overrides(encoder)},
        "compressed_variants": s["compress"],
        "merged_model": s["merge"],
        "evaluation_report": {k: v for k, v in s["evaluate"].items() if k != "min_dev_spearman"},
    }
    return {"ops": {name: {"config": cfg} for name, cfg in ops.items() if selection is None or name in selection}}


def teacher_job(data_root: str, tracking_uri: str):
    """The data and teacher assets (shards included) as a job whose resources point at ``data_root``: a
    reconstruction target (``dagster.build_reconstructable_job``) for test runs on the multiprocess executor."""
    import dagster as dg

    from pipelines.defs.resources import MlflowResource, ModelGateResource, PathsResource

    selection = dg.AssetSelection.assets("sts_pairs", "sentence_corpus", *teacher_shard_names(), "teacher_embeddings")
    definitions = dg.Definitions(
        assets=graph_definitions(),
        resources={"paths": PathsResource(data_root=data_root, device="cpu"),
                   "mlflow": MlflowResource(tracking_uri=tracking_uri), "model_gate": ModelGateResource()},
        jobs=[dg.define_asset_job("sharded_teacher", selection=selection)],
    )
    return definitions.resolve_job_def("sharded_teacher")


def teacher_job_on_pipeline_executor(data_root: str, tracking_uri: str):
    """:func:`teacher_job` on the executor ``mixsp_full`` runs on (pipelines/defs/executors.py: multiprocess by
    default, Celery workers by run config or ``MIXSP_EXECUTOR``): a reconstruction target for the Celery test,
    which the workers import to run its steps."""
    from pipelines.defs.executors import mixsp_executor

    return teacher_job(data_root, tracking_uri).with_executor_def(mixsp_executor)
