"""STS evaluation: Spearman x100 of cosine similarity against gold, per task, as SentEval reports it.

STS12-16 use the "all" setting (every subset of a year concatenated); their pair-weighted mean over
subsets is reported beside it as ``{TASK}-wmean``. The headline ``avg7`` is the mean of the seven test
tasks and is null unless all seven are present. Model selection uses dev data only (``primary_metric``).

Given the pairs a model saw (``seen``: keys of :mod:`mixsp_core.evaluate.contamination`), every test task also
reports ``seen_pairs`` and ``unseen`` (its correlations on the pairs the model never saw), and the result
``avg7_unseen``: the number that measures generalisation rather than memory.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol

import numpy as np
import pandas as pd
from scipy.stats import pearsonr, spearmanr

from mixsp_core.data.table import eval_name
from mixsp_core.errors import DataError

SEVEN_TASKS = ("STS12", "STS13", "STS14", "STS15", "STS16", "STSBenchmark", "SICKRelatedness")
DEV_TASKS = ("STSBenchmark-dev", "SICK-trial")
YEARLY_TASKS = ("STS12", "STS13", "STS14", "STS15", "STS16")


class Embedder(Protocol):
    def encode(self, sentences: list[str], batch_size: int = ...) -> np.ndarray: ...


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two equally shaped matrices."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    num = np.einsum("ij,ij->i", a, b)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return num / np.maximum(den, 1e-12)


def correlations(predicted: np.ndarray, gold: np.ndarray) -> dict[str, float]:
    """Spearman and Pearson x100 of predictions against gold scores."""
    if len(gold) < 2:
        raise ValueError(f"need at least 2 pairs to correlate, got {len(gold)}")
    return {
        "spearman": float(spearmanr(predicted, gold).statistic * 100),
        "pearson": float(pearsonr(predicted, gold).statistic * 100),
    }


def score_table(pairs: pd.DataFrame, similarities: np.ndarray,
                seen: frozenset[str] | None = None) -> dict[str, dict[str, Any]]:
    """Correlations per evaluation name for a pairs table and one predicted similarity per row; with
    ``seen``, each test task's ``seen_pairs`` count and ``unseen`` correlations (None below 2 unseen pairs)."""
    frame = pairs.assign(_pred=np.asarray(similarities, dtype=np.float64),
                         _name=[eval_name(t, s) for t, s in zip(pairs["task"], pairs["split"])])
    if seen is not None:
        from mixsp_core.evaluate.contamination import seen_mask

        frame["_seen"] = seen_mask(frame, seen)
    tasks: dict[str, dict[str, Any]] = {}
    for name, group in frame.groupby("_name", sort=True):
        _check_correlatable(str(name), group)
        tasks[name] = {**correlations(group["_pred"].to_numpy(), group["score"].to_numpy()),
                       "pairs": int(len(group))}
        if seen is not None and (group["split"] == "test").all():
            unseen = group[~group["_seen"]]
            tasks[name]["seen_pairs"] = int(group["_seen"].sum())
            tasks[name]["unseen"] = ({**correlations(unseen["_pred"].to_numpy(), unseen["score"].to_numpy()),
                                      "pairs": int(len(unseen))} if len(unseen) >= 2 else None)
        if name in YEARLY_TASKS:
            tasks[f"{name}-wmean"] = _weighted_subset_mean(group)
    return tasks


def check_scorable(pairs: pd.DataFrame) -> None:
    """Refuse, before any encoding, a pairs table with a task that cannot be correlated (see
    :func:`score_table`): ``DataError`` naming the task and its file."""
    names = pd.Series([eval_name(t, s) for t, s in zip(pairs["task"], pairs["split"])], index=pairs.index)
    for name, group in pairs.groupby(names, sort=True):
        _check_correlatable(str(name), group)


def _check_correlatable(name: str, group: pd.DataFrame) -> None:
    """A task's gold scores must be able to correlate: at least 2 pairs, not all the same score (a
    correlation with a constant is NaN). Else ``DataError`` naming the task and its file(s)."""
    if len(group) >= 2 and group["score"].nunique() >= 2:
        return
    sources = list(dict.fromkeys(group["source"])) if "source" in group else ["<pairs>"]
    where = ", ".join(map(str, sources[:3])) + (f" (+{len(sources) - 3} more)" if len(sources) > 3 else "")
    if len(group) < 2:
        raise DataError(where, f"task {name} has {len(group)} pair; a correlation needs at least 2")
    raise DataError(where, f"task {name}: every gold score is {group['score'].iloc[0]:g}; a correlation with a "
                           "constant is undefined")


def _weighted_subset_mean(group: pd.DataFrame) -> dict[str, float]:
    # subsets that cannot correlate (one pair, one gold value) are left out rather than turning the mean NaN
    per_subset = [(correlations(g["_pred"].to_numpy(), g["score"].to_numpy()), len(g))
                  for _, g in group.groupby("subset") if len(g) >= 2 and g["score"].nunique() >= 2]
    total = sum(n for _, n in per_subset)
    if not total:
        return {"spearman": float("nan"), "pearson": float("nan"), "pairs": 0}
    return {
        "spearman": sum(c["spearman"] * n for c, n in per_subset) / total,
        "pearson": sum(c["pearson"] * n for c, n in per_subset) / total,
        "pairs": int(total),
    }


