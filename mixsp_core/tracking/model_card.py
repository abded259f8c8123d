"""The champion's model card: ``README.md`` in the champion directory, generated at promotion.

A Hugging Face model card: YAML front matter (``library_name: sentence-transformers``, ``pipeline_tag:
sentence-similarity``, tags, ``base_model``, ``datasets``, the dev Spearman figures as ``model-index``),
then the dev figures, the vectors (width, L2 normalisation, smaller dims, int8 / binary), how to load it
(sentence-transformers, MLflow, ONNX, ``mixsp``), the model, its training and its provenance.

Everything on the card is read from files the pipeline wrote: the champion checkpoint's own
``config.json`` (model, training config, merge record), the training run's ``trainer_state.json``
(steps, training time), the evaluation report (dev figures of every variant, the dims grid) and the
promotion record (registry version). Nothing is typed in by hand, so the card cannot drift from the
model it describes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from mixsp_core.io import atomic_write, write_text_atomic
from mixsp_core.paths import RunDir

CARD_FILE = "README.md"
DIMS_PLOT = "dims.png"
_TASK_LABELS = {"STSBenchmark-dev": "STS-B dev", "SICK-trial": "SICK trial"}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err


def training_record(meta: dict[str, Any], training_run: Path | RunDir | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(training config, trainer state)`` behind the champion: its own ``config.json`` (``meta``) when it
    carries the training config (a ``best`` checkpoint), else the pipeline's training run (merged or
    compressed champions descend from it)."""
    run = RunDir(Path(training_run)) if training_run is not None else None
    config = meta.get("training", {}).get("config") or {}
    if not config and run is not None:
        config = _read_json(run.best / "config.json").get("training", {}).get("config") or {}
    state = _read_json(run.trainer_state) if run is not None else {}
    return config, state


def _losses(loss: dict[str, Any]) -> str:
    terms = [f"{name} {weight:g}" for name, weight in loss.items()
             if isinstance(weight, (int, float)) and not isinstance(weight, bool) and weight > 0
             and not name.endswith(("_scale", "_temperature", "_dim"))]
    return ", ".join(terms) or "none recorded"


def _hub_dataset(task: str) -> str | None:
    """The Hub id of a benchmark task (``STSBenchmark`` -> ``mteb/stsbenchmark-sts``), None for others."""
    from mixsp_core.data.hub import HUB_TASKS

    return next((hub_id for hub_id, name in HUB_TASKS.items() if name == task), None)


def _hub_model_id(name: str) -> str | None:
    """``name`` when it reads as a Hub model id (``org/name``, not a local path), else None."""
    if not name or name.count("/") != 1 or name.startswith((".", "/", "~")) or Path(name).exists():
        return None
    return name


_DEV_SET_TASKS = {"STSBenchmark-dev": ("STSBenchmark", "validation"), "SICK-trial": ("SICKRelatedness", "trial")}


def front_matter(name: str, registered_model: str, variant: dict[str, Any], dev_sets: list[str],
                 config: dict[str, Any]) -> str:
    """The card's YAML header (between ``---`` lines): what the Hub indexes and shows."""
    import yaml

    model, data, loss = (config.get(k, {}) for k in ("model", "data", "loss"))
    tags = ["sentence-transformers", "sentence-similarity", "feature-extraction", "mixsp", "mlflow"]
    if loss.get("matryoshka"):
        tags.append("matryoshka")
    tasks = list(dict.fromkeys([*data.get("train_tasks", []), *(_DEV_SET_TASKS.get(d, (d,))[0] for d in dev_sets)]))
    results = []
    for dev_set in dev_sets:
        spearman = variant.get("tasks", {}).get(dev_set, {}).get("spearman")
        if spearman is None:
            continue
        task, split = _DEV_SET_TASKS.get(dev_set, (dev_set, "dev"))
        results.append({
            "task": {"type": "semantic-similarity", "name": "Semantic Similarity"},
            "dataset": {"name": f"{_TASK_LABELS.get(dev_set, dev_set)}", "type": _hub_dataset(task) or task,
                        "split": split},
            "metrics": [{"type": "spearman_cosine", "value": round(float(spearman) / 100, 4),
                         "name": "Spearman (cosine)"}],
        })
    header: dict[str, Any] = {"library_name": "sentence-transformers", "pipeline_tag": "sentence-similarity",
                              "tags": tags}
    base = _hub_model_id(str(model.get("encoder", "")))
    if base:
        header["base_model"] = base
    datasets = [d for d in (_hub_dataset(t) for t in tasks) if d]
    if datasets:
        header["datasets"] = datasets
    header["model-index"] = [{"name": f"{registered_model} ({name})", "results": results}]
    return "---\n" + yaml.safe_dump(header, sort_keys=False, allow_unicode=True) + "---\n"


