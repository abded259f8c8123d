"""Decontaminated evaluation: test pairs a model saw (either order, whitespace-normalised) are counted and
left out of the unseen-pairs Spearman; training records the pairs it saw with every checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from mixsp_core.cli import main
from mixsp_core.errors import CheckpointError
from mixsp_core.evaluate.contamination import (SEEN_PAIRS_FILE, pair_key, pair_keys, read_seen_pairs,
                                               seen_pairs_for, write_seen_pairs)
from mixsp_core.evaluate.sts import SEVEN_TASKS, correlations, evaluate_embedder, score_table


def _rows(task: str, split: str, pairs: list[tuple[str, str, float]]) -> pd.DataFrame:
    return pd.DataFrame({"sentence1": [a for a, _, _ in pairs], "sentence2": [b for _, b, _ in pairs],
                         "score": [s for _, _, s in pairs], "task": task, "subset": task, "split": split,
                         "source": "made-up", "line": range(1, len(pairs) + 1)})


TRAIN = [("A man plays a guitar.", "A person plays guitar.", 4.2), ("A dog runs.", "Cats sleep.", 0.4),
         ("The sun is hot.", "It is warm outside.", 3.1)]
# the first two test pairs repeat training pairs: one reversed, one with other whitespace
TEST = [("A person plays guitar.", "A man plays a guitar.", 4.0), ("A  dog runs. ", "Cats   sleep.", 0.5),
        ("Birds fly south.", "Geese migrate in winter.", 3.5), ("He reads a book.", "She cooks dinner.", 0.8),
        ("The car is red.", "A red car is parked.", 3.9), ("It rains.", "The stock fell.", 0.1)]


def test_pair_key_ignores_order_and_whitespace():
    assert pair_key("a  b", " c ") == pair_key("c", "a b") != pair_key("a b", "c d")
    assert len(pair_key("x", "y")) == 16


def test_seen_test_pairs_are_counted_and_left_out():
    train, test = _rows("STSBenchmark", "train", TRAIN), _rows("STS12", "test", TEST)
    similarities = np.array([0.9, 0.1, 0.2, 0.7, 0.8, 0.3])  # made up: the seen pairs are scored well
    tasks = score_table(test, similarities, seen=frozenset(pair_keys(train)))
    row = tasks["STS12"]
    assert (row["pairs"], row["seen_pairs"], row["unseen"]["pairs"]) == (6, 2, 4)
    expected = correlations(similarities[2:], test["score"].to_numpy()[2:])
    assert row["unseen"]["spearman"] == pytest.approx(expected["spearman"])
    assert row["unseen"]["spearman"] != pytest.approx(row["spearman"])
    assert "unseen" not in score_table(test, similarities)["STS12"]  # nothing known: standard scores only


class _LengthEmbedder:
    """A deterministic stand-in for a model: a sentence's vector from its letters."""

    def encode(self, sentences, batch_size=64):
        return np.array([[len(s), s.count("a") + 1, s.count("e") + 1, 1.0] for s in sentences], dtype=np.float32)


def test_avg7_unseen_needs_all_seven_test_tasks():
    train = _rows("STSBenchmark", "train", TRAIN)
    tables = [_rows(task, "test", TEST) for task in SEVEN_TASKS]
    seen = frozenset(pair_keys(train))
    result = evaluate_embedder(_LengthEmbedder(), pd.concat(tables, ignore_index=True), seen=seen)
    unseen = [result["tasks"][t]["unseen"]["spearman"] for t in SEVEN_TASKS]
    assert result["avg7_unseen"] == pytest.approx(float(np.mean(unseen)))
    partial = evaluate_embedder(_LengthEmbedder(), pd.concat(tables[:3], ignore_index=True), seen=seen)
    assert partial["avg7_unseen"] is None and partial["avg7"] is None


def test_seen_pairs_file_round_trip_and_corruption(tmp_path):
    write_seen_pairs(pair_keys(_rows("STSBenchmark", "train", TRAIN)) * 2, tmp_path)
    keys = read_seen_pairs(tmp_path)
    assert keys == frozenset(pair_keys(_rows("STSBenchmark", "train", TRAIN))) and len(keys) == 3
    (tmp_path / SEEN_PAIRS_FILE).write_text("0123456789abcdef\nnot-a-key\n")
    with pytest.raises(CheckpointError, match=f"{SEEN_PAIRS_FILE}:2"):
        read_seen_pairs(tmp_path)
    assert read_seen_pairs(tmp_path / "absent") is None


def test_without_a_record_the_train_and_dev_splits_count_as_seen(tmp_path):
    pairs = pd.concat([_rows("STSBenchmark", "train", TRAIN), _rows("STS12", "test", TEST)], ignore_index=True)
    keys, source = seen_pairs_for("sentence-transformers/all-MiniLM-L6-v2", pairs)
    assert keys == frozenset(pair_keys(pairs[pairs["split"] == "train"])) and "records none" in source


def test_training_records_seen_pairs_in_every_checkpoint(tiny_bert_dir, senteval_dir, tmp_path):
    from mixsp_core.tracking.tracker import NullTracker
    from mixsp_core.training.batches import select_pairs
    from mixsp_core.training.loop import run_training
    from tests.train_helpers import small_pairs, tiny_config

    pairs = small_pairs(senteval_dir)
    config = tiny_config(tiny_bert_dir, train={"max_steps": 4, "snapshot_every": 2})
    run_training(config, pairs, out_dir=tmp_path / "run", tracker=NullTracker(), show_progress=False)
    train, dev = select_pairs(pairs, config)
    expected = frozenset(pair_keys(pd.concat([train, *dev.values()])))
    for checkpoint in ("best", "last", "start", "snapshots/step-2"):
        assert read_seen_pairs(tmp_path / "run" / checkpoint) == expected, checkpoint


def test_cli_prints_the_unseen_average(tmp_path, tiny_bert_dir, capsys):
    data = tmp_path / "made-up.jsonl"
    rows = [{"sentence1": a, "sentence2": b, "score": s, "task": "STS12", "split": "test"} for a, b, s in TEST]
    rows += [{"sentence1": a, "sentence2": b, "score": s, "task": "STSBenchmark", "split": "train"}
             for a, b, s in TRAIN]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "report.json"
    assert main(["evaluate", "--model", str(tiny_bert_dir), "--data", f"file:{data}", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "unseen pairs" in printed and "the train and dev splits of the data (3 pairs" in printed
    report = json.loads(out.read_text())
    assert (report["tasks"]["STS12"]["seen_pairs"], report["tasks"]["STS12"]["unseen"]["pairs"]) == (2, 4)
    assert "avg7_unseen" in report
