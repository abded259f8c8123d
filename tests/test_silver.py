"""Silver pairs (Augmented SBERT): partners by teacher-space rank or at random, near-duplicates and repeats
dropped, teacher cosines mapped onto the gold scores by quantiles; the config fields and TrainData.build."""

from __future__ import annotations

import logging
import math

import numpy as np
import pandas as pd
import pytest

from mixsp_core.data.table import PAIR_COLUMNS
from mixsp_core.errors import ConfigError, DataError
from mixsp_core.paths import PipelinePaths
from mixsp_core.training.batches import TrainData, nearest_neighbours, select_pairs
from mixsp_core.training.config import config_from_dict, dump_config, load_config
from mixsp_core.training.resume import config_difference
from mixsp_core.training.silver import quantile_scores, silver_pairs

# Six sentences on the unit circle at these angles (degrees): neighbours by angle are easy to list by hand.
ANGLES = [0, 10, 35, 65, 110, 170]
CIRCLE = np.array([[math.cos(math.radians(a)), math.sin(math.radians(a))] for a in ANGLES], dtype=np.float32)
WORDS = ["alpha one", "bravo two", "charlie three", "delta four", "echo five", "foxtrot six"]
# rank-1 / rank-2 neighbour of each row, from the angle differences (no ties):
# 0: 10,35,65.. -> 1, 2   1: 10,25,55 -> 0, 2   2: 25,30,35 -> 1, 3   3: 30,45,55 -> 2, 4
# 4: 45,60,75 -> 3, 5     5: 60,105 -> 4, 3
RANK1 = {0: 1, 1: 0, 2: 1, 3: 2, 4: 3, 5: 4}
RANK2 = {0: 2, 1: 2, 2: 3, 3: 4, 4: 5, 5: 3}


def _pairs_of(frame: pd.DataFrame) -> set[tuple[int, int]]:
    index = {s: i for i, s in enumerate(WORDS)}
    return {(index[a], index[b]) for a, b in zip(frame["sentence1"], frame["sentence2"])}


def _silver(count=6, ranks=(2,), fraction=0.0, seed=0, gold=(0, 1, 2, 3, 4, 5), sentences=WORDS, teacher=CIRCLE):
    return silver_pairs(sentences, teacher, np.asarray(gold, dtype=float), count, ranks, fraction, seed)


def test_partner_is_the_neighbour_at_the_drawn_rank():
    frame = _silver(ranks=(2,))
    assert _pairs_of(frame) == set(RANK2.items())
    assert list(frame.columns) == list(PAIR_COLUMNS)
    assert set(frame["task"]) == {"silver"} and set(frame["split"]) == {"train"} and set(frame["subset"]) == {"rank-2"}
    # line: the anchor's 1-based corpus row
    assert all(WORDS[line - 1] == s for line, s in zip(frame["line"], frame["sentence1"]))


def test_near_duplicates_are_skipped():
    # rank 1 of rows 0 and 1 is each other, 10 degrees apart: cosine 0.985 > 0.98, skipped both ways
    frame = _silver(ranks=(1,))
    assert _pairs_of(frame) == {(2, 1), (3, 2), (4, 3), (5, 4)}
    assert math.cos(math.radians(10)) > 0.98 > math.cos(math.radians(25))
    # the same text up to whitespace and case is a duplicate even with unrelated teacher rows
    same = silver_pairs(["The cat sat.", "  the CAT   sat. "], np.eye(2), np.arange(5.0), 2, [1], 1.0, 0)
    assert len(same) == 0
    close = np.array([[1.0, 0.0], [0.99, math.sqrt(1 - 0.99**2)]])  # cosine 0.99
    assert len(silver_pairs(["a b", "c d"], close, np.arange(5.0), 2, [1], 0.0, 0)) == 0
    apart = np.array([[1.0, 0.0], [0.97, math.sqrt(1 - 0.97**2)]])  # cosine 0.97: kept, once
    assert len(silver_pairs(["a b", "c d"], apart, np.arange(5.0), 2, [1], 0.0, 0)) == 1


def test_repeated_pairs_are_dropped():
    # count 12 over 6 sentences: every anchor twice, rank 2 always: each pair twice, kept once
    frame = _silver(count=12, ranks=(2,))
    assert len(frame) == 6 and _pairs_of(frame) == set(RANK2.items())
    # rank 1 or 2: 2 -> 3 (rank 2) and 3 -> 2 (rank 1) are one unordered pair
    rng = np.random.default_rng(5)
    vectors = rng.normal(size=(300, 8))
    big = silver_pairs([f"s{i}" for i in range(300)], vectors, rng.normal(size=50), 900, [1, 2], 0.3, 1)
    keys = {tuple(sorted(p)) for p in zip(big["sentence1"], big["sentence2"])}
    assert len(keys) == len(big) and (big["sentence1"] != big["sentence2"]).all()


