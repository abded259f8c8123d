"""The MLflow model of a MixSP embedder: a pyfunc that wraps the project's own loader.

A model directory the pipeline wrote (the student's ``best/``, a compressed variant, the merged model, the
champion) is logged as an MLflow *logged model* of the training run that made its weights:

* flavour ``python_function``, the model given as code (:mod:`mixsp_core.tracking.mlflow_model_code`
  calls ``set_model(EmbedderModel())``), so loading runs this module and unpickles nothing;
* the model directory as the artifact ``model``, loaded with
  :func:`mixsp_core.models.checkpoint.load_embedder` (whatever layout the checkpoint has);
* signature: a string column (a list of sentences) -> float32 tensor ``[n, d]``, plus an input example.

Then ``mlflow.pyfunc.load_model("models:/mixsp-student@champion").predict([...])`` returns the
embeddings and ``mlflow models serve -m models:/mixsp-student@champion --env-manager local`` answers
``POST /invocations`` with ``{"inputs": ["sentence", ...]}``. Loading needs the project installed
(``pip install -e .``): the model's code is this module.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd

from mixsp_core.io import sha256_file, sha256_text

MODEL_ARTIFACT = "model"  # the key of the model directory in the pyfunc's artifacts
CODE_FILE = Path(__file__).with_name("mlflow_model_code.py")
INPUT_EXAMPLE = ["A man is playing a guitar.", "Someone is playing music."]
DIGEST_TAG = "mixsp.weights_sha256"
MODEL_NAME_TAG = "mixsp.model_name"
# what the model needs at load time; pinned to the versions it was logged with
REQUIREMENTS = ("mixsp-pipeline", "mlflow", "torch", "transformers", "safetensors", "numpy", "pandas")
# files of a run directory that are not part of a model (copy_champion leaves them out too)
NOT_MODEL_FILES = ("trainer_state.json", "optimizer.safetensors")


class EmbedderModel(mlflow.pyfunc.PythonModel):
    """Sentences in, L2-normalised float32 embeddings ``[n, d]`` out (a compressed variant: its saved
    transform applied, vectors in similarity space)."""

    batch_size = 64

    def load_context(self, context) -> None:
        from mixsp_core.models.checkpoint import load_embedder

        self.embedder = load_embedder(context.artifacts[MODEL_ARTIFACT])

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> np.ndarray:
        """``model_input``: under the string-column signature MLflow hands a list of sentences over as a
        one-column frame (:func:`sentences_from` takes lists and arrays too)."""
        sentences = sentences_from(model_input)
        if not sentences:
            return np.zeros((0, 0), dtype=np.float32)
        vectors = self.embedder.encode(sentences, batch_size=self.batch_size, show_progress=False)
        return np.asarray(vectors, dtype=np.float32)


def sentences_from(model_input: Any) -> list[str]:
    """The sentences of what a pyfunc caller passes: a list / tuple / array of strings, one string, a
    pandas Series or a one-column DataFrame (what MLflow makes of a string-column signature).
    Raises ValueError for anything else, naming what it got."""
    if isinstance(model_input, str):
        return [model_input]
    if isinstance(model_input, pd.DataFrame):
        if model_input.shape[1] != 1:
            raise ValueError(f"expected one column of sentences, got columns {list(model_input.columns)}")
        model_input = model_input.iloc[:, 0]
    if isinstance(model_input, (pd.Series, np.ndarray)):
        model_input = model_input.tolist()
    if isinstance(model_input, Sequence) and all(isinstance(s, str) for s in model_input):
        return list(model_input)
    raise ValueError(f"expected a list of sentences (strings), got {type(model_input).__name__}")


def embedding_signature(dim: int):
    """Input: a string column (a list of sentences); output: a float32 tensor ``[n, dim]``."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, Schema, TensorSpec

    return ModelSignature(inputs=Schema([ColSpec(DataType.string)]),
                          outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, dim))]))


def pip_requirements() -> list[str]:
    """:data:`REQUIREMENTS` pinned to the installed versions (a missing one unpinned)."""
    pinned = []
    for name in REQUIREMENTS:
        try:
            pinned.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pinned.append(name)
    return pinned


