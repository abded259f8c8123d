"""Screenshots of the Dagster and MLflow UIs after `make run`, taken with headless Chromium.

    .venv/bin/python scripts/screenshots.py [--out docs/screenshots] [--wait 10]

Starts the Dagster webserver (no daemon, so no schedule or sensor can launch a run while we look) and
the MLflow server on free localhost ports, over the same stores as the Makefile (``$DAGSTER_HOME``,
``$MLFLOW_TRACKING_URI``), waits until both answer, photographs the pages below and stops both process
groups. Chromium (Debian's ``chromium`` package) is driven over the DevTools protocol on a pipe
(``--remote-debugging-pipe``), so no websocket library is needed and first-visit panels can be closed
before the picture is taken.
"""

from __future__ import annotations

import argparse
import base64
import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from mixsp_core.paths import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT))  # `python scripts/screenshots.py` puts scripts/, not the root, on the path
from mixsp_core.tracking.tracker import tracking_uri  # noqa: E402
from pipelines.run import ensure_dagster_home  # noqa: E402
from pipelines.servers import Server, start_dagster, start_mlflow, stop, wait_until_up  # noqa: E402

JOB = "mixsp_full"
EXPERIMENT = "mixsp"
# What the Makefile exports for `make ui`, so the code location loads as it does there.
MAKEFILE_ENV = {"MLFLOW_TRACKING_URI": f"sqlite:///{REPO_ROOT / 'mlflow.db'}", "HF_HUB_OFFLINE": "1",
                "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false", "MIXSP_PREFER_PACKAGED": "1",
                "MIXSP_SHARED_DIR": str((REPO_ROOT.parent / "shared").resolve()), "GIT_PYTHON_REFRESH": "quiet"}

# The centre of the button whose text is, or whose icon's aria-label starts with, the given string, else of
# the input whose placeholder starts with it, else of the innermost element whose whole text is that string
# (section headers); null when there is none.
FIND = """((label) => {
  const b = [...document.querySelectorAll('button')].find(e => e.textContent.trim() === label
    || (e.getAttribute('aria-label') || '') === label
    || [...e.querySelectorAll('[aria-label]')].some(i => i.getAttribute('aria-label').startsWith(label)))
    || [...document.querySelectorAll('input')].find(e => (e.placeholder || '').startsWith(label))
    || [...document.querySelectorAll('body *')].filter(e => e.textContent.trim() === label).pop();
  if (!b) return null;
  const r = b.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })(%s)"""


def click(label: str, optional: bool = False) -> tuple[str, str, str]:
    """Page step: click what ``label`` names (see FIND) with real mouse events, because some widgets
    ignore a synthetic element.click(); skipped when absent, with a warning unless ``optional``."""
    return ("click", label, "optional" if optional else "")


def type_into(label: str, text: str) -> tuple[str, str, str]:
    """Page step: click the field ``label`` names (its placeholder, found like FIND), then type ``text``."""
    return ("type", label, text)


def alt_key(code: str) -> tuple[str, str, str]:
    """Page step: press Alt plus the key with this DOM code (``"KeyE"``)."""
    return ("alt", code, "")


@dataclass(frozen=True)
class Page:
    """One screenshot: file name, URL, the steps taken once it has loaded (click, type_into, alt_key)
    and the window size."""

    name: str
    url: str
    steps: tuple[tuple[str, str, str], ...] = ()
    height: int = 1000
    width: int = 1600


