"""Data stage (group ``prepare``): the STS pairs table and the unlabeled sentence corpus.

Thin wrappers over mixsp_core: each asset loads, runs its blocking great-expectations check, and
writes its artifact (atomically) only when the check passes.
"""

# No `from __future__ import annotations` here: Dagster reads the config class from the real annotation.

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import dagster as dg

from pipelines.defs.checks import CORPUS_VALID, PAIRS_VALID, validation_check_result
from pipelines.defs.resources import PathsResource
from pipelines.fingerprint import files_fingerprint, spec_fingerprint
from pipelines.metadata import file_metadata, markdown_table
from pipelines.params import pipeline_params

_DATA = pipeline_params().data


class PairsConfig(dg.Config):
    """Which STS data to read (params.yaml ``data.spec``)."""

    spec: str = _DATA.spec

    def resolved_spec(self) -> str:
        """``auto`` becomes the shared SentEval folder when present, else the Hub datasets."""
        return dataclasses.replace(_DATA, spec=self.spec).resolved_spec()


class CorpusConfig(dg.Config):
    """Unlabeled corpus (params.yaml ``data.corpus_files``, ``max_corpus_sentences``, ``seed``).

    ``corpus_files`` None means ``auto``: the SentEval classification corpora when present.
    """

    corpus_files: list[str] | None = None if _DATA.corpus_files == "auto" else list(_DATA.corpus_files)
    max_sentences: int = _DATA.max_corpus_sentences
    seed: int = _DATA.seed

    def resolved_files(self) -> list:
        """Paths or ``CorpusFile``s (auto: the SentEval corpora with their line formats)."""
        files = "auto" if self.corpus_files is None else self.corpus_files
        return dataclasses.replace(_DATA, corpus_files=files).resolved_corpus_files()


@dg.asset(
    group_name="prepare",
    kinds={"pandas", "parquet"},
    check_specs=[PAIRS_VALID],
    output_required=False,  # a failed blocking check yields no materialisation and nothing is written
    description="STS pairs from the configured source(s), validated; written to data/pairs/pairs.parquet.",
)
def sts_pairs(context: dg.AssetExecutionContext, config: PairsConfig,
              paths: PathsResource) -> Iterator[dg.AssetCheckResult | dg.MaterializeResult]:
    from mixsp_core.data.sources import load_pairs
    from mixsp_core.data.validate import validate_pairs
    from mixsp_core.stages import write_pairs

    spec = config.resolved_spec()
    context.log.info(f"reading pairs from {spec}")
    source_hash = spec_fingerprint(spec)  # before reading: a change during the run shows up next time
    pairs = load_pairs(spec)
    report = validate_pairs(pairs, name=spec)
    yield validation_check_result(PAIRS_VALID, report)
    if not report.success:
        context.log.error(f"pairs from {spec} failed validation; {paths.pipeline_paths().pairs} left as it was")
        return
    out = write_pairs(pairs, paths.pipeline_paths())
    counts = pairs.groupby(["task", "split"]).size()
    yield dg.MaterializeResult(metadata={
        "dagster/row_count": len(pairs),
        "data_spec": spec,
        "source_hash": source_hash,  # the sensor compares the source data against this
        "counts": dg.MetadataValue.md(markdown_table(["task", "split", "pairs"],
                                                     [[t, s, int(n)] for (t, s), n in counts.items()])),
        **{f"rows/{task}/{split}": int(n) for (task, split), n in counts.items()},
        **file_metadata(out),
    })


@dg.asset(
    group_name="prepare",
    kinds={"text"},
    deps=[sts_pairs],
    check_specs=[CORPUS_VALID],
    output_required=False,
    description="Unlabeled sentences for distillation: training pairs' sentences, then the text files; "
                "de-duplicated and capped. Written to data/corpus/corpus.txt.",
)
def sentence_corpus(context: dg.AssetExecutionContext, config: CorpusConfig,
                    paths: PathsResource) -> Iterator[dg.AssetCheckResult | dg.MaterializeResult]:
    from mixsp_core.data.corpus import build_corpus
    from mixsp_core.data.validate import validate_corpus
    from mixsp_core.stages import read_pairs, write_corpus_file

    files = config.resolved_files()
    source_hash = files_fingerprint(files)
    pairs = read_pairs(paths.pipeline_paths())
    corpus = build_corpus(pairs, files, max_sentences=config.max_sentences, seed=config.seed)
    report = validate_corpus(corpus)
    yield validation_check_result(CORPUS_VALID, report)
    if not report.success:
        context.log.error(f"corpus failed validation; {paths.pipeline_paths().corpus} left as it was")
        return
    out = write_corpus_file(corpus, paths.pipeline_paths())
    preview = markdown_table(["#", "sentence"], [[i + 1, s.replace("|", "\\|")] for i, s in enumerate(corpus[:5])])
    yield dg.MaterializeResult(metadata={
        "dagster/row_count": len(corpus),
        "sentences": len(corpus),
        "max_sentences": config.max_sentences,
        "text_files": dg.MetadataValue.md("\n".join(f"- `{getattr(f, 'path', f)}`" for f in files) or "(none)"),
        "source_hash": source_hash,
        "preview": dg.MetadataValue.md(preview),
        **file_metadata(out),
    })
