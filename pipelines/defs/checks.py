"""Asset checks.

Data checks (great-expectations suites) are *blocking* and run inside their asset, before it writes:
a failing suite records a failed check, leaves the previous artifact on disk untouched, and stops the
run, so the teacher never encodes bad data. Model checks (stage 2) are separate ``@asset_check``s.
"""

from __future__ import annotations

from typing import Any, Protocol

import dagster as dg

PAIRS_VALID = dg.AssetCheckSpec(
    name="pairs_valid",
    asset="sts_pairs",
    blocking=True,
    description="great-expectations suite on the pairs table (columns, nulls, empty text, score range, duplicates).",
)
CORPUS_VALID = dg.AssetCheckSpec(
    name="corpus_valid",
    asset="sentence_corpus",
    blocking=True,
    description="great-expectations suite on the sentence corpus (no empty sentences, no duplicates).",
)


class ValidationReportLike(Protocol):
    """What mixsp_core.data.validate returns."""

    success: bool

    def to_markdown(self) -> str: ...

    def to_dict(self) -> dict[str, Any]: ...


def validation_check_result(spec: dg.AssetCheckSpec, report: ValidationReportLike) -> dg.AssetCheckResult:
    """Turn a validation report into the check's result (ERROR severity, so a failure blocks downstream)."""
    summary = report.to_dict()
    failures = summary.get("failures") or []
    return dg.AssetCheckResult(
        check_name=spec.name,
        asset_key=spec.asset_key,
        passed=bool(report.success),
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={
            "report": dg.MetadataValue.md(report.to_markdown()),
            "failing_expectations": len(failures),
            "details": dg.MetadataValue.json(summary),
        },
    )