def free_port() -> int:
    """A TCP port nothing listens on now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Chromium:
    """Headless Chromium spoken to over the DevTools protocol on fds 3 (commands) and 4 (replies);
    messages are JSON separated by NUL bytes."""

    def __init__(self, binary: str) -> None:
        self.profile = tempfile.mkdtemp(prefix="mixsp-chromium-")
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()

        def _fds() -> None:
            # Chromium expects its ends as fds 3 and 4. Copy both above 10 first so neither dup2 can
            # overwrite the other's source; dup2 makes the targets inheritable across exec.
            read_end = fcntl.fcntl(to_browser_r, fcntl.F_DUPFD, 10)
            write_end = fcntl.fcntl(from_browser_w, fcntl.F_DUPFD, 10)
            os.dup2(read_end, 3)
            os.dup2(write_end, 4)
        self.process = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
             "--remote-debugging-pipe", f"--user-data-dir={self.profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=False, preexec_fn=_fds)
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer = b""
        self._ids = 0
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

    def call(self, method: str, session: bool = False, **params: object) -> dict:
        """Send one command (to the page when ``session``) and return its result; raise on a protocol error."""
        self._ids += 1
        message: dict[str, object] = {"id": self._ids, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" not in self._buffer:
                chunk = os.read(self._from_browser, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"chromium closed the DevTools pipe during {method}")
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._ids:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def screenshot(self, page: Page, out: Path, wait: float) -> None:
        """Load ``page.url``, give the single-page app ``wait`` seconds to fetch and draw, take the page's
        steps, and write a PNG of the viewport."""
        self.call("Emulation.setDeviceMetricsOverride", session=True, width=page.width, height=page.height,
                  deviceScaleFactor=1, mobile=False)
        self.call("Page.navigate", session=True, url=page.url)
        time.sleep(wait)
        for kind, arg, text in page.steps:
            if kind == "alt":
                for event in ("rawKeyDown", "keyUp"):
                    self.call("Input.dispatchKeyEvent", session=True, type=event, modifiers=1, code=arg,
                              key=arg[-1].lower(), windowsVirtualKeyCode=ord(arg[-1]))
            elif not self._click(page.name, arg, warn=not (kind == "click" and text == "optional")):
                continue
            if kind == "type":
                self.call("Input.insertText", session=True, text=text)
            time.sleep(2.0)
        shot = self.call("Page.captureScreenshot", session=True, format="png")
        out.write_bytes(base64.b64decode(shot["data"]))

    def _click(self, page: str, label: str, warn: bool = True) -> bool:
        """Click the centre of what FIND locates for ``label``; False (warning if ``warn``) when nothing does."""
        found = self.call("Runtime.evaluate", session=True, returnByValue=True,
                          expression=FIND % json.dumps(label))["result"].get("value")
        if found is None:
            if warn:
                print(f"  {page}: nothing labelled {label!r} to click", file=sys.stderr)
            return False
        for event in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", session=True, type=event, x=found[0], y=found[1],
                      button="left", clickCount=1)
        return True

    def close(self) -> None:
        """Close the browser (killed after 10 s) and delete its throw-away profile."""
        try:
            self.call("Browser.close")
        except (RuntimeError, OSError):
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._to_browser)
        os.close(self._from_browser)
        shutil.rmtree(self.profile, ignore_errors=True)  # the profile is only this session's cache


TRAIN_RUNS_FILTER = "tags.`mixsp.stage` = 'train'"

# MLflow 3 opens its assistant side panel on the first visit of a browser profile only.
CLOSE_ASSISTANT = (click("Close", optional=True),)


def latest_success(dagster_url: str) -> str:
    """Id of the newest successful run of JOB, asked of the webserver's GraphQL endpoint."""
    query = ("query { runsOrError(filter: {pipelineName: \"%s\", statuses: [SUCCESS]}, limit: 1) "
             "{ ... on Runs { results { runId } } } }" % JOB)
    request = urllib.request.Request(f"{dagster_url}/graphql", data=json.dumps({"query": query}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        runs = json.load(response)["data"]["runsOrError"].get("results") or []
    if not runs:
        raise SystemExit(f"{os.environ['DAGSTER_HOME']}: no successful {JOB} run; run `make run` first")
    return runs[0]["runId"]


def mlflow_pages(mlflow_url: str, tracking_uri: str) -> list[Page]:
    """The experiment's runs list, the comparison of its finished runs and the training run's charts.

    Expects the ``mixsp`` experiment to hold at least one finished run (``make run`` logs three)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        raise SystemExit(f"{tracking_uri}: no MLflow experiment {EXPERIMENT!r}; run `make run` first")
    runs = client.search_runs([experiment.experiment_id], filter_string="attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time ASC"])
    if not runs:
        raise SystemExit(f"{tracking_uri}: experiment {EXPERIMENT!r} has no finished run")
    trained = [r for r in runs if r.data.tags.get("mixsp.stage") == "train"]
    # Compared: the training runs (configs or seeds side by side, one dev vocabulary), or every finished run
    # while there are fewer than two.
    compared = trained if len(trained) >= 2 else runs
    ids = json.dumps([r.info.run_id for r in compared], separators=(",", ":"))
    exp = experiment.experiment_id
    pages = [Page("mlflow-runs", f"{mlflow_url}/#/experiments/{exp}/runs", CLOSE_ASSISTANT),
             # The parallel-coordinates plot on top; the ~100 parameters folded, then the metrics table.
             Page("mlflow-compare", f"{mlflow_url}/#/compare-runs?runs={ids}&experiments=[\"{exp}\"]",
                  (*CLOSE_ASSISTANT, click("Parameters")), height=1600),
             # Chart view of the training runs (the nested runs, found by their stage tag): dev curves overlaid.
             Page("mlflow-runs-charts", f"{mlflow_url}/#/experiments/{exp}/runs?compareRunsMode=CHART"
                  f"&searchFilter={urllib.parse.quote(TRAIN_RUNS_FILTER)}",
                  (*CLOSE_ASSISTANT, type_into("Search metric charts", "dev/")), height=1100)]
    if trained:
        pages.append(Page("mlflow-train-curves",
                          f"{mlflow_url}/#/experiments/{exp}/runs/{trained[-1].info.run_id}/model-metrics",
                          (*CLOSE_ASSISTANT, type_into("Search metric charts", "train/")), height=1100))
    return pages


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "screenshots")
    parser.add_argument("--wait", type=float, default=10.0, help="seconds each page gets to load and draw")
    parser.add_argument("--only", nargs="*", default=None, help="page names to take (default: all)")
    args = parser.parse_args(argv)

    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        raise SystemExit("no chromium on PATH: apt-get install -y chromium")
    for key, value in MAKEFILE_ENV.items():  # what `make ui` exports, so the code location loads the same
        os.environ.setdefault(key, value)
    home = ensure_dagster_home()
    store = tracking_uri()
    args.out.mkdir(parents=True, exist_ok=True)
    logs = Path(tempfile.mkdtemp(prefix="mixsp-ui-logs-"))  # server logs stay out of the repository
    servers: list[Server] = []
    try:
        servers.append(start_dagster(home, port=free_port(), daemon=False, log_dir=logs))
        servers.append(start_mlflow(store, port=free_port(), log_dir=logs))
        wait_until_up(servers[0], "/server_info")
        wait_until_up(servers[1], "/health")
        dagster, mlflow_url = servers[0].url, servers[1].url
        pages = [Page("dagster-asset-graph", f"{dagster}/asset-groups",
                      (alt_key("KeyE"),)),  # Alt+E expands every group (one asset group per stage)
                 Page("dagster-catalog", f"{dagster}/assets"),
                 Page("dagster-runs", f"{dagster}/runs"),
                 Page("dagster-run", f"{dagster}/runs/{latest_success(dagster)}"),
                 *mlflow_pages(mlflow_url, store)]
        if args.only is not None:
            pages = [p for p in pages if p.name in args.only]
        browser = Chromium(binary)
        try:
            for page in pages:
                out = args.out / f"{page.name}.png"
                browser.screenshot(page, out, args.wait)
                print(f"{out}  <-  {page.url}")
        finally:
            browser.close()
    finally:
        for server in servers:
            stop(server)
        shutil.rmtree(logs, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
