"""Data stage (group ``prepare``): the STS pairs table and the unlabeled sentence corpus.

Thin wrappers over mixsp_core: each asset loads, runs its blocking great-expectations check, and
writes its artifact (atomically) only when the check passes.
"""

# No `from __future__ import annotations` here: Dagster reads the config class from the real annotation.

from collections.abc import Iterator

import dagster as dg

from pipelines.defs.checks import CORPUS_VALID, PAIRS_VALID, validation_check_result
from pipelines.defs.resources import PathsResource, pipeline_params
from pipelines.fingerprint import files_fingerprint, spec_fingerprint
from pipelines.metadata import file_metadata, markdown_table

_DATA = pipeline_params().data


class PairsConfig(dg.Config):
    """Which STS data to read (params.yaml ``data.spec``)."""

    spec: str = _DATA.spec


class CorpusConfig(dg.Config):
    """Unlabeled corpus (params.yaml ``data.corpus_files``, ``max_corpus_sentences``, ``seed``).

    ``corpus_files`` None means ``auto``: the SentEval classification corpora when present.
    """

    corpus_files: list[str] | None = None if _DATA.corpus_files == "auto" else list(_DATA.corpus_files)
    max_sentences: int = _DATA.max_corpus_sentences
    seed: int = _DATA.seed


@dg.asset(
    group_name="prepare",
    kinds={"pandas", "parquet"},
    check_specs=[PAIRS_VALID],
    output_required=False,  # a failed blocking check yields no materialisation and nothing is written
    description="STS pairs from the configured source(s), validated; written to data/pairs/pairs.parquet.",
)
def sts_pairs(context: dg.AssetExecutionContext, config: PairsConfig,
              paths: PathsResource) -> Iterator[dg.AssetCheckResult | dg.MaterializeResult]:
    from mixsp_core.stages.prepare import run_pairs

    params = paths.params(data={"spec": config.spec})
    spec = params.data.resolved_spec()
    context.log.info(f"reading pairs from {spec}")
    source_hash = spec_fingerprint(spec)  # before reading: a change during the run shows up next time
    result = run_pairs(params)
    yield validation_check_result(PAIRS_VALID, result.report)
    if result.path is None:
        context.log.error(f"pairs from {spec} failed validation; {params.paths.pairs} left as it was")
        return
    counts = result.counts()
    yield dg.MaterializeResult(metadata={
        "dagster/row_count": len(result.pairs),
        "data_spec": spec,
        "source_hash": source_hash,  # the sensor compares the source data against this
        "counts": dg.MetadataValue.md(markdown_table(["task", "split", "pairs"],
                                                     [[t, s, n] for (t, s), n in counts.items()])),
        **{f"rows/{task}/{split}": n for (task, split), n in counts.items()},
        **file_metadata(result.path),
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
    from mixsp_core.stages.prepare import run_corpus

    params = paths.params(data={"corpus_files": "auto" if config.corpus_files is None else config.corpus_files,
                                "max_corpus_sentences": config.max_sentences, "seed": config.seed})
    files = params.data.resolved_corpus_files()
    source_hash = files_fingerprint(files)
    result = run_corpus(params)
    yield validation_check_result(CORPUS_VALID, result.report)
    if result.path is None:
        context.log.error(f"corpus failed validation; {params.paths.corpus} left as it was")
        return
    corpus = result.corpus
    preview = markdown_table(["#", "sentence"], [[i + 1, s.replace("|", "\\|")] for i, s in enumerate(corpus[:5])])
    yield dg.MaterializeResult(metadata={
        "dagster/row_count": len(corpus),
        "sentences": len(corpus),
        "max_sentences": config.max_sentences,
        "text_files": dg.MetadataValue.md("\n".join(f"- `{getattr(f, 'path', f)}`" for f in files) or "(none)"),
        "source_hash": source_hash,
        "preview": dg.MetadataValue.md(preview),
        **file_metadata(result.path),
    })
