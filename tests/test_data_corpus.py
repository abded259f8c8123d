"""Sentence corpus: building (order, de-duplication, shuffle, cap), SST/TREC lines, files, SNLI triplets."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mixsp_core.data.corpus import (
    CorpusFile,
    build_corpus,
    default_corpus_files,
    load_nli_triplets,
    read_corpus,
    read_corpus_file,
    write_corpus,
)
from mixsp_core.data.table import make_pairs
from mixsp_core.errors import DataError


def _pairs(rows: list[tuple[str, str, str]]):
    return make_pairs(
        {"sentence1": s1, "sentence2": s2, "score": 1.0, "task": "T", "subset": "T", "split": split, "source": "x", "line": i + 1}
        for i, (s1, s2, split) in enumerate(rows)
    )


def _text(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode(encoding))
    return path


@pytest.fixture()
def corpus_inputs(tmp_path: Path):
    pairs = _pairs([(" A b. ", "C d.", "train"), ("dev only", "C d.", "dev"), ("E f.", "A b.", "train")])
    plain = _text(tmp_path / "MR/rt-polarity.pos", "\n".join(f"line {i}" for i in range(30)) + "\n\nE f.\n")
    sst = _text(tmp_path / "SST/binary/sentiment-train", "good movie \t1\nline 3\t0\n")
    trec = _text(tmp_path / "TREC/train_5500.label", "LOC:city Where is the sister\xf0city ?\n", "latin-1")
    return pairs, [plain, sst, trec]


def test_train_sentences_first_then_unique_file_lines(corpus_inputs) -> None:
    pairs, files = corpus_inputs
    corpus = build_corpus(pairs, files, None, seed=0)
    assert corpus[:3] == ["A b.", "C d.", "E f."]  # train pairs, stripped, de-duplicated, dev excluded
    assert "dev only" not in corpus
    tail = corpus[3:]
    assert len(tail) == len(set(tail)) == 32  # 30 plain lines + SST + TREC; "E f." and "line 3" are repeats
    assert "good movie" in tail and "Where is the sister\u00f0city ?" in tail
    assert "" not in corpus


def test_shuffle_is_seeded_and_cap_applies(corpus_inputs) -> None:
    pairs, files = corpus_inputs
    first = build_corpus(pairs, files, None, seed=1)
    assert build_corpus(pairs, files, None, seed=1) == first
    other = build_corpus(pairs, files, None, seed=2)
    assert other != first and sorted(other) == sorted(first) and other[:3] == first[:3]
    assert build_corpus(pairs, files, 5, seed=1) == first[:5]
    assert build_corpus(pairs, files, 2, seed=1) == ["A b.", "C d."]
    with pytest.raises(ValueError, match="max_sentences"):
        build_corpus(pairs, files, 0, seed=1)


def test_line_breaks_inside_pair_sentences_become_spaces() -> None:
    corpus = build_corpus(_pairs([("two\nlines", "x\r\ny", "train")]), [], None, seed=0)
    assert corpus == ["two lines", "x y"]


def test_corpus_file_formats_are_inferred(tmp_path: Path) -> None:
    assert CorpusFile.from_path(tmp_path / "TREC/train_5500.label") == CorpusFile(tmp_path / "TREC/train_5500.label", "trec", "latin-1")
    assert CorpusFile.from_path(tmp_path / "SST/binary/sentiment-train").format == "sst"
    assert CorpusFile.from_path(tmp_path / "CR/custrev.neg").format == "plain"


def test_malformed_sst_and_trec_lines(tmp_path: Path) -> None:
    sst = _text(tmp_path / "sentiment-train", "good\t1\nno label here\n")
    with pytest.raises(DataError, match=re.escape(f"{sst}:2: ") + "expected 'sentence<TAB>label'"):
        read_corpus_file(sst)
    trec = _text(tmp_path / "train_5500.label", "What is this ?\n")
    with pytest.raises(DataError, match=re.escape(f"{trec}:1: ") + "expected 'LABEL:fine question'"):
        read_corpus_file(trec)


def test_undecodable_plain_file(tmp_path: Path) -> None:
    path = tmp_path / "mpqa.pos"
    path.write_bytes(b"fine\nbad \xf0 byte\n")
    with pytest.raises(DataError, match=re.escape(f"{path}:2: ") + "bytes are not valid utf-8"):
        read_corpus_file(path)


def test_real_senteval_corpus_files(senteval_dir: Path) -> None:
    files = default_corpus_files(senteval_dir)
    assert [file.path.parent.name for file in files] == ["MR", "MR", "CR", "CR", "SUBJ", "SUBJ", "MPQA", "MPQA", "TREC", "binary"]
    trec = read_corpus_file(next(file for file in files if file.format == "trec"))
    assert len(trec) == 5452 and trec[0] == "How did serfdom develop in and then leave Russia ?"
    sst = read_corpus_file(next(file for file in files if file.format == "sst"))
    assert len(sst) == 67349 and sst[0] == "hide new secretions from the parental units"


def test_write_and_read_corpus(tmp_path: Path) -> None:
    sentences = ["Ünïcode sentence.", "  spaced  ", "tab\tinside"]
    path = write_corpus(sentences, tmp_path / "out/corpus.txt")
    assert read_corpus(path) == sentences
    assert not list(path.parent.glob(".*.tmp"))
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'bad.txt'}:2: ") + "sentence 2 contains a line break"):
        write_corpus(["ok", "not\nok"], tmp_path / "bad.txt")
    assert not (tmp_path / "bad.txt").exists()


def test_read_corpus_can_reject_empty_lines(tmp_path: Path) -> None:
    path = _text(tmp_path / "in.txt", "one\n\nthree\n")
    assert read_corpus(path) == ["one", "", "three"]
    with pytest.raises(DataError, match=re.escape(f"{path}:2: ") + "empty line"):
        read_corpus(path, allow_empty_lines=False)


def _snli(root: Path, split: str, rows: list[tuple[str, str, str]]) -> None:
    for name, column in (("s1", 0), ("s2", 1), ("labels", 2)):
        _text(root / f"{name}.{split}", "".join(f"{row[column]} \n" if name != "labels" else f"{row[column]}\n" for row in rows))


def test_nli_triplets_pair_entailment_with_contradiction(tmp_path: Path) -> None:
    _snli(
        tmp_path,
        "dev",
        [
            ("P1", "e1", "entailment"),
            ("P1", "n1", "neutral"),
            ("P1", "c1", "contradiction"),
            ("P2", "e2", "entailment"),  # no contradiction: dropped
            ("P3", "c3", "contradiction"),
            ("P3", "e3a", "entailment"),
            ("P3", "e3b", "entailment"),
        ],
    )
    triplets = load_nli_triplets(tmp_path, "dev")
    assert list(triplets.columns) == ["anchor", "positive", "hard_negative"]
    assert triplets.values.tolist() == [["P1", "e1", "c1"], ["P3", "e3a", "c3"], ["P3", "e3b", "c3"]]


def test_nli_bad_label_and_misaligned_files(tmp_path: Path) -> None:
    _snli(tmp_path, "test", [("P", "h", "entailment"), ("P", "h2", "maybe")])
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'labels.test'}:2: ") + "label 'maybe'"):
        load_nli_triplets(tmp_path, "test")
    _text(tmp_path / "s2.test", "only one\n")
    with pytest.raises(DataError, match="must align line by line"):
        load_nli_triplets(tmp_path, "test")
    with pytest.raises(DataError, match="file not found"):
        load_nli_triplets(tmp_path, "train")


def test_real_snli_dev_triplets(senteval_dir: Path) -> None:
    triplets = load_nli_triplets(senteval_dir / "SNLI", "dev")
    assert 3000 < len(triplets) <= 3329  # at most one triplet per entailment pair
    assert triplets.iloc[0].tolist() == [
        "Two women are embracing while holding to go packages .",
        "Two woman are holding packages .",
        "The men are fighting outside a deli .",
    ]
    assert (triplets.map(len) > 0).all().all()
