"""The unlabeled sentence corpus for distillation, SentEval's text corpora, and SNLI triplets.

``build_corpus`` puts the training pairs' sentences first (the student must fit them), then the
lines of single-sentence corpora (MR, CR, SUBJ, MPQA, TREC, SST), de-duplicated, shuffled with a
seed and capped. A corpus file holds one sentence per line.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pandas as pd

from mixsp_core.data.senteval import iter_text_lines, read_text_lines
from mixsp_core.errors import DataError
from mixsp_core.io import write_text_atomic

LineFormat = Literal["plain", "sst", "trec"]
_LINE_BREAKS = re.compile(r"[\r\n]+")
NLI_LABELS: tuple[str, ...] = ("entailment", "neutral", "contradiction")


@dataclass(frozen=True)
class CorpusFile:
    """A text file of sentences: ``plain`` (one per line), ``sst`` (``sentence<TAB>label``) or
    ``trec`` (``LABEL:fine question``), and its encoding."""

    path: Path
    format: LineFormat = "plain"
    encoding: str = "utf-8"

    @classmethod
    def from_path(cls, path: str | Path) -> CorpusFile:
        """Guess the format from SentEval's file names (TREC ``*.label``, SST ``sentiment-*``)."""
        path = Path(path)
        if path.suffix == ".label" or path.parent.name == "TREC":
            # SentEval reads TREC as Latin-1: train_5500.label holds a non-UTF-8 byte (line 66).
            return cls(path, "trec", "latin-1")
        if path.name.startswith("sentiment-"):
            return cls(path, "sst")
        return cls(path)


# SentEval directory -> files used as unlabeled text (SNLI is not here: see load_nli_triplets).
_DEFAULT_CORPUS_FILES: tuple[str, ...] = (
    "MR/rt-polarity.pos",
    "MR/rt-polarity.neg",
    "CR/custrev.pos",
    "CR/custrev.neg",
    "SUBJ/subj.objective",
    "SUBJ/subj.subjective",
    "MPQA/mpqa.pos",
    "MPQA/mpqa.neg",
    "TREC/train_5500.label",
    "SST/binary/sentiment-train",
)


def check_sentences(sentences: Sequence[str], what: str = "sentence") -> list[str]:
    """``sentences`` as a list, refusing one bare string or a non-string item (a TypeError naming it)."""
    if isinstance(sentences, str):
        raise TypeError(f"expected a sequence of {what}s, not one string")
    out = list(sentences)
    for i, s in enumerate(out):
        if not isinstance(s, str):
            raise TypeError(f"{what} {i} is {type(s).__name__}, not str")
    return out


def default_corpus_files(senteval_dir: str | Path) -> list[CorpusFile]:
    """The MR, CR, SUBJ, MPQA, TREC and SST files present under ``senteval_dir``, formats set."""
    root = Path(senteval_dir)
    return [CorpusFile.from_path(root / name) for name in _DEFAULT_CORPUS_FILES if (root / name).is_file()]


def read_corpus_file(file: CorpusFile | str | Path) -> list[str]:
    """The sentences of one corpus file, stripped, empty lines dropped; bad lines raise ``DataError``."""
    spec = file if isinstance(file, CorpusFile) else CorpusFile.from_path(file)
    sentences = []
    for number, text in enumerate(read_text_lines(spec.path, spec.encoding), start=1):
        sentence = _sentence_of(text, spec, number)
        if sentence:
            sentences.append(sentence)
    return sentences


def _sentence_of(text: str, spec: CorpusFile, number: int) -> str:
    """The sentence part of one line in ``spec.format``."""
    if spec.format == "sst":
        sentence, tab, _label = text.rpartition("\t")
        if not tab:
            raise DataError(spec.path, "expected 'sentence<TAB>label'", number)
        return sentence.strip()
    if spec.format == "trec":
        if not text.strip():
            return ""
        label, space, question = text.partition(" ")
        if not space or ":" not in label:
            raise DataError(spec.path, "expected 'LABEL:fine question'", number)
        return question.strip()
    return text.strip()


def _one_line(sentence: str) -> str:
    """Strip, and turn line breaks into spaces: the corpus is stored one sentence per line."""
    return _LINE_BREAKS.sub(" ", sentence).strip()


