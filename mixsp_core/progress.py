"""Progress of a stage: one bar for the whole stage, not one per encode call, and a log line now and then.

``with stage_progress("evaluate"):`` opens the stage's one tqdm bar; every encode call inside the block
(:func:`encode_bar`, used by the encoders' loops) adds its sentences to that bar instead of opening a bar
of its own, and every ``log_every_s`` seconds a line such as ``teacher shard 1/2: 12,288/48,000 sentences
(26%), 2.0 min, ~5.7 min left`` goes to the logger ``mixsp_core.progress`` (INFO). Dagster shows that
logger's lines in the run's log (``python_logs`` in dagster.yaml, written by pipelines/run.py), so a long
step such as the teacher's is not silent there even with its terminal bar off. Outside a stage an encode
call keeps its own bar, as before. Nothing here touches what is computed.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

from tqdm.auto import tqdm

LOG = logging.getLogger("mixsp_core.progress")
LOG_EVERY_S = 60.0


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


class StageProgress:
    """The one bar (and the periodic log line) of a running stage. Thread-safe: encode workers update it."""

    def __init__(self, name: str, show: bool = True, unit: str = "sentences", log_every_s: float = LOG_EVERY_S):
        self.name = name
        self.unit = unit
        self.total = 0
        self.done = 0
        self.log_every_s = log_every_s
        self.show = show
        self._bar: tqdm | None = None  # opened by the first encode call: a stage that encodes nothing shows none
        self._lock = threading.Lock()
        self._started = self._logged = time.monotonic()

    def expect(self, count: int) -> None:
        """``count`` more units of work are coming (an encode call's sentences)."""
        with self._lock:
            self.total += count
            if self._bar is None:
                self._bar = tqdm(total=0, desc=self.name, unit=self.unit[:4], disable=not self.show, dynamic_ncols=True)
            self._bar.total = self.total
            self._bar.refresh()

    def advance(self, count: int) -> None:
        """``count`` units are done; logs a progress line when ``log_every_s`` has passed since the last."""
        with self._lock:
            self.done += count
            if self._bar is not None:
                self._bar.update(count)
            now = time.monotonic()
            if now - self._logged >= self.log_every_s:
                self._logged = now
                LOG.info(self.line(now))

    def line(self, now: float | None = None) -> str:
        """``name: done/total unit (pct%), elapsed, ~remaining left``."""
        elapsed = (now if now is not None else time.monotonic()) - self._started
        text = f"{self.name}: {self.done:,}/{self.total:,} {self.unit}"
        if self.total:
            text += f" ({100 * self.done / self.total:.0f}%), {_duration(elapsed)}"
            if 0 < self.done < self.total:
                text += f", ~{_duration(elapsed * (self.total - self.done) / self.done)} left"
        return text

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self.done:
            LOG.info(f"{self.name}: {self.done:,} {self.unit} in {_duration(time.monotonic() - self._started)}")


_ACTIVE: ContextVar[StageProgress | None] = ContextVar("mixsp_stage_progress", default=None)


@contextlib.contextmanager
def stage_progress(name: str, show: bool = True, log_every_s: float = LOG_EVERY_S) -> Iterator[StageProgress]:
    """Open the stage ``name``'s one bar (``show``: on the terminal; the log lines come either way) for the
    block; encode calls inside it feed it. Inside another stage, the outer stage's bar is used."""
    outer = _ACTIVE.get()
    if outer is not None:
        yield outer
        return
    progress = StageProgress(name, show=show, log_every_s=log_every_s)
    token = _ACTIVE.set(progress)
    try:
        yield progress
    finally:
        _ACTIVE.reset(token)
        progress.close()


class _StageShare:
    """One encode call's part of the stage bar: the bar interface encode loops use (update, context)."""

    def __init__(self, stage: StageProgress, total: int):
        self.stage = stage
        stage.expect(total)

    def update(self, count: int) -> None:
        self.stage.advance(count)

    def __enter__(self) -> _StageShare:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def encode_bar(total: int, desc: str = "encode", show: bool = True) -> Any:
    """The bar an encode call of ``total`` sentences updates (``.update(n)``, a context manager): its share
    of the running stage's bar inside :func:`stage_progress`, else a bar of its own (none when not ``show``)."""
    stage = _ACTIVE.get()
    if stage is not None:
        return _StageShare(stage, total)
    return tqdm(total=total, desc=desc, unit="sent", disable=not show, leave=False)
