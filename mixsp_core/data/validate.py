"""Data validation with great-expectations 1.x: suites for the pairs table and the sentence corpus.

Failures (critical expectations) make ``report.success`` False; duplicates and train/eval overlap
are warnings: reported, never failing. Every issue lists up to ``max_examples`` offending rows with
their origin (``source:line``). great-expectations is imported inside the functions: it takes
several seconds to import and only validation needs it.
"""

from __future__ import annotations

import math
import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

import pandas as pd

from mixsp_core.data.table import PAIR_COLUMNS, SCORE_RANGE, SPLITS
from mixsp_core.errors import MixSPError

_OVERLAP_COLUMN = "train_eval_overlap"
_EXAMPLE_TEXT_CHARS = 100


class DataValidationError(MixSPError):
    """Validation found failures; the message names each failing check with example rows and origins."""

    exit_code = 1  # the CLI's "the check ran and said no", as `mixsp validate` on invalid data

    def __init__(self, report: ValidationReport):
        self.report = report
        lines = [f"validation of {report.name} failed ({len(report.failures)} of {report.checks} checks):"]
        for issue in report.failures:
            lines.append(f"- {issue.summary()}")
            lines.extend(f"    {_describe_example(example)}" for example in issue.examples)
        super().__init__("\n".join(lines))


@dataclass
class ValidationIssue:
    """One expectation that did not hold: what was checked, how many rows broke it, a few of them."""

    check: str
    expectation: str
    column: str | None
    severity: str  # "failure" or "warning"
    count: int | None  # offending rows; None when the check is about the table (a missing column)
    examples: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None  # set when the expectation itself could not be evaluated

    def summary(self) -> str:
        """One line: check, expectation and column, row count or error."""
        where = f"{self.expectation}" + (f" on {self.column}" if self.column else "")
        if self.error:
            return f"{self.check} [{where}]: could not be evaluated: {self.error}"
        rows = "" if self.count is None else f": {self.count} row(s)"
        return f"{self.check} [{where}]{rows}"


