"""load_pairs dispatch, plain pair files (csv/tsv/jsonl/parquet) and Hugging Face datasets (no network)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pandas as pd
import pytest

from mixsp_core.data import hub
from mixsp_core.data.sources import load_pairs
from mixsp_core.data.table import PAIR_COLUMNS
from mixsp_core.errors import DataError


def _at(path: Path, line: int | None = None) -> str:
    where = f"{path}:{line}: " if line is not None else f"{path}: "
    return "^" + re.escape(where)


# --- file:PATH ---------------------------------------------------------------------------------


def test_csv_defaults_and_physical_line_numbers(tmp_path: Path) -> None:
    path = tmp_path / "my-pairs.csv"
    # The second record's quoted sentence spans two physical lines, so the third record starts on line 5.
    path.write_text('sentence1,sentence2,score\nA cat.,"A cat, sitting.",4\n"Two\nlines",x,1.5\ny,z,0\n', encoding="utf-8")
    pairs = load_pairs(f"file:{path}")
    assert list(pairs.columns) == list(PAIR_COLUMNS)
    assert pairs["line"].tolist() == [2, 3, 5]
    assert pairs["sentence2"].tolist()[0] == "A cat, sitting."
    assert pairs["sentence1"].tolist()[1] == "Two\nlines"
    assert set(pairs["task"]) == {"my-pairs"} and set(pairs["subset"]) == {"my-pairs"}
    assert set(pairs["split"]) == {"test"} and set(pairs["source"]) == {str(path)}


def test_tsv_with_optional_task_subset_split_columns(tmp_path: Path) -> None:
    path = tmp_path / "pairs.tsv"
    path.write_text(
        "sentence1\tsentence2\tscore\ttask\tsubset\tsplit\n"
        "a\tb\t1\tT1\tnews\ttrain\n"
        "c\td\t2\tT1\t\tvalidation\n",
        encoding="utf-8",
    )
    pairs = load_pairs(f"file:{path}")
    assert pairs[["task", "subset", "split"]].values.tolist() == [["T1", "news", "train"], ["T1", "T1", "dev"]]


def test_jsonl_lines_skip_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "pairs.jsonl"
    rows = [{"sentence1": "a", "sentence2": "b", "score": 3}, {"sentence1": "c", "sentence2": "d", "score": 4.5, "split": "train"}]
    path.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n", encoding="utf-8")
    pairs = load_pairs(f"file:{path}")
    assert pairs["line"].tolist() == [1, 3]
    assert pairs["split"].tolist() == ["test", "train"]
    assert pairs["score"].tolist() == [3.0, 4.5]


def test_parquet_rows_numbered_from_one(tmp_path: Path) -> None:
    path = tmp_path / "p.parquet"
    pd.DataFrame({"sentence1": ["a", "b"], "sentence2": ["c", "d"], "score": [1.0, 2.0]}).to_parquet(path)
    pairs = load_pairs(f"file:{path}")
    assert pairs["line"].tolist() == [1, 2] and pairs["task"].tolist() == ["p", "p"]


def test_missing_column_names_file_and_field(tmp_path: Path) -> None:
    path = tmp_path / "pairs.csv"
    path.write_text("sentence1,sentence2,label\na,b,1\n", encoding="utf-8")
    with pytest.raises(DataError, match=_at(path) + r"missing column\(s\) score"):
        load_pairs(f"file:{path}")


def test_non_numeric_and_missing_scores_name_the_line(tmp_path: Path) -> None:
    csv_path = tmp_path / "pairs.csv"
    csv_path.write_text("sentence1,sentence2,score\na,b,1\nc,d,five\n", encoding="utf-8")
    with pytest.raises(DataError, match=_at(csv_path, 3) + r"score 'five' is not a number$"):
        load_pairs(f"file:{csv_path}")
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text('{"sentence1": "a", "sentence2": "b", "score": 1}\n{"sentence1": "a", "sentence2": "b"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=_at(jsonl, 2) + r"score is missing"):
        load_pairs(f"file:{jsonl}")


def test_wrong_column_count_and_bad_json(tmp_path: Path) -> None:
    csv_path = tmp_path / "pairs.csv"
    csv_path.write_text("sentence1,sentence2,score\na,b,1,extra\n", encoding="utf-8")
    with pytest.raises(DataError, match=_at(csv_path, 2) + r"expected 3 columns like the header, found 4$"):
        load_pairs(f"file:{csv_path}")
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text('{"sentence1": "a", "sentence2": "b", "score": 1}\n{"sentence1": "a",\n', encoding="utf-8")
    with pytest.raises(DataError, match=_at(jsonl, 2) + r"invalid JSON"):
        load_pairs(f"file:{jsonl}")


def test_non_text_sentence_and_bad_split(tmp_path: Path) -> None:
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text('{"sentence1": 3, "sentence2": "b", "score": 1}\n', encoding="utf-8")
    with pytest.raises(DataError, match=_at(jsonl, 1) + r"sentence1 is 3, not text"):
        load_pairs(f"file:{jsonl}")
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("sentence1\tsentence2\tscore\tsplit\na\tb\t1\tholdout\n", encoding="utf-8")
    with pytest.raises(DataError, match=_at(tsv, 2) + r"split 'holdout' is not one of train, dev, test"):
        load_pairs(f"file:{tsv}")


def test_missing_file_unsupported_type_and_undecodable_bytes(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=_at(tmp_path / "none.csv") + "file not found"):
        load_pairs(f"file:{tmp_path / 'none.csv'}")
    (tmp_path / "pairs.xlsx").write_bytes(b"")
    with pytest.raises(DataError, match=r"unsupported file type '\.xlsx'"):
        load_pairs(f"file:{tmp_path / 'pairs.xlsx'}")
    path = tmp_path / "bad.csv"
    path.write_bytes(b"sentence1,sentence2,score\na,b,1\n\xff,c,2\n")
    with pytest.raises(DataError, match=_at(path, 3) + "bytes are not valid utf-8"):
        load_pairs(f"file:{path}")


# --- spec dispatch -----------------------------------------------------------------------------


def test_comma_separated_specs_are_concatenated_in_order(format_samples: Path, tmp_path: Path) -> None:
    path = tmp_path / "extra.csv"
    path.write_text("sentence1,sentence2,score\na,b,1\n", encoding="utf-8")
    pairs = load_pairs(f"senteval:{format_samples}, file:{path}")
    assert len(pairs) == 14
    assert pairs.iloc[-1]["task"] == "extra" and pairs.index.tolist() == list(range(14))


@pytest.mark.parametrize("spec", ["s3:bucket/x", "senteval", "file:", "senteval:/x,,file:/y"])
def test_unknown_or_malformed_spec(spec: str) -> None:
    with pytest.raises(DataError, match="use senteval:DIR, hf:ID, hf-disk:DIR or file:PATH"):
        load_pairs(spec)


# --- Hugging Face datasets -----------------------------------------------------------------------


def _dataset_dict():
    import datasets

    def split(offset: int, n: int) -> datasets.Dataset:
        return datasets.Dataset.from_dict(
            {
                "sentence1": [f"first {offset + i}" for i in range(n)],
                "sentence2": [f"second {offset + i}" for i in range(n)],
                "score": [float(i % 6) for i in range(n)],
            }
        )

    return datasets.DatasetDict({"train": split(0, 3), "validation": split(10, 2), "test": split(20, 2)})


def test_hf_disk_dataset_dict(tmp_path: Path) -> None:
    directory = tmp_path / "my-sts"
    _dataset_dict().save_to_disk(str(directory))
    pairs = load_pairs(f"hf-disk:{directory}")
    assert pairs.groupby("split", sort=False).size().to_dict() == {"train": 3, "dev": 2, "test": 2}
    assert set(pairs["task"]) == {"my-sts"}
    dev = pairs.query("split == 'dev'")
    assert dev["source"].tolist() == [f"hf-disk:{directory}/validation"] * 2
    assert dev["line"].tolist() == [1, 2] and dev["sentence1"].tolist() == ["first 10", "first 11"]


def test_hf_disk_single_dataset_and_missing_column(tmp_path: Path) -> None:
    data = _dataset_dict()
    data["test"].save_to_disk(str(tmp_path / "single"))
    assert load_pairs(f"hf-disk:{tmp_path / 'single'}")["split"].tolist() == ["test", "test"]
    data["train"].remove_columns("score").save_to_disk(str(tmp_path / "noscore"))
    with pytest.raises(DataError, match=re.escape(f"hf-disk:{tmp_path / 'noscore'}/") + r".*missing column\(s\) score"):
        load_pairs(f"hf-disk:{tmp_path / 'noscore'}")
    with pytest.raises(DataError, match="directory not found"):
        load_pairs(f"hf-disk:{tmp_path / 'absent'}")


def test_hf_known_ids_map_to_task_names(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    # Stand in for the network only: load_dataset returns a real, locally built DatasetDict.
    monkeypatch.setattr(datasets, "load_dataset", lambda dataset_id: _dataset_dict())
    stsb = load_pairs("hf:mteb/stsbenchmark-sts")
    assert set(stsb["task"]) == {"STSBenchmark"} and set(stsb["split"]) == {"train", "dev", "test"}
    assert stsb.iloc[0]["source"] == "hf:mteb/stsbenchmark-sts/train"
    assert set(load_pairs("hf:someone/other-sts")["task"]) == {"someone/other-sts"}
    assert hub.HUB_TASKS["mteb/sickr-sts"] == "SICKRelatedness"


@pytest.mark.skipif(os.environ.get("HF_HUB_OFFLINE") != "1", reason="needs HF_HUB_OFFLINE=1 to fail fast")
def test_hf_offline_error_points_at_local_data() -> None:
    with pytest.raises(DataError) as error:
        load_pairs("hf:mteb/stsbenchmark-sts")
    message = str(error.value)
    assert message.startswith("hf:mteb/stsbenchmark-sts: ")
    assert "senteval:DIR" in message and "file:PATH" in message