def _vector_lines(variant: dict[str, Any], model: dict[str, Any], loss: dict[str, Any]) -> list[str]:
    """Width, normalisation, smaller dims and int8 / binary options of the champion's vectors."""
    dims, vector = variant.get("dims") or model.get("output_dim") or "?", variant.get("vector_type", "float32")
    lines = ["## Vectors", "",
             f"- {dims} dimensions, {vector}, {variant.get('bytes_per_vector', '?')} bytes per vector.",
             "- L2-normalised: the cosine similarity of two vectors is their dot product."]
    prefixes = [k for k in loss.get("matryoshka_dims", []) if isinstance(dims, int) and k < dims]
    if loss.get("matryoshka") and prefixes:
        lines.append(f"- Matryoshka-trained prefixes {', '.join(map(str, prefixes))}: "
                     f"`SentenceTransformer(\"data/models/champion\", trust_remote_code=True, truncate_dim={prefixes[0]})` or "
                     f"`mixsp encode --dims {prefixes[0]}` (re-normalised).")
    else:
        lines.append("- Smaller vectors: the pipeline's PCA variants (`data/models/compressed/pca*`, a Dense module "
                     "in sentence-transformers); prefixes were not trained in, the evaluation's dims grid shows "
                     "what each width keeps.")
    lines.append("- int8 / binary vectors: `model.encode(sentences, precision=\"int8\")` (or `\"binary\"`, "
                 "sentence-transformers' `quantize_embeddings`); the pipeline's int8 / binary variants keep "
                 "their calibrated ranges. `mixsp encode --quantize int8` is something else: int8 *weights* "
                 "for faster CPU encoding, float32 vectors.")
    return lines


def _usage_lines(registered_model: str, dims: Any) -> list[str]:
    """How to load the champion with sentence-transformers, MLflow, ONNX and the project's own tools."""
    return [
        "## Usage",
        "",
        "Install the project first (`pip install -e .`): the MixSP head is a module class of `mixsp_core`, "
        "so no `trust_remote_code` is needed.",
        "",
        "### sentence-transformers",
        "",
        "```python",
        "from sentence_transformers import SentenceTransformer",
        "",
        "# trust_remote_code: sentence-transformers 6 asks for it for any module class outside its own package;",
        "# here it imports the installed mixsp_core (the folder holds no code). load_sentence_transformer checks that:",
        "# from mixsp_core.models.st_modules import load_sentence_transformer",
        "model = SentenceTransformer(\"data/models/champion\", trust_remote_code=True)",
        "vectors = model.encode([\"A man is playing a guitar.\", \"Someone plays music.\"])"
        f"  # float32, shape (2, {dims})",
        "print(model.similarity(vectors, vectors))",
        "```",
        "",
        "### MLflow",
        "",
        "```python",
        "import mlflow",
        "",
        "mlflow.set_tracking_uri(\"sqlite:///mlflow.db\")  # the project's store ($MLFLOW_TRACKING_URI)",
        f"model = mlflow.pyfunc.load_model(\"models:/{registered_model}@champion\")",
        f"vectors = model.predict([\"A man is playing a guitar.\", \"Someone plays music.\"])  # float32 [2, {dims}]",
        "```",
        "",
        f"Served: `mlflow models serve -m models:/{registered_model}@champion --env-manager local -p 5001`, then "
        "`curl -X POST 127.0.0.1:5001/invocations -H 'Content-Type: application/json' "
        "-d '{\"inputs\": [\"A man is playing a guitar.\"]}'`.",
        "",
        "### ONNX",
        "",
        "`mixsp export --model data/models/champion --format onnx --out DIR [--int8]` writes `DIR/model.onnx` "
        "(`model_int8.onnx` with int8 weights), the tokenizer and `mixsp_onnx.json`: the whole embedding "
        "function, `input_ids` + `attention_mask` to `sentence_embedding` (the same embeddings within 1e-4).",
        "",
        "```python",
        "from mixsp_core.models.onnx_export import OnnxEmbedder",
        "",
        "vectors = OnnxEmbedder(\"DIR\").encode([\"A man is playing a guitar.\"])  # onnxruntime, no torch",
        "```",
        "",
        "### mixsp",
        "",
        "```python",
        "from mixsp_core.models.checkpoint import load_embedder",
        "",
        "model = load_embedder(\"data/models/champion\")  # safetensors weights, JSON config",
        "vectors = model.encode([\"A man is playing a guitar.\", \"Someone plays music.\"])",
        "```",
        "",
        "or `mixsp encode --model data/models/champion --input sentences.txt --output vectors.npy`. Upload this "
        "folder to the Hub: `mixsp push --model data/models/champion --repo-id USER/NAME`.",
    ]


