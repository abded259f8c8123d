"""`make ui`: the Dagster UI (webserver + daemon) and the MLflow UI on localhost.

    python -m pipelines.ui [--dagster-port 3000] [--mlflow-port 5000] [--detach]

Prints both URLs once they answer. In the foreground, Ctrl-C stops both; with ``--detach`` they keep
running and the command to stop them is printed.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

from mixsp_core.tracking.tracker import tracking_uri
from pipelines.run import ensure_dagster_home
from pipelines.servers import start_dagster, start_mlflow, stop, wait_until_up


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.ui", description=__doc__.splitlines()[0])
    parser.add_argument("--dagster-port", type=int, default=3000)
    parser.add_argument("--mlflow-port", type=int, default=5000)
    parser.add_argument("--detach", action="store_true", help="leave both servers running and return")
    args = parser.parse_args(argv)

    home = ensure_dagster_home()
    servers = [start_dagster(home, port=args.dagster_port),
               start_mlflow(tracking_uri(), port=args.mlflow_port, log_dir=home / "logs")]
    try:
        wait_until_up(servers[0], "/server_info")
        wait_until_up(servers[1], "/health")
    except (RuntimeError, TimeoutError) as err:
        print(err, file=sys.stderr)
        for server in servers:
            stop(server)
        return 1
    print(f"Dagster UI: {servers[0].url}   (logs: {servers[0].log})")
    print(f"MLflow UI:  {servers[1].url}   (logs: {servers[1].log})")
    if args.detach:
        groups = " ".join(f"-{os.getpgid(s.process.pid)}" for s in servers)
        print(f"Stop them with: kill -INT -- {groups}")
        return 0
    print("Ctrl-C stops both.")
    signal.signal(signal.SIGTERM, _interrupt)  # `kill PID` stops the servers too
    try:
        while all(s.process.poll() is None for s in servers):
            time.sleep(1.0)
    except KeyboardInterrupt:
        pass
    finally:
        for server in servers:
            stop(server)
    return 0


if __name__ == "__main__":
    sys.exit(main())