@dataclass
class ValidationReport:
    """What a validation run found; ``success`` is False when any failure (not warning) was found."""

    name: str
    rows: int
    checks: int
    failures: list[ValidationIssue]
    warnings: list[ValidationIssue]
    elapsed_s: float

    @property
    def success(self) -> bool:
        return not self.failures

    def raise_for_failures(self) -> None:
        """Raise ``DataValidationError`` when there are failures; warnings never raise."""
        if self.failures:
            raise DataValidationError(self)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable summary (issues with their examples)."""
        return {
            "name": self.name,
            "success": self.success,
            "rows": self.rows,
            "checks": self.checks,
            "elapsed_s": round(self.elapsed_s, 3),
            "failures": [asdict(issue) for issue in self.failures],
            "warnings": [asdict(issue) for issue in self.warnings],
        }

    def to_markdown(self) -> str:
        """A short Markdown report: verdict, counts, a table of issues, then example rows."""
        verdict = "passed" if self.success else "FAILED"
        lines = [
            f"### Data validation: {self.name}: {verdict}",
            "",
            f"{self.rows} rows, {self.checks} checks, {len(self.failures)} failed, "
            f"{len(self.warnings)} warning(s), {self.elapsed_s:.2f} s.",
        ]
        issues = self.failures + self.warnings
        if not issues:
            return "\n".join(lines) + "\n"
        lines += ["", "| severity | check | expectation | column | rows |", "| --- | --- | --- | --- | --- |"]
        for issue in issues:
            count = issue.error or ("" if issue.count is None else str(issue.count))
            lines.append(
                f"| {issue.severity} | {_cell(issue.check)} | `{issue.expectation}` | {_cell(issue.column or '')} | {_cell(count)} |"
            )
        for issue in issues:
            if issue.examples:
                lines += ["", f"Examples for *{_cell(issue.check)}*:", ""]
                lines.extend(f"- {_cell(_describe_example(example))}" for example in issue.examples)
        return "\n".join(lines) + "\n"


def validate_pairs(df: pd.DataFrame, name: str, *, max_examples: int = 5) -> ValidationReport:
    """Validate a pairs table (``mixsp_core.data.table`` contract).

    Failures: no rows at all, a ``PAIR_COLUMNS`` column missing, null values, sentences not text or empty /
    whitespace-only, score not numeric or outside 0-5 (NaN and infinities included), split not
    train/dev/test, line < 1. Warnings: the same pair twice within a task and split; a train
    pair that also occurs (in either order) in a dev or test split.
    """
    started = time.perf_counter()
    frame = df.reset_index(drop=True)
    present = set(frame.columns)
    if {"sentence1", "sentence2", "split"} <= present:
        frame = frame.assign(**{_OVERLAP_COLUMN: _train_eval_overlap(frame)})

    gx = _import_gx()
    expect = gx.expectations
    checks: list[Any] = [expect.ExpectColumnToExist(column=column, meta={"check": f"column {column} present"}) for column in PAIR_COLUMNS]
    checks.append(expect.ExpectTableRowCountToBeBetween(min_value=1, meta={"check": "table has at least one pair"}))
    for column in (column for column in PAIR_COLUMNS if column in present):
        checks.append(expect.ExpectColumnValuesToNotBeNull(column=column, meta={"check": f"{column} has no missing values"}))
    for column in ("sentence1", "sentence2"):
        if column in present:
            checks += [
                expect.ExpectColumnValuesToBeOfType(column=column, type_="str", meta={"check": f"{column} is text"}),
                expect.ExpectColumnValuesToNotMatchRegex(
                    column=column, regex=r"^\s*$", meta={"check": f"{column} is not empty or whitespace-only"}
                ),
            ]
    if "score" in present:
        low, high = SCORE_RANGE
        if pd.api.types.is_numeric_dtype(frame["score"]):
            checks.append(
                expect.ExpectColumnValuesToBeBetween(
                    column="score", min_value=low, max_value=high, meta={"check": f"score is finite and within {low:g}-{high:g}"}
                )
            )
        else:  # comparing text with numbers would only raise; report the type instead
            checks.append(
                expect.ExpectColumnValuesToBeInTypeList(
                    column="score", type_list=["float", "int", "float64", "float32", "int64"], meta={"check": "score is numeric"}
                )
            )
    if "split" in present:
        checks.append(expect.ExpectColumnValuesToBeInSet(column="split", value_set=list(SPLITS), meta={"check": "split is train, dev or test"}))
    if "line" in present and pd.api.types.is_numeric_dtype(frame["line"]):
        checks.append(expect.ExpectColumnValuesToBeBetween(column="line", min_value=1, meta={"check": "line is a 1-based line number"}))
    keys = [column for column in ("task", "split", "sentence1", "sentence2") if column in present]
    if {"sentence1", "sentence2"} <= set(keys):
        checks.append(
            expect.ExpectCompoundColumnsToBeUnique(
                column_list=keys, severity="warning", meta={"check": "pair occurs once per task and split"}
            )
        )
    if _OVERLAP_COLUMN in frame.columns:
        checks.append(
            expect.ExpectColumnValuesToBeInSet(
                column=_OVERLAP_COLUMN, value_set=[False], severity="warning",
                meta={"check": "train pair does not also occur in a dev/test split"},
            )
        )
    return _report(gx, frame, name, checks, max_examples, started, origin=_pair_origin)


def validate_corpus(sentences: list[str], name: str = "corpus", *, max_examples: int = 5) -> ValidationReport:
    """Validate a sentence corpus (one sentence per line of file ``name``).

    Failures: no sentences at all; missing, non-text, empty / whitespace-only sentences, or sentences containing a line
    break. Warning: duplicate sentences. Examples carry ``name:line``.
    """
    started = time.perf_counter()
    frame = pd.DataFrame({"sentence": pd.Series(list(sentences), dtype=object)})
    frame["line"] = range(1, len(frame) + 1)
    gx = _import_gx()
    expect = gx.expectations
    checks = [
        expect.ExpectTableRowCountToBeBetween(min_value=1, meta={"check": "corpus has at least one sentence"}),
        expect.ExpectColumnValuesToNotBeNull(column="sentence", meta={"check": "no missing sentences"}),
        expect.ExpectColumnValuesToBeOfType(column="sentence", type_="str", meta={"check": "sentence is text"}),
        expect.ExpectColumnValuesToNotMatchRegex(column="sentence", regex=r"^\s*$", meta={"check": "sentence is not empty or whitespace-only"}),
        expect.ExpectColumnValuesToNotMatchRegex(column="sentence", regex=r"[\r\n]", meta={"check": "sentence has no line break"}),
        expect.ExpectColumnValuesToBeUnique(column="sentence", severity="warning", meta={"check": "sentence occurs once"}),
    ]

    def origin(row: pd.Series) -> dict[str, Any]:
        return {"origin": f"{name}:{row['line']}", "sentence": _short(row["sentence"])}

    return _report(gx, frame, name, checks, max_examples, started, origin=origin)


def _import_gx() -> Any:
    """Import great-expectations with analytics off (no network calls from a validation run)."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx

    return gx


