"""Start and stop the local UIs (Dagster, MLflow) as background process groups.

Servers are started with ``start_new_session=True`` so each gets its own process group: ``dagster dev``
ignores SIGTERM there, and its children (daemon, code server, webserver) would outlive a kill of the
parent. ``stop`` signals the whole group, SIGINT first.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from mixsp_core.paths import REPO_ROOT

BIN = Path(sys.executable).parent


@dataclass
class Server:
    """A started server: its process (group leader), URL and log file."""

    name: str
    process: subprocess.Popen
    url: str
    log: Path


def _start(name: str, argv: list[str], url: str, log_dir: Path, env: dict[str, str] | None = None) -> Server:
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{name}.log"
    with open(log, "ab") as handle:
        process = subprocess.Popen(argv, cwd=REPO_ROOT, stdout=handle, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})},
                                   start_new_session=True)
    return Server(name, process, url, log)


def start_dagster(dagster_home: Path, port: int = 3000, host: str = "127.0.0.1", daemon: bool = True,
                  log_dir: Path | None = None) -> Server:
    """``dagster dev`` (webserver + daemon, so the schedule and sensor tick) or the webserver alone."""
    dagster_home.mkdir(parents=True, exist_ok=True)
    command = (["dagster", "dev"] if daemon else ["dagster-webserver"])
    argv = [str(BIN / command[0]), *command[1:], "-m", "pipelines.definitions", "-h", host, "-p", str(port)]
    return _start("dagster", argv, f"http://{host}:{port}", log_dir or dagster_home / "logs",
                  env={"DAGSTER_HOME": str(dagster_home)})


def start_mlflow(tracking_uri: str, port: int = 5000, host: str = "127.0.0.1",
                 log_dir: Path | None = None) -> Server:
    """``mlflow server`` on the pipeline's tracking store (SQLite by default)."""
    argv = [str(BIN / "mlflow"), "server", "--backend-store-uri", tracking_uri,
            "--host", host, "--port", str(port), "--workers", "1"]
    return _start("mlflow", argv, f"http://{host}:{port}", log_dir or REPO_ROOT / ".dagster_home" / "logs")


def wait_until_up(server: Server, path: str, timeout: float = 120.0) -> None:
    """Poll ``server.url + path`` until it answers 200; raise with the log's tail if it dies or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"{server.name} exited with {server.process.returncode}; log tail:\n{_tail(server.log)}")
        try:
            with urllib.request.urlopen(server.url + path, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(1.0)
    raise TimeoutError(f"{server.name} did not answer {server.url + path} within {timeout:.0f} s; "
                       f"log tail:\n{_tail(server.log)}")


def stop(server: Server, grace: float = 15.0) -> None:
    """Interrupt the server's process group (``dagster dev`` shuts down on SIGINT, not SIGTERM), then
    SIGTERM and SIGKILL it, each after ``grace`` seconds, while it is still alive."""
    if server.process.poll() is not None:
        return
    group = os.getpgid(server.process.pid)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(group, sig)
        except ProcessLookupError:
            return
        try:
            server.process.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