def model_files(model_dir: Path) -> list[Path]:
    """The files of ``model_dir`` that make the model (run-state files left out), sorted."""
    return sorted(p for p in model_dir.rglob("*") if p.is_file() and p.name not in NOT_MODEL_FILES
                  and "__pycache__" not in p.parts)


def model_digest(model_dir: Path) -> str:
    """sha256 over the model's files (relative path and content): equal digests, equal models."""
    lines = [f"{p.relative_to(model_dir).as_posix()} {sha256_file(p)}" for p in model_files(model_dir)]
    return sha256_text("\n".join(lines))


def output_width(model_dir: Path) -> int:
    """The embedding width of ``model_dir``: the length of an encoded sentence."""
    from mixsp_core.models.checkpoint import load_embedder

    vectors = load_embedder(model_dir, device="cpu").encode(INPUT_EXAMPLE[:1], batch_size=1, show_progress=False)
    return int(np.asarray(vectors).shape[1])


def find_logged_model(client, run_id: str, digest: str) -> str | None:
    """The id of a logged model of run ``run_id`` with these weights (:func:`model_digest`), else None."""
    run = client.get_run(run_id)
    found = client.search_logged_models(
        [run.info.experiment_id],
        filter_string=f"source_run_id = '{run_id}' AND tags.`{DIGEST_TAG}` = '{digest}'")
    ready = [m for m in found if str(m.status) in ("READY", "LoggedModelStatus.READY")]
    return ready[0].model_id if ready else None


def log_embedder_model(client, run_id: str, model_dir: Path, name: str = "model",
                       tags: dict[str, str] | None = None) -> str:
    """Log ``model_dir`` as an MLflow model (see the module doc) of run ``run_id``; returns its model id.

    Weights are stored once per run: a model of the same run with the same files (:func:`model_digest`) is
    reused, not uploaded again. ``client``: an ``MlflowClient`` of the store ``run_id`` lives in.
    """
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus
    from mlflow.models import Model

    model_dir = Path(model_dir)
    digest = model_digest(model_dir)
    existing = find_logged_model(client, run_id, digest)
    if existing is not None:
        return existing
    run = client.get_run(run_id)
    logged = client.create_logged_model(run.info.experiment_id, name=_logged_name(name), source_run_id=run_id,
                                        tags={DIGEST_TAG: digest, MODEL_NAME_TAG: name, **(tags or {})})
    try:
        with tempfile.TemporaryDirectory(prefix="mixsp-mlflow-model-") as tmp:
            local = Path(tmp) / "model"
            with tempfile.TemporaryDirectory(prefix="mixsp-model-files-") as files:
                staged = _stage_model_files(model_dir, Path(files) / MODEL_ARTIFACT)  # artifacts/model/
                mlflow.pyfunc.save_model(
                    path=str(local), python_model=str(CODE_FILE), artifacts={MODEL_ARTIFACT: str(staged)},
                    signature=embedding_signature(output_width(model_dir)), input_example=INPUT_EXAMPLE,
                    pip_requirements=pip_requirements(),
                    mlflow_model=Model(artifact_path=logged.artifact_location, model_uuid=logged.model_id,
                                       run_id=run_id, model_id=logged.model_id))
            client.log_model_artifacts(logged.model_id, str(local))
        client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
        client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    except BaseException:
        client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
        raise
    return logged.model_id


def _logged_name(name: str) -> str:
    """A logged model's name from a variant name (``compressed/pca128`` -> ``compressed-pca128``)."""
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name) or "model"


def _stage_model_files(model_dir: Path, target: Path) -> Path:
    """Hard links (copies across file systems) of :func:`model_files` under ``target``: what the MLflow
    model holds, without run-state files, written to no place the pipeline reads."""
    import os
    import shutil

    for path in model_files(model_dir):
        dest = target / path.relative_to(model_dir)
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, dest)
        except OSError:
            shutil.copy2(path, dest)
    return target