def summarise(model: str, tasks: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Wrap per-task results with the 7-task average and the dev primary metric."""
    avg7 = (float(np.mean([tasks[t]["spearman"] for t in SEVEN_TASKS]))
            if all(t in tasks for t in SEVEN_TASKS) else None)
    result: dict[str, Any] = {"model": model, "tasks": tasks, "avg7": avg7}
    if any("unseen" in row for row in tasks.values()):
        unseen = [tasks[t].get("unseen") for t in SEVEN_TASKS if t in tasks]
        result["avg7_unseen"] = (float(np.mean([u["spearman"] for u in unseen]))
                                 if len(unseen) == len(SEVEN_TASKS) and all(unseen) else None)
    result["dev"] = primary_metric(result)
    return result


def primary_metric(result: dict[str, Any]) -> float | None:
    """Mean Spearman of the dev tasks present (STS-B dev, SICK trial): the number models are selected on."""
    tasks = result["tasks"]
    return mean_dev_spearman({t: tasks[t]["spearman"] for t in DEV_TASKS if t in tasks})


def mean_dev_spearman(spearman: Mapping[str, float], dev_sets: Iterable[str] = DEV_TASKS) -> float | None:
    """The selection metric: the mean of ``spearman[name]`` over the ``dev_sets`` present, in their order;
    None when none is. The trainer passes its ``data.dev_sets`` (all scored), the evaluator the default."""
    present = [spearman[name] for name in dev_sets if name in spearman]
    return float(np.mean(present)) if present else None


def evaluate_embedder(embedder: Embedder, pairs: pd.DataFrame, model: str = "",
                      batch_size: int = 64, seen: frozenset[str] | None = None) -> dict[str, Any]:
    """Encode every unique sentence once, score each pair by cosine, and correlate with gold per task
    (with ``seen``: also on the test pairs outside it, see :func:`score_table`).

    A pair scorer (anything with ``predict(pairs: list[tuple[str, str]], batch_size) -> np.ndarray``, such
    as the `cross` MixSP model) is scored on the pairs directly instead.
    """
    if pairs.empty:
        raise ValueError("no pairs to evaluate")
    if hasattr(embedder, "predict") and not hasattr(embedder, "encode"):
        scores = embedder.predict(list(zip(pairs["sentence1"], pairs["sentence2"])), batch_size=batch_size)
        return summarise(model, score_table(pairs, scores, seen))
    unique = pd.unique(pd.concat([pairs["sentence1"], pairs["sentence2"]], ignore_index=True))
    vectors = embedder.encode(list(unique), batch_size=batch_size)
    row_of = {s: i for i, s in enumerate(unique)}
    left = vectors[[row_of[s] for s in pairs["sentence1"]]]
    right = vectors[[row_of[s] for s in pairs["sentence2"]]]
    return summarise(model, score_table(pairs, cosine_rows(left, right), seen))


def json_ready(data: Any) -> Any:
    """``data`` with every NaN / infinite float replaced by None, so ``json`` writes valid JSON (``null``)
    rather than the ``NaN`` token that strict parsers refuse; a correlation over constant predictions
    (all-equal or NaN vectors) is undefined, and null says so."""
    if isinstance(data, (float, np.floating)):
        return float(data) if np.isfinite(data) else None
    if isinstance(data, np.integer):
        return int(data)
    if isinstance(data, dict):
        return {key: json_ready(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [json_ready(value) for value in data]
    return data


def count_undefined(data: Any) -> int:
    """How many NaN / infinite floats ``data`` (nested dicts and lists) holds: what :func:`json_ready` nulls."""
    if isinstance(data, (float, np.floating)):
        return 0 if np.isfinite(data) else 1
    if isinstance(data, dict):
        return sum(count_undefined(value) for value in data.values())
    if isinstance(data, (list, tuple)):
        return sum(count_undefined(value) for value in data)
    return 0


def format_table(result: dict[str, Any]) -> str:
    """A markdown table of the per-task results plus the 7-task average and dev primary metric."""
    decontaminated = "avg7_unseen" in result
    extra_head = " seen pairs | Spearman, unseen pairs | unseen pairs |" if decontaminated else ""
    lines = ["| task | Spearman | Pearson | pairs |" + extra_head,
             "| --- | ---: | ---: | ---: |" + (" ---: | ---: | ---: |" if decontaminated else "")]
    for name, row in result["tasks"].items():
        cells = f"| {name} | {row['spearman']:.2f} | {row['pearson']:.2f} | {row['pairs']} |"
        if decontaminated:
            unseen = row.get("unseen")
            cells += (f" {row['seen_pairs']} | {unseen['spearman']:.2f} | {unseen['pairs']} |" if unseen
                      else f" {row.get('seen_pairs', '')} | {'n/a' if 'seen_pairs' in row else ''} | |")
        lines.append(cells)
    pad = " | | |" if decontaminated else ""
    avg7 = result.get("avg7")
    lines.append(f"| **avg7** | {avg7:.2f} | | |{pad}" if avg7 is not None
                 else f"| **avg7** | n/a (needs all 7 test sets) | | |{pad}")
    if decontaminated:
        unseen7 = result["avg7_unseen"]
        lines.append(f"| **avg7, unseen pairs only** | {unseen7:.2f} | | |{pad}" if unseen7 is not None
                     else f"| **avg7, unseen pairs only** | n/a (needs all 7 test sets) | | |{pad}")
    if result.get("dev") is not None:
        lines.append(f"| **dev (STS-B dev, SICK trial)** | {result['dev']:.2f} | | |{pad}")
    return "\n".join(lines)