def test_quantile_mapping_is_exact():
    assert np.array_equal(quantile_scores(np.array([0.3, 0.1, 0.5, 0.2, 0.4]), np.array([0, 1, 2, 3, 4.0])),
                          [2, 0, 4, 1, 3])
    # ties share their mean rank: ranks 1.5, 1.5, 3 -> q 0.25, 0.25, 1
    assert np.array_equal(quantile_scores(np.array([0.1, 0.1, 0.5]), np.array([0, 1, 2, 3, 4.0])), [1, 1, 4])
    assert np.array_equal(quantile_scores(np.array([0.7]), np.array([0, 1, 2, 3, 4.0])), [2])
    # gold from another distribution: q = 0, 1/2, 1 -> min, median, max of gold
    assert np.allclose(quantile_scores(np.array([-0.2, 0.9, 0.4]), np.array([1.0, 1.5, 5.0, 2.0])), [1.0, 5.0, 1.75])
    # through silver_pairs: the rank-2 pairs' angles 35 (0,2), 25 (1,2), 30 (2,3), 45 (3,4), 60 (4,5), 105 (5,3)
    # in cosine order 105 < 60 < 45 < 35 < 30 < 25 take the gold values 0..5
    frame = _silver(ranks=(2,), gold=[5, 0, 3, 1, 4, 2])
    scores = {pair: s for pair, s in zip(_pairs_of_list(frame), frame["score"])}
    assert scores == {(5, 3): 0, (4, 5): 1, (3, 4): 2, (0, 2): 3, (2, 3): 4, (1, 2): 5}


def _pairs_of_list(frame):
    index = {s: i for i, s in enumerate(WORDS)}
    return [(index[a], index[b]) for a, b in zip(frame["sentence1"], frame["sentence2"])]


def test_random_fraction_and_ranks_are_respected():
    rng = np.random.default_rng(11)
    n = 1000
    vectors = rng.normal(size=(n, 8)).astype(np.float32)
    sentences = [f"sentence {i}" for i in range(n)]
    ranks = [1, 2, 4, 8]
    frame = silver_pairs(sentences, vectors, rng.uniform(0, 5, 200), n, ranks, 0.3, seed=3)
    assert len(frame) > 0.95 * n  # few skipped: random 8-d rows are rarely near-duplicates
    assert abs((frame["subset"] == "random").mean() - 0.3) < 0.05  # binomial sd 0.015
    table = nearest_neighbours(vectors, 8)
    index = {s: i for i, s in enumerate(sentences)}
    seen_ranks = set()
    for a, b, subset in zip(frame["sentence1"], frame["sentence2"], frame["subset"]):
        if subset != "random":
            r = int(subset.removeprefix("rank-"))
            seen_ranks.add(r)
            assert table[index[a], r - 1] == index[b]
    assert seen_ranks == set(ranks)
    assert len(frame["sentence1"].unique()) == len(frame)  # anchors without replacement (count == n)
    assert (silver_pairs(sentences, vectors, np.arange(5.0), 200, ranks, 0.0, 3)["subset"] != "random").all()
    assert (silver_pairs(sentences, vectors, np.arange(5.0), 200, ranks, 1.0, 3)["subset"] == "random").all()


def test_same_seed_same_pairs():
    rng = np.random.default_rng(2)
    vectors, gold = rng.normal(size=(80, 3)), rng.uniform(0, 5, 30)
    sentences = [f"w{i}" for i in range(80)]
    a, b = (silver_pairs(sentences, vectors, gold, 60, [1, 2, 4], 0.2, 9) for _ in range(2))
    pd.testing.assert_frame_equal(a, b)
    c = silver_pairs(sentences, vectors, gold, 60, [1, 2, 4], 0.2, 10)
    assert not a[["sentence1", "sentence2"]].equals(c[["sentence1", "sentence2"]])
    # scores keep the teacher's order and lie in the gold range
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    index = {s: i for i, s in enumerate(sentences)}
    cos = [unit[index[x]] @ unit[index[y]] for x, y in zip(a["sentence1"], a["sentence2"])]
    order = np.argsort(cos)
    assert np.all(np.diff(a["score"].to_numpy()[order]) >= 0)
    assert gold.min() == a["score"].min() and a["score"].max() == gold.max()


