"""DVC history: pin a run's outputs (``dvc commit``), keep them (``dvc push``), and bring an earlier run back.

A pipeline run's outputs are DVC outputs of dvc.yaml's stages; dvc.lock holds their hashes. After a run,
:func:`commit_outputs` puts them in the cache and the lock, :func:`push_outputs` copies them to the DVC
remote, and the lock (with params.yaml) is logged to the run's MLflow training run under
:data:`ARTIFACT_DIR` (pipelines/dvc_sync.py). :func:`restore_run` brings an earlier run's outputs back from a
git commit whose dvc.lock is in history, an MLflow run id, or a Dagster run id: it writes that dvc.lock
(and params.yaml) into the repository and runs ``dvc checkout``, pulling from the remote what the local
cache lacks. ``mixsp restore REF`` is its command.

The remote is DVC's default remote (.dvc/config: ``local`` -> ``../../mixsp-dvc-remote``, a folder beside
the repository, which the first push creates); ``$MIXSP_DVC_REMOTE`` names another configured remote,
or ``none`` to skip pushing. Everything here shells out to the ``dvc`` and ``git`` executables (DVC is a
pipeline dependency, not a library one) and imports MLflow only to read a run's lock.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mixsp_core.errors import HistoryError
from mixsp_core.io import FILE_MODE, file_digest, sha256_text, share_tree, write_text_atomic
from mixsp_core.paths import REPO_ROOT, PipelinePaths

LOCK_FILE = "dvc.lock"
PARAMS_FILE = "params.yaml"
ARTIFACT_DIR = "dvc"  # MLflow artifact folder of a training run: dvc/dvc.lock, dvc/params.yaml
REMOTE_ENV = "MIXSP_DVC_REMOTE"
NO_REMOTE = frozenset({"none", "off", "0", "false"})
TAG_PREFIX = "dvc."  # MLflow tag of one output's hash: dvc.<stage>.<path>
DVC_TIMEOUT_S = 3600  # hashing and copying a run's outputs (a few GB) on a slow disk
_MLFLOW_RUN_ID = re.compile(r"^[0-9a-f]{32}$")
_DAGSTER_RUN_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


# -- running dvc and git ---------------------------------------------------------------------------

def _executable(name: str) -> str:
    """``name`` from this interpreter's environment (the project's venv) when there, else from PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else name


def _environment() -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "DVC_NO_ANALYTICS": "1"}


