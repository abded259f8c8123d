"""One progress bar per stage: encode calls inside ``stage_progress`` feed the stage's bar and its log lines
instead of opening bars of their own, and change nothing they compute."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from mixsp_core.progress import StageProgress, encode_bar, stage_progress

SENTENCES = [f"sentence number {i} about {'cats' if i % 2 else 'the weather'}" for i in range(40)]


def test_encode_calls_in_a_stage_share_its_bar_and_log_progress(tiny_bert_dir, caplog: pytest.LogCaptureFixture):
    from mixsp_core.models.encoder import Encoder

    encoder = Encoder(tiny_bert_dir, device="cpu", show_progress=False)
    alone = encoder.encode(SENTENCES, batch_size=8)
    caplog.set_level(logging.INFO, logger="mixsp_core.progress")
    with stage_progress("evaluate", show=False, log_every_s=0.0) as stage:
        first = encoder.encode(SENTENCES, batch_size=8)
        second = encoder.encode(SENTENCES[:10], batch_size=8, show_progress=True)
        encoder.fast = False  # the plain reference loop feeds the stage too
        encoder.encode(SENTENCES[:5], batch_size=8)
        with stage_progress("inner") as inner:  # a stage inside a stage keeps the outer bar
            assert inner is stage
    assert (stage.total, stage.done) == (55, 55)
    np.testing.assert_array_equal(first, alone)  # progress changes nothing computed
    np.testing.assert_array_equal(second, alone[:10])
    lines = [r.getMessage() for r in caplog.records if r.name == "mixsp_core.progress"]
    assert any(line.startswith("evaluate: ") and "/40 sentences" in line for line in lines)
    assert lines[-1].startswith("evaluate: 55 sentences in ")


def test_outside_a_stage_an_encode_call_has_its_own_bar():
    from tqdm.auto import tqdm

    bar = encode_bar(10, "encode", show=False)
    assert isinstance(bar, tqdm) and bar.disable
    bar.close()


def test_progress_line_estimates_the_time_left():
    stage = StageProgress("teacher shard 1/2", show=False, log_every_s=3600)
    stage.expect(4000)
    stage.advance(1000)
    line = stage.line(now=stage._started + 60.0)
    assert line == "teacher shard 1/2: 1,000/4,000 sentences (25%), 60 s, ~3.0 min left"
    stage.close()