def test_bad_arguments_raise():
    with pytest.raises(DataError, match="teacher embeddings"):
        silver_pairs(WORDS, CIRCLE[:4], np.arange(5.0), 3, [1], 0.2, 0)
    with pytest.raises(ConfigError) as err:
        silver_pairs(WORDS, CIRCLE, np.arange(5.0), 3, [6], 0.2, 0)  # only 5 other sentences
    assert err.value.field == "data.silver_neighbour_ranks"
    with pytest.raises(ConfigError) as err:
        silver_pairs(WORDS, CIRCLE, np.arange(5.0), 3, [1], float("nan"), 0)
    assert err.value.field == "data.silver_random_fraction"
    assert len(silver_pairs(WORDS, CIRCLE, np.arange(5.0), 0, [1], 0.2, 0)) == 0


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize("data, field", [
    ({"silver_pairs": -1}, "data.silver_pairs"),
    ({"silver_pairs": 1.5}, "data.silver_pairs"),
    ({"silver_random_fraction": float("nan")}, "data.silver_random_fraction"),
    ({"silver_random_fraction": 1.5}, "data.silver_random_fraction"),
    ({"silver_random_fraction": -0.1}, "data.silver_random_fraction"),
    ({"silver_neighbour_ranks": []}, "data.silver_neighbour_ranks"),
    ({"silver_neighbour_ranks": [0, 1]}, "data.silver_neighbour_ranks"),
    ({"silver_neighbour_ranks": [2, 2]}, "data.silver_neighbour_ranks"),
    ({"silver_neighbour_ranks": 4}, "data.silver_neighbour_ranks"),
])
def test_bad_silver_settings_name_the_field(data, field):
    with pytest.raises(ConfigError) as err:
        config_from_dict({"data": data})
    assert err.value.field == field


def test_yaml_nan_names_the_field(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  silver_random_fraction: .nan\n")
    with pytest.raises(ConfigError, match="c.yaml") as err:
        load_config(path)
    assert err.value.field == "data.silver_random_fraction"


def test_needs_teacher_round_trip_and_old_runs_resume(tmp_path):
    default = config_from_dict({})
    assert default.data.silver_pairs == 0 and default.data.silver_neighbour_ranks == [1, 2, 4, 8, 16, 32]
    assert default.data.silver_random_fraction == 0.2 and not default.needs_teacher
    assert config_from_dict({"loss": {"distill_sim": 1.0}}).needs_teacher
    config = config_from_dict({"data": {"silver_pairs": 500, "silver_neighbour_ranks": [1, 3],
                                        "silver_random_fraction": 0.5}})
    assert config.needs_teacher
    again = load_config(dump_config(config, tmp_path / "run_config.yaml"))
    assert again == config and again.data.silver_neighbour_ranks == [1, 3]
    # a run saved before these fields existed reads them as their defaults: resumable when silver is off
    saved = default.to_dict()
    for name in ("silver_pairs", "silver_neighbour_ranks", "silver_random_fraction"):
        del saved["data"][name]
    assert config_difference(saved, default) is None
    assert config_difference(saved, config)[0] == "data.silver_neighbour_ranks"  # the first differing field


def test_silver_config_file_loads():
    from pathlib import Path

    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "bi_mixsp_silver.yaml")
    assert config.data.silver_pairs == 5000 and config.data.teacher == "data/models/teacher-ft/teacher"
    assert config.needs_teacher and not config.loss.uses_teacher


# --------------------------------------------------------------------------- TrainData and the train stage


def _table() -> pd.DataFrame:
    """Four gold training pairs and two tiny dev sets, in the pairs-table layout."""
    rows = [("a cat", "a dog", 4.5, "STSBenchmark", "train"), ("a car", "a tree", 0.5, "STSBenchmark", "train"),
            ("the sun", "the moon", 2.0, "STSBenchmark", "train"), ("red", "blue", 3.0, "STSBenchmark", "train")]
    rows += [(f"dev {i}", f"dev {i}b", float(i), "STSBenchmark", "dev") for i in range(4)]
    rows += [(f"trial {i}", f"trial {i}b", float(i) + 1, "SICKRelatedness", "dev") for i in range(4)]
    return pd.DataFrame(rows, columns=["sentence1", "sentence2", "score", "task", "split"])


def _config(**data):
    return config_from_dict({"data": {"train_tasks": ["STSBenchmark"], **data}, "train": {"batch_size": 2}})


