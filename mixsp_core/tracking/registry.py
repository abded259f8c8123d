"""MLflow model registry and champion promotion (library side; no Dagster).

Every evaluated model becomes a new version of one registered model (``mixsp-student``): an MLflow model
(:mod:`mixsp_core.tracking.mlflow_model`: a pyfunc with a signature) logged by the run that trained its
weights, so the version's source run is the training run, and its weights are stored once (registering the
same model again reuses the logged model). The version is tagged with its dev mean (``dev/mean``). The
alias ``champion`` moves to the new version only when it beats the current champion's dev mean (strictly);
otherwise the alias stays and the new version is tagged ``challenger``. The champion's checkpoint directory
is copied to ``data/models/champion/`` atomically (written beside it, renamed into place), so a reader
never sees half a model and a failed promotion leaves the previous champion as it was.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mixsp_core.io import write_json_atomic, writing_dir
from mixsp_core.paths import OPTIMIZER_FILE, TRAINER_STATE_FILE

METRIC_TAG = "dev/mean"  # the version's dev mean, exact (repr): compared by the next promotion
LEGACY_METRIC_TAGS = ("dev_primary",)  # what versions registered before the one vocabulary carry
ROLE_TAG = "role"
TRAINING_RUN_TAG = "mixsp.training_run"
MODEL_ID_TAG = "mixsp.model_id"  # the MLflow logged model a version is
CHAMPION_FILE = "champion.json"


@dataclass
class Promotion:
    """The outcome of :func:`register_and_promote`."""

    registered_model: str
    version: str
    dev: float
    promoted: bool  # True: the alias now points at ``version``
    champion_version: str  # the version the alias points at afterwards
    champion_dev: float
    previous_version: str | None
    previous_dev: float | None
    run_id: str  # the MLflow run the version's model belongs to: the training run (the version's source run)
    model_name: str  # the evaluated variant (student, merged, compressed/pca128, ...)
    promote_run_id: str = ""  # the promote stage's own MLflow run (nested in the pipeline run)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        verdict = ("promoted to champion" if self.promoted else
                   f"tagged challenger (champion stays version {self.champion_version}, dev {self.champion_dev:.2f})")
        return f"{self.registered_model} version {self.version} ({self.model_name}, dev {self.dev:.2f}): {verdict}"


def ensure_experiment(client, name: str, artifact_location: str | None = None) -> str:
    """The experiment id of ``name``, created (with ``artifact_location`` when given) if missing."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    return client.create_experiment(name, artifact_location=artifact_location)


def current_champion(client, registered_model: str, alias: str = "champion") -> tuple[str, float] | None:
    """``(version, dev mean)`` the alias points at; None when there is no champion yet."""
    from mlflow.exceptions import MlflowException

    try:
        version = client.get_model_version_by_alias(registered_model, alias)
    except MlflowException:
        return None  # no registered model, or no alias yet
    metric = next((version.tags[t] for t in (METRIC_TAG, *LEGACY_METRIC_TAGS) if t in version.tags), None)
    return str(version.version), float(metric) if metric is not None else float("-inf")


def register_version(client, registered_model: str, run_id: str, model_dir: Path, dev: float,
                     tags: dict[str, str] | None = None, model_name: str = "model") -> str:
    """Log ``model_dir`` as the MLflow model ``model_name`` of run ``run_id`` (the run that trained it; a
    model of that run with the same files is reused) and register it as a new version whose source run is
    ``run_id``; returns the version."""
    from mlflow.exceptions import MlflowException

    from mixsp_core.tracking.mlflow_model import log_embedder_model

    model_id = log_embedder_model(client, run_id, Path(model_dir), model_name)
    try:
        client.create_registered_model(registered_model, description="MixSP sentence-embedding student; "
                                       "alias 'champion' = best dev mean so far")
    except MlflowException as err:
        if "RESOURCE_ALREADY_EXISTS" not in str(err.error_code):
            raise
    # The logged model's own location as the source: a "models:/<id>" source makes MLflow's SQL registry
    # look the model up in the *global* tracking store, not this client's (and it keeps no model id: the
    # tag mixsp.model_id does).
    source = client.get_logged_model(model_id).artifact_location
    version = client.create_model_version(registered_model, source=source, run_id=run_id, model_id=model_id,
                                          tags={METRIC_TAG: repr(float(dev)), TRAINING_RUN_TAG: run_id,
                                                MODEL_ID_TAG: model_id, **(tags or {})})
    return str(version.version)


def copy_champion(model_dir: Path, target: Path, record: dict[str, Any]) -> Path:
    """Copy checkpoint ``model_dir`` to ``target`` atomically, with ``champion.json`` (``record``) inside."""
    with writing_dir(target) as work:
        shutil.copytree(model_dir, work, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns(TRAINER_STATE_FILE, OPTIMIZER_FILE))
        write_json_atomic(work / CHAMPION_FILE, record, default=str)
    return target


def register_and_promote(client, registered_model: str, run_id: str, model_dir: Path, dev: float,
                         champion_dir: Path, alias: str = "champion", model_name: str = "",
                         tags: dict[str, str] | None = None, promote_run_id: str = "") -> Promotion:
    """Register ``model_dir`` (dev mean ``dev``) as a new version whose model belongs to run ``run_id``
    (the training run behind it); move ``alias`` to it and copy it to ``champion_dir`` only when it beats
    the current champion's dev mean, else tag it challenger.

    ``client`` is an ``mlflow.MlflowClient`` whose registry is the tracking store.
    """
    previous = current_champion(client, registered_model, alias)
    version = register_version(client, registered_model, run_id, model_dir, dev,
                               tags={"model_name": model_name, **(tags or {})}, model_name=model_name or "model")
    promoted = previous is None or dev > previous[1]
    if promoted:
        client.set_registered_model_alias(registered_model, alias, version)
        client.set_model_version_tag(registered_model, version, ROLE_TAG, alias)
        if previous is not None:
            client.set_model_version_tag(registered_model, previous[0], ROLE_TAG, f"former-{alias}")
        champion = (version, dev)
    else:
        client.set_model_version_tag(registered_model, version, ROLE_TAG, "challenger")
        client.set_model_version_tag(registered_model, version, "challenger", "true")
        champion = previous
    result = Promotion(registered_model, version, dev, promoted, champion[0], champion[1],
                       previous[0] if previous else None, previous[1] if previous else None, run_id, model_name,
                       promote_run_id)
    if promoted:
        copy_champion(model_dir, champion_dir, {**result.to_dict(), "source": str(model_dir)})
    return result