def _run(argv: list[str], repo: Path, check: bool, timeout: float) -> subprocess.CompletedProcess:
    try:
        done = subprocess.run(argv, cwd=repo, env=_environment(), capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except FileNotFoundError as err:
        raise HistoryError(f"`{argv[0]}` not found: install the pipeline extra (pip install -e '.[pipeline]')") from err
    except subprocess.TimeoutExpired as err:
        raise HistoryError(f"`{' '.join(argv[:2])}` in {repo} took longer than {timeout:.0f} s") from err
    if check and done.returncode != 0:
        message = (done.stderr or done.stdout).strip()
        raise HistoryError(f"`{Path(argv[0]).name} {' '.join(argv[1:])}` failed in {repo}: {message}")
    return done


def dvc(repo: Path, *args: str, check: bool = True, timeout: float = DVC_TIMEOUT_S) -> subprocess.CompletedProcess:
    """``dvc ARGS`` in ``repo`` (the venv's dvc; no prompts: stdin is empty). A failure with ``check``
    raises :class:`HistoryError` with DVC's message."""
    return _run([_executable("dvc"), *args], Path(repo), check, timeout)


def git(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """``git ARGS`` in ``repo``; a failure with ``check`` raises :class:`HistoryError`."""
    return _run(["git", *args], Path(repo), check, timeout=120)


# -- after a run: commit and push ------------------------------------------------------------------

def commit_outputs(repo: Path = REPO_ROOT) -> str:
    """``dvc commit -f``: every stage's outputs into the cache and their hashes into dvc.lock, as if ``dvc
    repro`` had made them. Returns ``dvc status`` afterwards ('' when clean)."""
    dvc(repo, "commit", "-f")
    status = dvc(repo, "status").stdout.strip()
    return "" if status.startswith("Data and pipelines are up to date") else status


@dataclass(frozen=True)
class Remote:
    name: str
    url: str  # as ``dvc remote list`` shows it: local paths absolute


def configured_remote(repo: Path = REPO_ROOT) -> Remote | None:
    """The remote pushes go to: ``$MIXSP_DVC_REMOTE`` (a configured remote's name; ``none`` turns pushing
    off), else DVC's default remote; None when pushing is off or no remote is configured. A name that is not
    configured raises :class:`HistoryError`."""
    wanted = os.environ.get(REMOTE_ENV, "").strip()
    if wanted.lower() in NO_REMOTE:
        return None
    remotes = {}
    for line in dvc(repo, "remote", "list").stdout.splitlines():  # NAME <whitespace> URL [(default)]
        parts = line.strip().split(maxsplit=1)
        if len(parts) == 2:
            remotes[parts[0]] = parts[1].removesuffix("(default)").strip()
    name = wanted or dvc(repo, "remote", "default", check=False).stdout.strip()
    if not name:
        return None
    if name not in remotes:
        chosen = f"{REMOTE_ENV}={name!r}" if wanted else f"the default remote {name!r}"
        raise HistoryError(f"{chosen} is not a DVC remote of {repo} (configured: {', '.join(remotes) or 'none'}); "
                           f"add it with `dvc remote add {name} URL`")
    return Remote(name, remotes[name])


def push_outputs(remote: Remote, repo: Path = REPO_ROOT) -> str:
    """``dvc push -r NAME``: the cached outputs of dvc.lock to ``remote`` (a local folder is created on the
    first push). Returns DVC's summary line, e.g. ``12 files pushed``."""
    out = dvc(repo, "push", "-r", remote.name).stdout.strip().splitlines()
    return out[-1] if out else "pushed"


def lock_outputs(lock_text: str) -> dict[str, dict[str, str]]:
    """``{stage: {path: md5}}`` of every output in the text of a dvc.lock."""
    data: dict[str, Any] = yaml.safe_load(lock_text) or {}
    return {stage: {str(out["path"]): str(out.get("md5", "")) for out in entry.get("outs") or []}
            for stage, entry in (data.get("stages") or {}).items()}


def lock_tags(lock_text: str) -> dict[str, str]:
    """The MLflow tags of a dvc.lock: ``dvc.<stage>.<path>`` -> md5 of each output, and ``dvc.lock_sha256``."""
    tags = {f"{TAG_PREFIX}{stage}.{path}": md5 for stage, outs in lock_outputs(lock_text).items()
            for path, md5 in outs.items()}
    tags[f"{TAG_PREFIX}lock_sha256"] = sha256_text(lock_text)
    return tags


def uncommitted_files(repo: Path = REPO_ROOT, paths: tuple[str, ...] = (LOCK_FILE, PARAMS_FILE)) -> list[str]:
    """Which of ``paths`` differ from git's HEAD (or are untracked); [] outside a git repository."""
    done = git(repo, "status", "--porcelain", "--", *paths, check=False)
    if done.returncode != 0:
        return []
    return [line[3:].strip() for line in done.stdout.splitlines() if line.strip()]


# -- bringing a run back ---------------------------------------------------------------------------

@dataclass(frozen=True)
class RecordedLock:
    """A dvc.lock (and the params.yaml it ran with, when recorded) found in history."""

    source: str  # e.g. "git commit 1a2b3c4", "MLflow run 0123... (train)"
    lock_text: str
    params_text: str | None = None


def lock_at_commit(ref: str, repo: Path = REPO_ROOT) -> RecordedLock | None:
    """dvc.lock and params.yaml of git revision ``ref``; None when ``ref`` is not a commit. A commit without
    a dvc.lock raises :class:`HistoryError`."""
    found = git(repo, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}", check=False)
    if found.returncode != 0:
        return None
    commit = found.stdout.strip()
    lock = git(repo, "show", f"{commit}:{LOCK_FILE}", check=False)
    if lock.returncode != 0:
        raise HistoryError(f"git commit {commit[:12]} ({ref}) has no {LOCK_FILE}: no run was committed there")
    params = git(repo, "show", f"{commit}:{PARAMS_FILE}", check=False)
    return RecordedLock(f"git commit {commit[:12]}", lock.stdout, params.stdout if params.returncode == 0 else None)


def lock_from_mlflow(ref: str, tracking_uri: str) -> RecordedLock | None:
    """The dvc.lock logged under ``dvc/`` by the training run that ``ref`` names: an MLflow run id (the
    training run, or any run of the same pipeline run: parent, evaluate, promote) or a Dagster run id.
    None when ``ref`` names no run in the store; a run without a logged lock raises :class:`HistoryError`."""
    if not (_MLFLOW_RUN_ID.match(ref) or _DAGSTER_RUN_ID.match(ref)):
        return None
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=tracking_uri)
    dagster_run = ref if _DAGSTER_RUN_ID.match(ref) else None
    candidates = []
    if _MLFLOW_RUN_ID.match(ref):
        try:
            run = client.get_run(ref)
        except MlflowException:
            return None
        candidates.append(run)
        dagster_run = run.data.tags.get("dagster.run_id")
    if dagster_run:
        experiments = [e.experiment_id for e in client.search_experiments()]
        candidates += client.search_runs(experiments, filter_string=f"tags.`dagster.run_id` = '{dagster_run}' "
                                                                    "and tags.`mixsp.stage` = 'train'")
    if not candidates:
        return None
    for run in candidates:
        texts = _download_texts(client, run.info.run_id)
        if LOCK_FILE in texts:
            stage = run.data.tags.get("mixsp.stage", "run")
            return RecordedLock(f"MLflow run {run.info.run_id} ({stage})", texts[LOCK_FILE], texts.get(PARAMS_FILE))
    raise HistoryError(f"MLflow run {ref}: no {ARTIFACT_DIR}/{LOCK_FILE} logged on it or on its pipeline run's "
                       f"training run (store {tracking_uri}); was the run synced (make run, or the dvc_sync job)?")


def _download_texts(client: Any, run_id: str) -> dict[str, str]:
    """The files of run ``run_id``'s ``dvc/`` artifact folder, by name ({} when it has none)."""
    names = [Path(a.path).name for a in client.list_artifacts(run_id, ARTIFACT_DIR)]
    wanted = [n for n in (LOCK_FILE, PARAMS_FILE) if n in names]
    texts = {}
    with tempfile.TemporaryDirectory(prefix="mixsp-restore-") as scratch:
        for name in wanted:
            local = client.download_artifacts(run_id, f"{ARTIFACT_DIR}/{name}", scratch)
            texts[name] = Path(local).read_text(encoding="utf-8")
    return texts


def find_recorded_lock(ref: str, repo: Path = REPO_ROOT, tracking_uri: str | None = None) -> RecordedLock:
    """The dvc.lock ``ref`` names: a git commit first, then an MLflow or Dagster run id in ``tracking_uri``
    (default: :func:`mixsp_core.tracking.tracker.tracking_uri`). Raises :class:`HistoryError` when neither."""
    from mixsp_core.tracking.tracker import tracking_uri as default_uri

    recorded = lock_at_commit(ref, repo)
    if recorded is not None:
        return recorded
    uri = tracking_uri or default_uri()
    recorded = lock_from_mlflow(ref, uri)
    if recorded is None:
        raise HistoryError(f"{ref!r} is neither a git commit of {repo} nor an MLflow / Dagster run id in {uri}")
    return recorded


def tree_sha256(path: Path) -> str:
    """One sha256 for a file or a directory's content: over each file's relative path and sha256, in path
    order (what "bit-identical" is checked by)."""
    path = Path(path)
    if path.is_file():
        return file_digest(path, "sha256")
    lines = [f"{p.relative_to(path).as_posix()} {file_digest(p, 'sha256')}\n"
             for p in sorted(path.rglob("*")) if p.is_file()]
    return sha256_text("".join(lines))


@dataclass
class RestoreResult:
    source: str
    outputs: dict[str, str]  # path -> md5 of every output restored
    pulled: bool  # the local cache lacked some: fetched from the remote
    champion: Path
    champion_sha256: str | None
    params_restored: bool
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        origin = "pulled from the remote" if self.pulled else "from the local cache"
        lines = [f"restored {len(self.outputs)} DVC outputs of {self.source} ({origin})"]
        lines += [f"  {path}  md5 {md5}" for path, md5 in self.outputs.items()]
        if self.champion_sha256:
            lines.append(f"champion {self.champion}: sha256 {self.champion_sha256}")
        written = "dvc.lock and params.yaml" if self.params_restored else "dvc.lock"
        lines.append(f"{written} now describe that run (`git diff` shows it); back to HEAD's run: "
                     f"git checkout -- {written.replace(' and ', ' ')} && dvc checkout")
        return "\n".join(lines + self.notes)


def unsaved_outputs(repo: Path = REPO_ROOT) -> list[str]:
    """Outputs in the workspace that differ from dvc.lock (``dvc status``: modified), which a checkout would
    overwrite and the cache does not hold."""
    done = dvc(repo, "status", "--json", check=False)
    try:
        status = json.loads(done.stdout or "{}")
    except ValueError:
        return []
    found = []
    for changes in status.values() if isinstance(status, dict) else []:
        for change in changes if isinstance(changes, list) else []:
            outs = change.get("changed outs", {}) if isinstance(change, dict) else {}
            found += [path for path, state in outs.items() if state == "modified"]
    return found


def dvc_root(path: Path) -> Path:
    """The DVC repository ``path`` is in (the nearest folder up holding ``.dvc/``); raises
    :class:`HistoryError` when there is none."""
    path = Path(path).resolve()
    for folder in (path, *path.parents):
        if (folder / ".dvc").is_dir():
            return folder
    raise HistoryError(f"{path} is not inside a DVC repository (no .dvc/ folder above it)")


def restore_run(ref: str, repo: Path = REPO_ROOT, tracking_uri: str | None = None, pull: bool = True,
                force: bool = False) -> RestoreResult:
    """Bring back the outputs of the run ``ref`` names (see :func:`find_recorded_lock`): its dvc.lock (and
    params.yaml, when recorded) are written into ``repo`` and ``dvc checkout`` restores every cached output;
    with ``pull``, what the local cache lacks is fetched from the remote (``dvc pull``). The outputs in place
    are committed to the local cache first, so none is lost; outputs that differ from the current lock (edited
    by hand, not committed) are refused unless ``force``, which discards them.
    On failure the previous dvc.lock and params.yaml are put back and :class:`HistoryError` says why."""
    repo = dvc_root(repo)
    recorded = find_recorded_lock(ref, repo, tracking_uri)
    if not force:
        unsaved = unsaved_outputs(repo)
        if unsaved:
            raise HistoryError(f"{', '.join(unsaved)} in {repo} differ from dvc.lock and are in no cache: "
                               "`dvc commit` them first (make run does), or restore with --force to discard them")
    previous = {name: (repo / name).read_text(encoding="utf-8") if (repo / name).is_file() else None
                for name in (LOCK_FILE, PARAMS_FILE)}
    if not force:
        # The outputs in place match the current lock: make sure the local cache holds them (it may have been
        # pruned), so the checkout can replace them and a restore of the current run can bring them back.
        dvc(repo, "commit", "-f", check=False)
    write_text_atomic(repo / LOCK_FILE, recorded.lock_text)
    if recorded.params_text is not None:
        write_text_atomic(repo / PARAMS_FILE, recorded.params_text)
    pulled = False
    try:
        checkout = ["checkout", *(["--force"] if force else [])]
        if dvc(repo, *checkout, check=not pull).returncode != 0:
            dvc(repo, "pull", *(["--force"] if force else []))
            pulled = True
    except HistoryError as err:
        for name, text in previous.items():
            if text is not None:
                write_text_atomic(repo / name, text)
        raise HistoryError(f"could not restore {recorded.source}: {err}; dvc.lock and params.yaml are back as they "
                           "were (run `dvc checkout` to put their outputs back too)") from err
    outputs = {path: md5 for outs in lock_outputs(recorded.lock_text).values() for path, md5 in outs.items()}
    for path in outputs:  # DVC's checkout copies honour the umask: artifacts are shared, 0644 / 0755
        if (repo / path).is_dir():
            share_tree(repo / path)
        elif (repo / path).is_file():
            os.chmod(repo / path, FILE_MODE)
    champion = PipelinePaths(repo / "data").champion
    return RestoreResult(recorded.source, outputs, pulled, champion,
                         tree_sha256(champion) if champion.exists() else None, recorded.params_text is not None)
