"""SentEval layouts: the format samples, the real shared files, and made-up files for each quirk and error."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mixsp_core.data.senteval import read_senteval, read_text_lines
from mixsp_core.data.table import PAIR_COLUMNS, eval_name, pair_counts_markdown
from mixsp_core.errors import DataError


def _at(path: Path, line: int) -> str:
    """Regex for the start of a ``path:line: `` error message."""
    return "^" + re.escape(f"{path}:{line}: ")


def _write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def _sts(root: Path, year: str, subset: str, inputs: str, gold: str) -> tuple[Path, Path]:
    folder = root / "STS" / f"{year}-en-test"
    return _write(folder / f"STS.input.{subset}.txt", inputs), _write(folder / f"STS.gs.{subset}.txt", gold)


STSB_LINE = "main-news\theadlines\t2015\t0001\t{score}\t{s1}\t{s2}\n"
SICK_HEADER = "pair_ID\tsentence_A\tsentence_B\trelatedness_score\tentailment_judgment\n"


# --- the shared format samples -------------------------------------------------------------------


def test_format_samples_counts_and_columns(format_samples: Path) -> None:
    pairs = read_senteval(format_samples)
    assert list(pairs.columns) == list(PAIR_COLUMNS)
    counts = pairs.groupby(["task", "split"]).size().to_dict()
    assert counts == {
        ("STS12", "test"): 3,
        ("STS16", "test"): 3,  # 4 input lines, one blank gold line
        ("STSBenchmark", "test"): 4,
        ("SICKRelatedness", "test"): 3,
    }
    assert str(pairs["score"].dtype) == "float64" and str(pairs["line"].dtype) == "int64"


def test_format_samples_sts16_blank_gold_skipped_and_extra_columns_dropped(format_samples: Path) -> None:
    sts16 = read_senteval(format_samples).query("task == 'STS16'")
    assert sts16["line"].tolist() == [1, 3, 4]  # line 2 has a blank gold score
    assert sts16["subset"].unique().tolist() == ["question-question"]
    first = sts16.iloc[0]
    assert first["sentence2"] == "What is the way to restart a home router?"  # not the source columns
    assert first["score"] == 4.0
    assert first["source"].endswith("STS16-en-test/STS.input.question-question.txt")


def test_format_samples_stsb_extra_columns(format_samples: Path) -> None:
    stsb = read_senteval(format_samples).query("task == 'STSBenchmark'").set_index("line")
    assert stsb.loc[3, "sentence1"] == "Rain delays the final match"
    assert stsb.loc[3, "sentence2"] == "Final match delayed by heavy rain"
    assert stsb.loc[3, "score"] == pytest.approx(3.8)
    assert stsb.loc[4, "score"] == 0.0


def test_format_samples_sick_header(format_samples: Path) -> None:
    sick = read_senteval(format_samples).query("task == 'SICKRelatedness'")
    assert sick["line"].tolist() == [2, 3, 4]  # line 1 is the header
    assert sick.iloc[0][["sentence1", "sentence2", "score"]].tolist() == [
        "A dog is running in the park",
        "A dog is playing in the park",
        4.1,
    ]


# --- the real shared files -------------------------------------------------------------------------


def test_real_shared_senteval_counts(senteval_dir: Path) -> None:
    pairs = read_senteval(senteval_dir)
    counts = pairs.groupby(["task", "split"]).size().to_dict()
    assert counts == {
        ("STSBenchmark", "train"): 5749,
        ("STSBenchmark", "dev"): 1500,
        ("SICKRelatedness", "train"): 4500,
        ("SICKRelatedness", "dev"): 500,
    }
    assert pairs["score"].between(0, 5).all()
    assert pairs.query("task == 'SICKRelatedness'")["score"].min() >= 1.0
    # Every STS-B row keeps its physical line: 1..5749 in the train file.
    train = pairs.query("task == 'STSBenchmark' and split == 'train'")
    assert train["line"].tolist() == list(range(1, 5750))
    table = pair_counts_markdown(pairs)
    assert "| SICKRelatedness | dev | SICK-trial | 500 |" in table and "| **all** | | | 12,249 |" in table


def test_eval_names() -> None:
    assert eval_name("STS12", "test") == "STS12"
    assert eval_name("STSBenchmark", "dev") == "STSBenchmark-dev"
    assert eval_name("SICKRelatedness", "dev") == "SICK-trial"
    assert eval_name("STSBenchmark", "train") == "STSBenchmark-train"
    assert eval_name("mydata", "dev") == "mydata-dev"


# --- made-up full layouts --------------------------------------------------------------------------


def test_full_layout_reads_every_year_subset_and_split(tmp_path: Path) -> None:
    _sts(tmp_path, "STS12", "MSRpar", "a\tb\nc\td\n", "1.0\n2.5\n")
    _sts(tmp_path, "STS12", "surprise.OnWN", "e\tf\n", "3\n")
    _sts(tmp_path, "STS15", "belief", "g\th\ni\tj\nk\tl\n", "\n4\n\n")
    _sts(tmp_path, "STS16", "headlines", "m\tn\tsrc1\tsrc2\n", "5\n")
    _write(tmp_path / "STS/STSBenchmark/sts-test.csv", STSB_LINE.format(score="2.0", s1="o", s2="p"))
    _write(tmp_path / "SICK/SICK_test_annotated.txt", SICK_HEADER + "1\tq\tr\t3.5\tNEUTRAL\n")
    _write(tmp_path / "SICK/SICK_trial.txt", SICK_HEADER + "1\ts\tt\t1.5\tNEUTRAL\n")
    pairs = read_senteval(tmp_path)
    assert pairs[["task", "subset", "split"]].drop_duplicates().values.tolist() == [
        ["STS12", "MSRpar", "test"],
        ["STS12", "surprise.OnWN", "test"],
        ["STS15", "belief", "test"],
        ["STS16", "headlines", "test"],
        ["STSBenchmark", "STSBenchmark", "test"],
        ["SICKRelatedness", "SICKRelatedness", "dev"],  # SICK trial is the dev split
        ["SICKRelatedness", "SICKRelatedness", "test"],
    ]
    belief = pairs.query("subset == 'belief'")
    assert belief[["sentence1", "line", "score"]].values.tolist() == [["i", 2, 4.0]]
    assert pairs.query("task == 'STS16'")["sentence2"].tolist() == ["n"]


def test_sts16_without_source_columns_is_accepted(tmp_path: Path) -> None:
    _sts(tmp_path, "STS16", "plagiarism", "a\tb\n", "2\n")
    assert read_senteval(tmp_path)["sentence2"].tolist() == ["b"]


def test_crlf_line_endings_and_quotes_kept_verbatim(tmp_path: Path) -> None:
    _write(
        tmp_path / "STS/STSBenchmark/sts-train.csv",
        STSB_LINE.format(score="1.0", s1='He said "hi', s2="it's \"quoted\"").replace("\n", "\r\n"),
    )
    row = read_senteval(tmp_path).iloc[0]
    assert (row["sentence1"], row["sentence2"]) == ('He said "hi', 'it\'s "quoted"')


# --- bad input: each error names path:line -----------------------------------------------------------


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="SentEval directory not found"):
        read_senteval(tmp_path / "nope")


def test_directory_without_sts_or_sick_files(tmp_path: Path) -> None:
    _write(tmp_path / "MR/rt-polarity.pos", "good film\n")
    with pytest.raises(DataError, match=r"no STS or SICK pairs found"):
        read_senteval(tmp_path)


def test_input_and_gold_line_counts_must_match(tmp_path: Path) -> None:
    inputs, gold = _sts(tmp_path, "STS13", "FNWN", "a\tb\nc\td\n", "1\n")
    with pytest.raises(DataError) as error:
        read_senteval(tmp_path)
    assert str(inputs) in str(error.value) and str(gold) in str(error.value)
    assert "2 lines" in str(error.value) and "has 1" in str(error.value)


def test_gold_file_missing(tmp_path: Path) -> None:
    inputs, gold = _sts(tmp_path, "STS14", "images", "a\tb\n", "1\n")
    gold.unlink()
    with pytest.raises(DataError, match=r"STS\.gs\.images\.txt: gold file missing"):
        read_senteval(tmp_path)


def test_sts_wrong_column_count(tmp_path: Path) -> None:
    inputs, _ = _sts(tmp_path, "STS12", "MSRvid", "a\tb\nc\td\te\n", "1\n2\n")
    with pytest.raises(DataError, match=_at(inputs, 2) + r"expected 2 tab-separated columns .*found 3$"):
        read_senteval(tmp_path)


def test_sts_non_numeric_gold(tmp_path: Path) -> None:
    _, gold = _sts(tmp_path, "STS12", "MSRvid", "a\tb\nc\td\n", "1\nabc\n")
    with pytest.raises(DataError, match=_at(gold, 2) + r"score 'abc' is not a number$"):
        read_senteval(tmp_path)


def test_sts_nan_gold(tmp_path: Path) -> None:
    _, gold = _sts(tmp_path, "STS15", "images", "a\tb\n", "nan\n")
    with pytest.raises(DataError, match=_at(gold, 1) + r"score 'nan' is not a finite number$"):
        read_senteval(tmp_path)


def test_stsb_wrong_column_count(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "STS/STSBenchmark/sts-dev.csv",
        STSB_LINE.format(score="1", s1="a", s2="b") + "main-news\theadlines\t2015\t0002\t2.0\tonly one\tx\ty\n",
    )
    with pytest.raises(DataError, match=_at(path, 2) + r"expected 7 or 9 tab-separated columns .*found 8$"):
        read_senteval(tmp_path)


def test_stsb_non_numeric_score(tmp_path: Path) -> None:
    path = _write(tmp_path / "STS/STSBenchmark/sts-train.csv", STSB_LINE.format(score="high", s1="a", s2="b"))
    with pytest.raises(DataError, match=_at(path, 1) + r"score 'high' is not a number$"):
        read_senteval(tmp_path)


def test_sick_without_header(tmp_path: Path) -> None:
    path = _write(tmp_path / "SICK/SICK_train.txt", "1\ta\tb\t3.0\tNEUTRAL\n")
    with pytest.raises(DataError, match=_at(path, 1) + r"header lacks sentence_A, sentence_B, relatedness_score"):
        read_senteval(tmp_path)


def test_sick_wrong_column_count(tmp_path: Path) -> None:
    path = _write(tmp_path / "SICK/SICK_train.txt", SICK_HEADER + "1\ta\tb\t3.0\tNEUTRAL\n2\ta\tb\t3.0\n")
    with pytest.raises(DataError, match=_at(path, 3) + r"expected 5 tab-separated columns like the header, found 4$"):
        read_senteval(tmp_path)


def test_undecodable_bytes_name_the_line(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "STS/STSBenchmark/sts-train.csv",
        STSB_LINE.format(score="1", s1="a", s2="b").encode() + b"x\tx\tx\tx\t1\tcaf\xe9\tb\n",
    )
    with pytest.raises(DataError, match=_at(path, 2) + r"bytes are not valid utf-8"):
        read_senteval(tmp_path)


def test_empty_sentence_is_read_and_left_to_validation(tmp_path: Path) -> None:
    _sts(tmp_path, "STS12", "MSRpar", "\tb\n", "1\n")
    assert read_senteval(tmp_path)["sentence1"].tolist() == [""]


def test_read_text_lines_keeps_unicode_separators_inside_lines(tmp_path: Path) -> None:
    path = _write(tmp_path / "f.txt", "\ufeffa\u2028b\nc\r\n")
    assert read_text_lines(path) == ["a\u2028b", "c"]