def build_corpus(
    pairs: pd.DataFrame,
    text_files: Sequence[CorpusFile | str | Path],
    max_sentences: int | None,
    seed: int,
) -> list[str]:
    """Distillation corpus: sentences of the ``train`` split of ``pairs`` first (in row order,
    sentence1 then sentence2), then the text files' sentences shuffled with ``seed``.

    Sentences are stripped (line breaks become spaces), empty ones dropped, duplicates removed
    keeping the first occurrence, and the result capped at ``max_sentences`` (None: no cap).
    The same inputs and seed always give the same list.
    """
    if max_sentences is not None and max_sentences < 1:
        raise ValueError(f"max_sentences must be >= 1 or None, got {max_sentences}")
    train = pairs.loc[pairs["split"] == "train", ["sentence1", "sentence2"]]
    seen: set[str] = set()
    head = _unique(
        (_one_line(sentence) for row in train.itertuples(index=False) for sentence in row), seen
    )
    tail = _unique((sentence for file in text_files for sentence in read_corpus_file(file)), seen)
    # Shuffle after de-duplication so that the result depends on the seed only.
    random.Random(seed).shuffle(tail)
    corpus = head + tail
    return corpus if max_sentences is None else corpus[:max_sentences]


def _unique(sentences: Iterable[str], seen: set[str]) -> list[str]:
    """Non-empty sentences not in ``seen``, in order; ``seen`` is updated."""
    kept = []
    for sentence in sentences:
        if sentence and sentence not in seen:
            seen.add(sentence)
            kept.append(sentence)
    return kept


def write_corpus(sentences: Iterable[str], path: str | Path) -> Path:
    """Write one sentence per line (UTF-8), atomically; a sentence with a line break is a ``DataError``."""
    path = Path(path)
    sentences = list(sentences)
    for number, sentence in enumerate(sentences, start=1):
        if "\n" in sentence or "\r" in sentence:
            raise DataError(path, f"sentence {number} contains a line break: {sentence[:60]!r}", number)
    return write_text_atomic(path, "".join(f"{sentence}\n" for sentence in sentences))


def read_corpus(path: str | Path, *, allow_empty_lines: bool = True) -> list[str]:
    """The sentences of a file written by ``write_corpus`` (every line, as written).

    With ``allow_empty_lines=False`` a blank line is a ``DataError`` naming it (e.g. for inputs
    that must map one line to one embedding row).
    """
    return read_text_lines(path) if allow_empty_lines else list(sentence_lines(path))


def sentence_lines(path: str | Path, encoding: str = "utf-8") -> Iterator[str]:
    """The lines of ``path`` lazily (:func:`~mixsp_core.data.senteval.iter_text_lines`), each one sentence:
    a blank line is a ``DataError`` naming it (inputs that map one line to one embedding row)."""
    for number, line in enumerate(iter_text_lines(path, encoding), start=1):
        if not line.strip():
            raise DataError(path, "empty line; expected one sentence per line", number)
        yield line


def load_nli_triplets(snli_dir: str | Path, split: str) -> pd.DataFrame:
    """SNLI (SentEval layout: ``s1.<split>``, ``s2.<split>``, ``labels.<split>``) as triplets.

    Returns columns ``anchor`` (premise), ``positive`` (an entailed hypothesis) and
    ``hard_negative`` (a contradicting hypothesis of the same premise). A premise with k
    entailments gets k triplets, cycling through its contradictions; premises lacking either
    are dropped. Premise order follows the files.
    """
    rows = [
        (premise, positive, contradicted[index % len(contradicted)])
        for premise, (entailed, contradicted) in nli_groups(snli_dir, split).items()
        if contradicted
        for index, positive in enumerate(entailed)
    ]
    return pd.DataFrame(rows, columns=["anchor", "positive", "hard_negative"], dtype=object)


def nli_groups(snli_dir: str | Path, split: str) -> dict[str, tuple[list[str], list[str]]]:
    """SNLI ``split`` by premise (file order): premise -> (entailed hypotheses, contradicting hypotheses),
    neutral ones dropped; either list may be empty."""
    root = Path(snli_dir)
    paths = [root / f"{name}.{split}" for name in ("s1", "s2", "labels")]
    premises, hypotheses, labels = (read_text_lines(path) for path in paths)
    if not len(premises) == len(hypotheses) == len(labels):
        raise DataError(
            paths[0],
            f"{len(premises)} lines, but {paths[1]} has {len(hypotheses)} and {paths[2]} has {len(labels)};"
            " they must align line by line",
        )
    groups: dict[str, tuple[list[str], list[str]]] = {}
    for number, (premise, hypothesis, label) in enumerate(zip(premises, hypotheses, labels), start=1):
        label = label.strip()
        if label not in NLI_LABELS:
            raise DataError(paths[2], f"label {label!r} is not one of {', '.join(NLI_LABELS)}", number)
        if label == "neutral":
            continue
        entailed, contradicted = groups.setdefault(premise.strip(), ([], []))
        (entailed if label == "entailment" else contradicted).append(hypothesis.strip())
    return groups
