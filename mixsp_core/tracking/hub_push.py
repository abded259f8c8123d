"""`mixsp push`: upload a model folder (the champion, with its model card) to the Hugging Face Hub.

:func:`plan_push` decides what would be uploaded (the folder's model files and card, never run state,
hidden files or caches) and checks the repo id, without the network; :func:`push_model` uploads that plan
with ``huggingface_hub`` (``create_repo`` + one ``upload_folder`` commit). Offline (``HF_HUB_OFFLINE=1``,
or the Hub unreachable) it raises :class:`HubOfflineError` and uploads nothing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from mixsp_core.errors import CheckpointError, ConfigError, MixSPError

CARD_FILE = "README.md"
# what a model folder may hold that is not the model: run state, caches, editor and OS files
SKIPPED_NAMES = frozenset({"trainer_state.json", "optimizer.safetensors", "__pycache__", ".DS_Store"})
_TRUE = ("1", "true", "yes", "on")
_NETWORK_MODULES = ("httpx2", "httpx", "httpcore", "requests", "urllib3")  # their errors: no connection


class HubOfflineError(MixSPError):
    """The Hub cannot be reached (offline mode, or no network): nothing was uploaded."""


@dataclass(frozen=True)
class PushPlan:
    """What :func:`push_model` uploads: ``files`` (paths relative to ``folder``, sorted) to ``repo_id``."""

    repo_id: str
    folder: Path
    files: list[str] = field(default_factory=list)

    def summary(self) -> str:
        size = sum((self.folder / f).stat().st_size for f in self.files)
        return f"{len(self.files)} files ({size / 1e6:.1f} MB) from {self.folder} -> https://huggingface.co/{self.repo_id}"


def plan_push(model_dir: str | os.PathLike[str], repo_id: str) -> PushPlan:
    """The upload plan of ``model_dir`` to Hub model repo ``repo_id`` (``user/name``). Raises ConfigError
    for a malformed repo id and CheckpointError for a folder that is missing or holds no model card or
    ``config.json``."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ConfigError("--repo-id", f"{repo_id!r} is not a Hub repo id (user/name): {err}") from err
    if "/" not in repo_id:
        raise ConfigError("--repo-id", f"{repo_id!r}: give the owner too, as user/name or org/name")
    folder = Path(model_dir).expanduser().resolve()
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such model folder")
    for needed in ("config.json", CARD_FILE):
        if not (folder / needed).is_file():
            raise CheckpointError(f"{folder / needed}: missing; push a folder the pipeline wrote "
                                  "(data/models/champion has its model card)")
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                   if p.is_file() and not _skipped(p.relative_to(folder)))
    return PushPlan(repo_id, folder, files)


def _skipped(relative: Path) -> bool:
    return any(part in SKIPPED_NAMES or part.startswith(".") for part in relative.parts)


def hub_offline() -> bool:
    """True when huggingface_hub is told to stay offline (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``)."""
    return any(os.environ.get(name, "").strip().lower() in _TRUE for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def push_model(plan: PushPlan, token: str | None = None, private: bool = False, api=None) -> str:
    """Upload ``plan`` in one commit (the repo created when missing); returns the commit's URL.
    ``api``: an ``huggingface_hub.HfApi`` (tests pass a stand-in). Raises HubOfflineError when offline or
    the Hub cannot be reached, MixSPError when the Hub refuses (token, permissions)."""
    if hub_offline():
        raise HubOfflineError("HF_HUB_OFFLINE is set: the Hub is not reachable from here, nothing uploaded; "
                              "unset it (and check the network) to push")
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    from huggingface_hub.errors import HfHubHTTPError

    try:
        api.create_repo(plan.repo_id, repo_type="model", exist_ok=True, private=private)
        commit = api.upload_folder(repo_id=plan.repo_id, folder_path=str(plan.folder), repo_type="model",
                                   allow_patterns=plan.files, commit_message="Upload MixSP model (mixsp push)")
    except HfHubHTTPError as err:  # the Hub answered: a bad token, no write access, ...
        raise MixSPError(f"the Hub refused the upload to {plan.repo_id}: {err}") from err
    except Exception as err:
        if isinstance(err, OSError) or type(err).__module__.split(".")[0] in _NETWORK_MODULES:
            raise HubOfflineError(f"the Hub is not reachable ({type(err).__name__}: {err}); nothing uploaded") from err
        raise
    return str(getattr(commit, "commit_url", None) or commit)
