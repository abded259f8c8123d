"""Issue 15, item 5: validation lets no wrong data through. A file without data rows, a boolean or quoted JSON
score, a duplicated column, and a configured training task (or dev set) without rows are errors that name the
file (and line) or the task, never a silently smaller or different table."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest

from mixsp_core.data.senteval import read_senteval, read_sick_file, read_stsb_file
from mixsp_core.data.sources import load_pairs
from mixsp_core.data.table import make_pairs
from mixsp_core.data.validate import validate_corpus, validate_pairs
from mixsp_core.errors import ConfigError, DataError
from mixsp_core.training.batches import select_pairs
from mixsp_core.training.config import config_from_dict
from tests.pipeline_helpers import write_tiny_senteval


def _at(path: Path, line: int | None = None) -> str:
    return "^" + re.escape(f"{path}:{line}: " if line is not None else f"{path}: ")


# --- files without data rows --------------------------------------------------------------------


@pytest.mark.parametrize("name, text", [("pairs.csv", "sentence1,sentence2,score\n"),
                                        ("pairs.tsv", "sentence1\tsentence2\tscore\n\n"),
                                        ("pairs.jsonl", "\n\n")])
def test_a_file_with_only_a_header_is_an_error_naming_it(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError, match=_at(path) + "no data rows"):
        load_pairs(f"file:{path}")


def test_a_parquet_file_without_rows_is_an_error_naming_it(tmp_path):
    path = tmp_path / "pairs.parquet"
    pd.DataFrame({"sentence1": pd.Series([], dtype=str), "sentence2": pd.Series([], dtype=str),
                  "score": pd.Series([], dtype=float)}).to_parquet(path)
    with pytest.raises(DataError, match=_at(path) + "no data rows"):
        load_pairs(f"file:{path}")


def test_senteval_files_without_rows_are_errors_naming_them(tmp_path):
    sick = tmp_path / "SICK_trial.txt"
    sick.write_text("pair_ID\tsentence_A\tsentence_B\trelatedness_score\n", encoding="utf-8")
    with pytest.raises(DataError, match=_at(sick) + "no data rows"):
        read_sick_file(sick, "dev")
    stsb = tmp_path / "sts-dev.csv"
    stsb.write_text("", encoding="utf-8")
    with pytest.raises(DataError, match=_at(stsb) + "no data rows"):
        read_stsb_file(stsb, "dev")


def test_a_hub_dataset_without_rows_is_an_error_naming_it():
    import datasets

    from mixsp_core.data.hub import _dataset_pairs

    empty = datasets.Dataset.from_dict({"sentence1": [], "sentence2": [], "score": []})
    full = datasets.Dataset.from_dict({"sentence1": ["a", "b"], "sentence2": ["c", "d"], "score": [1.0, 4.0]})
    with pytest.raises(DataError, match=re.escape("hf:some/set: no data rows in any split")):
        _dataset_pairs(datasets.DatasetDict({"train": empty, "test": empty}), "hf:some/set", "some/set")
    pairs = _dataset_pairs(datasets.DatasetDict({"train": empty, "test": full}), "hf:some/set", "some/set")
    assert pairs["split"].tolist() == ["test", "test"]  # an empty split alone holds no pairs: skipped


def test_validation_fails_on_a_table_or_corpus_without_rows():
    report = validate_pairs(make_pairs([]), "empty")
    assert not report.success
    assert [issue.check for issue in report.failures] == ["table has at least one pair"]
    corpus = validate_corpus([], "corpus.txt")
    assert [issue.check for issue in corpus.failures] == ["corpus has at least one sentence"]


# --- scores that are not numbers ----------------------------------------------------------------


@pytest.mark.parametrize("score", [True, False, "4.5", "five"])
def test_a_json_score_that_is_not_a_number_names_file_and_line(tmp_path, score):
    path = tmp_path / "pairs.jsonl"
    rows = [{"sentence1": "a", "sentence2": "b", "score": 3.5}, {"sentence1": "c", "sentence2": "d", "score": score}]
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=_at(path, 2) + "score .* not a number"):
        load_pairs(f"file:{path}")


def test_a_parquet_score_column_of_booleans_is_refused(tmp_path):
    path = tmp_path / "pairs.parquet"
    pd.DataFrame({"sentence1": ["a", "b"], "sentence2": ["c", "d"], "score": [True, False]}).to_parquet(path)
    with pytest.raises(DataError, match=_at(path, 1) + "score True is a boolean, not a number"):
        load_pairs(f"file:{path}")


def test_csv_scores_are_text_by_nature_and_still_read(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("sentence1,sentence2,score\na,b,4.5\nc,d,1\n", encoding="utf-8")
    assert load_pairs(f"file:{path}")["score"].tolist() == [4.5, 1.0]


# --- duplicated columns -------------------------------------------------------------------------


@pytest.mark.parametrize("name, header, row", [
    ("pairs.csv", "sentence1,sentence2,score,score", "a,b,1,5"),
    ("pairs.tsv", "sentence1\tsentence2\tscore\tscore", "a\tb\t1\t5"),
])
def test_a_duplicated_column_is_refused_naming_the_file(tmp_path, name, header, row):
    path = tmp_path / name
    path.write_text(f"{header}\n{row}\n", encoding="utf-8")
    with pytest.raises(DataError, match=_at(path, 1) + "duplicate column.* score"):
        load_pairs(f"file:{path}")


def test_a_duplicated_json_key_is_refused_naming_file_and_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"sentence1": "a", "sentence2": "b", "score": 1}\n'
                    '{"sentence1": "c", "sentence2": "d", "score": 1, "score": 5}\n', encoding="utf-8")
    with pytest.raises(DataError, match=_at(path, 2) + "duplicate key 'score'"):
        load_pairs(f"file:{path}")


def test_a_duplicated_sick_header_column_is_refused(tmp_path):
    path = tmp_path / "SICK_trial.txt"
    path.write_text("sentence_A\tsentence_B\trelatedness_score\trelatedness_score\na\tb\t1\t5\n", encoding="utf-8")
    with pytest.raises(DataError, match=_at(path, 1) + "duplicate column.* relatedness_score"):
        read_sick_file(path, "dev")


# --- configured tasks without rows --------------------------------------------------------------


def _config(**data):
    return config_from_dict({"name": "t", "data": {"dev_sets": ["STSBenchmark-dev", "SICK-trial"], **data}})


def test_a_senteval_folder_without_sts_train_fails_training_naming_the_task(tmp_path, senteval_dir):
    source = write_tiny_senteval(senteval_dir, tmp_path / "senteval", pairs_per_file=12, corpus_lines=4)
    (source / "STS" / "STSBenchmark" / "sts-train.csv").unlink()
    pairs = read_senteval(source)  # still reads: the folder is a valid SentEval layout
    assert set(pairs.loc[pairs["split"] == "train", "task"]) == {"SICKRelatedness"}
    with pytest.raises(ConfigError, match=r"data\.train_tasks.*'STSBenchmark' have no training pairs.*"
                                          r"tasks with training pairs: SICKRelatedness"):
        select_pairs(pairs, _config(train_tasks=["STSBenchmark", "SICKRelatedness"]))
    train, dev = select_pairs(pairs, _config(train_tasks=["SICKRelatedness"]))  # what is there still trains
    assert set(train["task"]) == {"SICKRelatedness"} and set(dev) == {"STSBenchmark-dev", "SICK-trial"}


def test_a_missing_or_constant_dev_set_fails_training_naming_it(tmp_path, senteval_dir):
    source = write_tiny_senteval(senteval_dir, tmp_path / "senteval", pairs_per_file=12, corpus_lines=4)
    (source / "SICK" / "SICK_trial.txt").unlink()
    config = _config(train_tasks=["STSBenchmark"])
    with pytest.raises(ConfigError, match=r"data\.dev_sets.*'SICK-trial' has 0 pairs"):
        select_pairs(read_senteval(source), config)
    pairs = read_senteval(source)
    pairs.loc[(pairs["task"] == "STSBenchmark") & (pairs["split"] == "dev"), "score"] = 2.0
    with pytest.raises(ConfigError, match=r"data\.dev_sets.*'STSBenchmark-dev': every gold score is 2 "
                                          r"\(from .*sts-dev\.csv\)"):
        select_pairs(pairs, _config(train_tasks=["STSBenchmark"], dev_sets=["STSBenchmark-dev"]))
