"""great-expectations validation of pairs and corpora: real shared data passes, corrupted copies fail
with the offending rows' origins."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from mixsp_core.data import DataValidationError, load_pairs, validate_corpus, validate_pairs
from mixsp_core.errors import MixSPError


@pytest.fixture(scope="module")
def shared_pairs(senteval_dir: Path) -> pd.DataFrame:
    return load_pairs(f"senteval:{senteval_dir}")


def _checks(issues) -> set[str]:
    return {issue.check for issue in issues}


def test_real_shared_data_passes_with_warnings(shared_pairs: pd.DataFrame) -> None:
    report = validate_pairs(shared_pairs, "shared")
    assert report.success and not report.failures
    report.raise_for_failures()  # warnings never raise
    assert report.rows == len(shared_pairs) == 12249
    # STS-B train repeats some pairs and shares a few with STS-B dev: reported, not failing.
    assert _checks(report.warnings) == {
        "pair occurs once per task and split",
        "train pair does not also occur in a dev/test split",
    }
    overlap = next(issue for issue in report.warnings if issue.column == "train_eval_overlap")
    assert overlap.count and all(example["split"] == "train" for example in overlap.examples)
    assert "passed" in report.to_markdown()


def test_corrupted_copy_fails_with_origins(shared_pairs: pd.DataFrame) -> None:
    corrupted = shared_pairs.copy()
    corrupted.loc[3, "score"] = 7.5
    corrupted.loc[4, "score"] = math.nan
    corrupted.loc[5, "score"] = math.inf
    corrupted.loc[10, "sentence1"] = "   "
    corrupted.loc[11, "sentence2"] = ""
    corrupted.loc[12, "split"] = "holdout"
    report = validate_pairs(corrupted, "corrupted")
    assert not report.success
    by_check = {issue.check: issue for issue in report.failures}
    assert set(by_check) == {
        "score is finite and within 0-5",
        "score has no missing values",
        "sentence1 is not empty or whitespace-only",
        "sentence2 is not empty or whitespace-only",
        "split is train, dev or test",
    }
    out_of_range = by_check["score is finite and within 0-5"]
    assert out_of_range.count == 2
    train_file = shared_pairs.loc[0, "source"]
    assert [example["origin"] for example in out_of_range.examples] == [f"{train_file}:4", f"{train_file}:6"]
    assert by_check["sentence1 is not empty or whitespace-only"].examples[0]["origin"] == f"{train_file}:11"

    with pytest.raises(DataValidationError) as error:
        report.raise_for_failures()
    assert isinstance(error.value, MixSPError) and error.value.report is report
    message = str(error.value)
    assert "validation of corrupted failed" in message
    assert "expect_column_values_to_be_between on score" in message and f"{train_file}:4" in message
    assert "expect_column_values_to_not_match_regex on sentence2" in message and f"{train_file}:12" in message

    as_dict = json.loads(json.dumps(report.to_dict()))
    assert as_dict["success"] is False and len(as_dict["failures"]) == 5
    assert "inf" in json.dumps(as_dict)  # non-finite scores are shown as text, keeping the JSON valid
    markdown = report.to_markdown()
    assert "FAILED" in markdown and "| failure | score is finite and within 0-5 |" in markdown


def test_examples_are_capped(shared_pairs: pd.DataFrame) -> None:
    corrupted = shared_pairs.copy()
    corrupted.loc[:19, "score"] = -1.0
    report = validate_pairs(corrupted, "capped", max_examples=3)
    (issue,) = report.failures
    assert issue.count == 20 and len(issue.examples) == 3


def test_missing_and_non_numeric_columns() -> None:
    frame = pd.DataFrame({"sentence1": ["a"], "sentence2": ["b"], "score": ["high"], "task": ["T"], "subset": ["T"], "split": ["test"]})
    report = validate_pairs(frame, "partial")
    checks = _checks(report.failures)
    assert {"column source present", "column line present", "score is numeric"} <= checks
    missing = next(issue for issue in report.failures if issue.check == "column line present")
    assert missing.count is None and missing.expectation == "expect_column_to_exist"


def test_pairs_file_errors_are_traced_to_physical_lines(tmp_path: Path) -> None:
    path = tmp_path / "user.csv"
    path.write_text("sentence1,sentence2,score,split\nok,fine,2,train\n,empty first,3,train\nok,too high,9,test\n", encoding="utf-8")
    report = validate_pairs(load_pairs(f"file:{path}"), "user")
    origins = {issue.check: [example["origin"] for example in issue.examples] for issue in report.failures}
    assert origins == {
        "sentence1 is not empty or whitespace-only": [f"{path}:3"],
        "score is finite and within 0-5": [f"{path}:4"],
    }


def test_duplicates_within_split_are_warnings_only(tmp_path: Path) -> None:
    path = tmp_path / "dups.csv"
    path.write_text("sentence1,sentence2,score,split\na,b,1,train\na,b,1,train\nb,a,2,dev\n", encoding="utf-8")
    report = validate_pairs(load_pairs(f"file:{path}"), "dups")
    assert report.success
    warnings = {issue.check: issue for issue in report.warnings}
    assert warnings["pair occurs once per task and split"].count == 2
    # The train pair (a, b) occurs reversed in dev: both train rows overlap.
    assert warnings["train pair does not also occur in a dev/test split"].count == 2


def test_validate_corpus() -> None:
    assert validate_corpus(["one.", "two."], "corpus.txt").success
    report = validate_corpus(["one.", " ", "two\nlines", "one."], "corpus.txt")
    assert {issue.check: [e["origin"] for e in issue.examples] for issue in report.failures} == {
        "sentence is not empty or whitespace-only": ["corpus.txt:2"],
        "sentence has no line break": ["corpus.txt:3"],
    }
    assert [issue.check for issue in report.warnings] == ["sentence occurs once"]
    with pytest.raises(DataValidationError, match="corpus.txt:3"):
        report.raise_for_failures()