def test_train_data_appends_silver_rows_and_leaves_dev_alone(caplog):
    config = _config(silver_pairs=6, silver_neighbour_ranks=[2], silver_random_fraction=0.0)
    train, dev = select_pairs(_table(), config)
    with caplog.at_level(logging.INFO, logger="mixsp_core.training.batches"):
        data = TrainData.build(config, train, WORDS, CIRCLE, None)
    silver = data.train[data.train["task"] == "silver"]
    assert len(data.train) == 4 + 6 and len(silver) == 6 and len(data.gold) == 10
    assert data.train.iloc[:4].equals(train)  # gold rows first, unchanged
    # silver scores from the gold distribution [0.5, 2, 3, 4.5]: min and max of it
    assert silver["score"].min() == 0.5 and silver["score"].max() == 4.5
    assert np.array_equal(data.gold, data.train["score"].to_numpy(np.float32))
    # routing classes count silver rows too (upper: gold >= 4)
    assert data.class_counts == (int((data.gold < 4).sum()), int((data.gold >= 4).sum()))
    # batch_by_task: 2 gold batches + 3 silver batches of 2, none mixing tasks
    assert data.pairs.batches_per_epoch == 5
    for step in range(5):
        assert data.train["task"].iloc[data.pairs.indices(step)].nunique() == 1
    # the dev sets are the pairs table's, whatever build does
    assert set(dev) == {"STSBenchmark-dev", "SICK-trial"}
    assert all(len(frame) == 4 and "silver" not in set(frame["task"]) for frame in dev.values())
    assert not set(silver["sentence1"]) & {s for f in dev.values() for s in f["sentence1"]}
    # silver alone fits no distillation targets
    assert data.distill_sentences == [] and data.distill_targets is None and data.pca_components is None
    assert any("silver pairs: 6 of 6 asked" in r.getMessage() and "0.500 to 4.500" in r.getMessage()
               for r in caplog.records)


def test_silver_pairs_use_the_raw_teacher_rows_not_the_distillation_targets():
    teacher = np.random.default_rng(7).normal(size=(40, 6)).astype(np.float32)
    sentences = [f"corpus sentence {i}" for i in range(40)]
    config = config_from_dict({"data": {"train_tasks": ["STSBenchmark"], "silver_pairs": 30},
                               "model": {"output_dim": 2}, "loss": {"distill": 1.0}, "train": {"batch_size": 2}})
    train, _ = select_pairs(_table(), config)
    data = TrainData.build(config, train, sentences, teacher, None)
    assert data.distill_targets.shape == (40, 2)  # PCA-projected for distillation
    expected = silver_pairs(sentences, teacher, train["score"].to_numpy(), 30, config.data.silver_neighbour_ranks,
                            0.2, config.seed)
    got = data.train[data.train["task"] == "silver"].reset_index(drop=True)
    pd.testing.assert_frame_equal(got, expected.loc[:, list(train.columns)])


def test_silver_without_corpus_is_a_config_error():
    config = _config(silver_pairs=6)
    train, _ = select_pairs(_table(), config)
    with pytest.raises(ConfigError) as err:
        TrainData.build(config, train, None, None, None)
    assert err.value.field == "data.silver_pairs"
    off = TrainData.build(_config(), train, None, None, None)
    assert len(off.train) == 4 and "silver" not in set(off.train["task"])


def test_training_inputs_reads_the_teacher_rows_when_silver_is_on(monkeypatch, tmp_path):
    from mixsp_core.stages import train as stage

    calls = []
    monkeypatch.setattr(stage, "read_pairs", lambda paths: _table())
    monkeypatch.setattr(stage, "read_corpus_file", lambda paths: list(WORDS))

    def encode(corpus, paths, teacher):
        calls.append(teacher)
        return CIRCLE, None

    monkeypatch.setattr(stage, "encode_with_teacher", encode)
    paths = PipelinePaths(tmp_path)
    pairs, corpus, teacher = stage.training_inputs(_config(), paths)
    assert corpus is None and teacher is None and not calls
    pairs, corpus, teacher = stage.training_inputs(_config(silver_pairs=6, teacher="some/teacher"), paths)
    assert corpus == WORDS and teacher is CIRCLE and calls == ["some/teacher"]


def test_a_run_trains_on_silver_pairs(tiny_bert_dir, senteval_dir, tmp_path):
    import torch

    from mixsp_core.tracking.tracker import NullTracker
    from mixsp_core.training.loop import run_training
    from tests.train_helpers import small_pairs, tiny_config

    pairs = small_pairs(senteval_dir)
    corpus = list(dict.fromkeys(pairs.loc[pairs["split"] == "train", "sentence1"]))[:40]
    teacher = np.random.default_rng(4).normal(size=(len(corpus), 24)).astype(np.float32)
    config = tiny_config(tiny_bert_dir, data={"silver_pairs": 32}, train={"max_steps": 3, "eval_every": 3})
    tracker = NullTracker()
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = run_training(config, pairs, corpus=corpus, teacher_targets=teacher, out_dir=tmp_path / "s",
                              tracker=tracker, show_progress=False)
    finally:
        torch.set_num_threads(before)
    assert result.steps == 3 and len(tracker.series("train/cosent")) == 3
    # 48 gold pairs (6 batches of 8) + up to 32 silver pairs (4 batches): the epoch counts both
    assert load_config(tmp_path / "s" / "run_config.yaml").data.silver_pairs == 32