def build_card(champion: Path, evaluation: dict[str, Any], promotion: dict[str, Any],
               training_run: Path | RunDir | None = None, dims_plot: str | None = None) -> str:
    """The card's markdown, front matter first. ``evaluation``: the evaluate stage's report; ``promotion``:
    the ``registry.Promotion`` as a dict; ``training_run``: the training run directory (``models/student``)."""
    name = promotion.get("model_name") or evaluation.get("best", "")
    registered = promotion.get("registered_model", "mixsp-student")
    variant = evaluation.get("variants", {}).get(name, {})
    meta = _read_json(champion / "config.json")
    config, state = training_record(meta, training_run)
    model, train, data, loss = (config.get(k, {}) for k in ("model", "train", "data", "loss"))
    dims = variant.get("dims") or model.get("output_dim") or "?"
    dev_sets = list(evaluation.get("dev_sets", []))
    lines = [
        front_matter(name, registered, variant, dev_sets, config),
        f"# {registered} version {promotion.get('version', '?')} (champion): `{name}`",
        "",
        f"A {dims}-dimensional sentence embedder trained by the MixSP pipeline. Generated by the promote "
        "stage from the pipeline's own records; do not edit by hand.",
        "",
        "## Dev figures (Spearman x 100; models are selected on these only)",
        "",
        "| dev set | Spearman |",
        "| --- | ---: |",
    ]
    for task in dev_sets:
        spearman = variant.get("tasks", {}).get(task, {}).get("spearman")
        if spearman is not None:
            lines.append(f"| {_TASK_LABELS.get(task, task)} | {spearman:.2f} |")
    if variant.get("dev") is not None:
        lines.append(f"| **mean** | **{variant['dev']:.2f}** |")
    lines += ["", *_vector_lines(variant, model, loss)]
    grid_md = Path(evaluation.get("grid", {}).get("markdown", ""))
    if dims_plot or grid_md.is_file():
        lines += ["", f"## Dev Spearman against dims (grid of `{evaluation.get('grid_model', '')}`)", ""]
        if dims_plot:
            lines += [f"![dev Spearman against dims]({dims_plot})", ""]
        if grid_md.is_file():
            lines.append(grid_md.read_text(encoding="utf-8").strip())
    lines += ["", *_usage_lines(registered, dims)]
    encoder, teacher = model.get("encoder", "?"), data.get("teacher") or "?"
    how = [f"{label} weight {float(loss[name]):g}"
           for name, label in (("distill", "HPD MSE"), ("distill_sim", "similarity MSE")) if loss.get(name)]
    lines += [
        "",
        "## Model",
        "",
        f"- Base model: `{encoder}` ({model.get('kind', '?')} encoder, max {model.get('max_length', '?')} tokens).",
        f"- Head: {model.get('num_projectors', '?')} projector(s), {model.get('routing', '?')} routing, output "
        f"layer to {model.get('output_dim', '?')} dims ({model.get('output_activation', '?')}).",
        f"- Teacher: `{teacher}`; " + (f"distilled ({', '.join(how)})." if how else
                                        "not distilled by this config (distill weights 0)."),
        "",
        "## Training",
        "",
        f"- Data: {', '.join(data.get('train_tasks', [])) or '?'} train pairs; dev sets "
        f"{', '.join(data.get('dev_sets', [])) or '?'}.",
        f"- Losses: {_losses(loss)}.",
        f"- Schedule: {train.get('epochs', '?')} epochs, batch {train.get('batch_size', '?')}, lr "
        f"{train.get('lr', '?')} (head {train.get('head_lr', '?')}), warm-up {train.get('warmup_ratio', '?')}, "
        f"seed {config.get('seed', '?')}.",
    ]
    if state:
        seconds = state.get("train_seconds", 0)
        lines.append(f"- Training time: {seconds / 60:.1f} min ({seconds:.0f} s) for {state.get('step', '?')} "
                     f"steps (best at step {state.get('best_step', '?')}).")
    if meta.get("merge"):
        merge = meta["merge"]
        lines.append(f"- Merged: {merge.get('method', '?')} over {len(merge.get('inputs', []) or [])} checkpoints.")
    lines += [
        "",
        "## Provenance",
        "",
        f"- Registry version {promotion.get('version', '?')} of `{registered}`, previous champion "
        f"{promotion.get('previous_version') or 'none'}"
        + (f" (dev {promotion['previous_dev']:.2f})" if promotion.get("previous_dev") is not None else "") + ".",
        f"- MLflow training run `{promotion.get('run_id', '?')}` (the version's source run, which holds the "
        f"MLflow model); promote run `{promotion.get('promote_run_id') or '?'}`.",
        f"- Source directory: `{variant.get('path', '?')}`.",
    ]
    return "\n".join(lines) + "\n"


def write_card(champion: Path, evaluation: dict[str, Any], promotion: dict[str, Any],
               training_run: Path | RunDir | None = None) -> Path:
    """Write ``README.md`` (and ``dims.png``, the grid plot) into ``champion``; returns the card's path."""
    plot = Path(evaluation.get("grid", {}).get("plot", ""))
    dims_plot = None
    if plot.is_file():
        atomic_write(champion / DIMS_PLOT, lambda tmp: shutil.copyfile(plot, tmp))
        dims_plot = DIMS_PLOT
    text = build_card(champion, evaluation, promotion, training_run, dims_plot)
    return write_text_atomic(champion / CARD_FILE, text)