def _run_suite(gx: Any, frame: pd.DataFrame, checks: list[Any]) -> list[Any]:
    """Run ``checks`` on the whole frame in a fresh ephemeral context; the per-expectation results."""
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    tag = uuid.uuid4().hex[:8]  # names only need to be unique within this context
    batch = context.data_sources.add_pandas(f"pairs-{tag}").add_dataframe_asset(f"frame-{tag}")
    suite = context.suites.add(gx.ExpectationSuite(name=f"suite-{tag}"))
    for check in checks:
        suite.add_expectation(check)
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(data=batch.add_batch_definition_whole_dataframe(f"all-{tag}"), suite=suite, name=f"validation-{tag}")
    )
    result = definition.run(batch_parameters={"dataframe": frame}, result_format={"result_format": "SUMMARY", "partial_unexpected_count": 20})
    return list(result.results)


def _report(gx: Any, frame: pd.DataFrame, name: str, checks: list[Any], max_examples: int, started: float, origin: Any) -> ValidationReport:
    """Run the checks and turn GX results into a ``ValidationReport`` (issues in suite order)."""
    order = {check.meta["check"]: position for position, check in enumerate(checks)}
    failures: list[ValidationIssue] = []
    warnings: list[ValidationIssue] = []
    for result in sorted(_run_suite(gx, frame, checks), key=lambda r: order.get(r.expectation_config.meta["check"], 0)):
        if result.success:
            continue
        config = result.expectation_config
        warning = str(getattr(config.severity, "value", config.severity)) == "warning"
        kwargs = config.kwargs
        column = kwargs.get("column") or (", ".join(kwargs["column_list"]) if kwargs.get("column_list") else None)
        indices = result.result.get("partial_unexpected_index_list") or []
        issue = ValidationIssue(
            check=config.meta["check"],
            expectation=config.type,
            column=column,
            severity="warning" if warning else "failure",
            count=result.result.get("unexpected_count"),
            examples=[origin(frame.iloc[int(index)]) for index in indices[:max_examples]],
            error=_exception_message(result.exception_info),
        )
        (warnings if warning else failures).append(issue)
    return ValidationReport(
        name=name, rows=len(frame), checks=len(checks), failures=failures, warnings=warnings,
        elapsed_s=time.perf_counter() - started,
    )


def _train_eval_overlap(frame: pd.DataFrame) -> pd.Series:
    """True for train rows whose unordered sentence pair also occurs in a dev or test row."""
    first = frame["sentence1"].astype(str)
    second = frame["sentence2"].astype(str)
    swap = first > second
    key = first.where(~swap, second) + "\x1f" + second.where(~swap, first)
    is_train = frame["split"] == "train"
    evaluated = set(key[frame["split"].isin(["dev", "test"])])
    return is_train & key.isin(evaluated)


def _pair_origin(row: pd.Series) -> dict[str, Any]:
    """An example row of a pairs table: its origin and the fields worth reading."""
    example: dict[str, Any] = {"origin": f"{row.get('source', '?')}:{row.get('line', '?')}"}
    for column in ("task", "split", "sentence1", "sentence2", "score"):
        if column in row.index:
            example[column] = _short(row[column])
    return example


def _short(value: Any) -> Any:
    """JSON-safe, shortened cell value for reports (NaN and infinities become strings)."""
    if isinstance(value, str):
        return value if len(value) <= _EXAMPLE_TEXT_CHARS else value[: _EXAMPLE_TEXT_CHARS - 3] + "..."
    if value is None:
        return None
    if isinstance(value, (int, float)) or hasattr(value, "item"):
        number = value.item() if hasattr(value, "item") else value
        if isinstance(number, float) and not math.isfinite(number):
            return str(number)
        return number
    return repr(value)


def _describe_example(example: dict[str, Any]) -> str:
    """``origin: field=value, ...`` for messages."""
    rest = ", ".join(f"{key}={value!r}" for key, value in example.items() if key != "origin")
    return f"{example.get('origin', '?')}: {rest}"


def _exception_message(info: Any) -> str | None:
    """The message of an exception raised while evaluating an expectation (GX nests it per metric)."""
    if not isinstance(info, dict):
        return None
    if "raised_exception" in info:
        return str(info.get("exception_message")) if info.get("raised_exception") else None
    for nested in info.values():
        message = _exception_message(nested)
        if message:
            return message
    return None


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")
