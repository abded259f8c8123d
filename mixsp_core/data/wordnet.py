"""WordNet 3.0 glosses for DefSent+: the ``data.noun`` / ``data.verb`` / ``data.adj`` / ``data.adv`` files
(format ``wndb(5)``) read into one table of (lemma, pos, synset, gloss), and exported as a parquet file
(``mixsp defsent-glosses``) so that a training machine without WordNet can read it.

A data line reads ``synset_offset lex_filenum ss_type w_cnt word lex_id [word lex_id ...] p_cnt [ptr ...]
[frames ...] | gloss``: ``w_cnt`` and ``lex_id`` are hexadecimal, each pointer is four fields
(symbol, offset, pos, source/target), verb lines add ``f_cnt`` and ``+ f_num w_num`` frames. Licence
header lines start with two spaces and are skipped. Every word of a synset becomes one row with the synset's
gloss, so a word with several senses has several rows (one gloss each).

``gloss`` is the definition only: WordNet appends usage examples in double quotes (``; "the nascent
chicks"``); DefSent trains on the definition sentences, and an example usually contains the entry word
itself, which would make predicting it trivial. A gloss made of examples only keeps its full text.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pandas as pd

from mixsp_core.errors import DataError
from mixsp_core.io import replacing_file

DATA_FILES = {"noun": "data.noun", "verb": "data.verb", "adj": "data.adj", "adv": "data.adv"}
SS_TYPES = frozenset("nvasr")  # noun, verb, adjective, adjective satellite, adverb
GLOSS_COLUMNS = ("lemma", "pos", "synset", "gloss")
_ADJ_MARKER = re.compile(r"\((?:a|p|ip)\)$")  # syntactic markers on adjectives: galore(ip), elect(p)


def read_data_file(path: str | Path) -> Iterator[tuple[str, str, str, str]]:
    """(lemma, pos, synset, gloss) of each word of each synset line of one WordNet data file, in file
    order. ``lemma`` as written in the file (underscores joining words, case kept, adjective markers cut);
    ``pos`` is the line's ss_type; ``synset`` is ``OFFSET-POS`` (``00001740-n``). A malformed line raises
    :class:`DataError` naming the file and the line."""
    path = Path(path)
    with path.open(encoding="utf-8", newline="\n") as handle:
        for number, raw in enumerate(handle, start=1):
            if raw.startswith("  "):  # licence header
                continue
            line = raw.rstrip("\r\n")
            if not line.strip():
                continue
            try:
                yield from _parse_line(line)
            except _Malformed as err:
                raise DataError(path, f"malformed WordNet data line ({err}): {line[:80]!r}", line=number) from None


class _Malformed(ValueError):
    """What :func:`_parse_line` raises; :func:`read_data_file` adds the file and line."""


def _parse_line(line: str) -> Iterator[tuple[str, str, str, str]]:
    head, bar, gloss = line.partition("|")
    if not bar:
        raise _Malformed("no '|' before the gloss")
    fields = head.split()
    if len(fields) < 6:
        raise _Malformed(f"{len(fields)} fields before the gloss, at least 6 expected")
    offset, lex_filenum, ss_type, w_cnt = fields[:4]
    if not (offset.isdigit() and len(offset) == 8):
        raise _Malformed(f"synset_offset {offset!r} is not 8 digits")
    if not lex_filenum.isdigit():
        raise _Malformed(f"lex_filenum {lex_filenum!r} is not a number")
    if ss_type not in SS_TYPES:
        raise _Malformed(f"ss_type {ss_type!r} is not one of n v a s r")
    words = _hex(w_cnt, "w_cnt")
    if words < 1:
        raise _Malformed("w_cnt is 0")
    at = 4 + 2 * words
    if len(fields) < at + 1:
        raise _Malformed(f"w_cnt {words} words announced, fewer given")
    lemmas = fields[4:at:2]
    for lex_id in fields[5:at:2]:
        _hex(lex_id, "lex_id")
    pointers = fields[at]
    if not pointers.isdigit():
        raise _Malformed(f"p_cnt {pointers!r} is not a number")
    rest = len(fields) - (at + 1)
    if rest < 4 * int(pointers):
        raise _Malformed(f"p_cnt {int(pointers)} pointers announced, {rest} fields left for them")
    # what follows the pointers is a verb's frame list (f_cnt, then '+ f_num w_num' triples): not needed here
    gloss = definition(gloss.strip())
    if not gloss:
        raise _Malformed("empty gloss")
    synset = f"{offset}-{ss_type}"
    for lemma in lemmas:
        yield _ADJ_MARKER.sub("", lemma), ss_type, synset, gloss


def _hex(value: str, name: str) -> int:
    try:
        return int(value, 16)
    except ValueError:
        raise _Malformed(f"{name} {value!r} is not hexadecimal") from None


def definition(gloss: str) -> str:
    """The definition part of a WordNet gloss: the text before its first double-quoted example, without
    the separating ``;`` (the full gloss when it holds nothing else)."""
    cut = gloss.find('"')
    text = gloss[:cut].strip().rstrip(";").strip() if cut >= 0 else gloss
    return text or gloss


def read_wordnet(directory: str | Path) -> pd.DataFrame:
    """The gloss table (columns :data:`GLOSS_COLUMNS`) of the four data files of a WordNet dict directory
    (e.g. ``/usr/share/wordnet`` of Debian's wordnet-base), nouns, verbs, adjectives, adverbs in that order."""
    directory = Path(directory)
    missing = [name for name in DATA_FILES.values() if not (directory / name).is_file()]
    if missing:
        raise DataError(directory, f"not a WordNet dict directory: {', '.join(missing)} missing")
    rows = [row for name in DATA_FILES.values() for row in read_data_file(directory / name)]
    return pd.DataFrame(rows, columns=list(GLOSS_COLUMNS))


def export_glosses(directory: str | Path, output: str | Path) -> pd.DataFrame:
    """Parse ``directory`` (:func:`read_wordnet`) and write the table to ``output`` (parquet), atomically."""
    table = read_wordnet(directory)
    with replacing_file(output) as tmp:
        table.to_parquet(tmp, index=False)
    return table


def read_glosses(path: str | Path) -> pd.DataFrame:
    """The gloss table from an exported parquet file or a WordNet dict directory; a missing path or a
    table without the columns raises :class:`DataError`."""
    path = Path(path)
    if path.is_dir():
        return read_wordnet(path)
    if not path.is_file():
        raise DataError(path, "definitions not found: a gloss table (.parquet from `mixsp defsent-glosses`) "
                              "or a WordNet dict directory")
    table = pd.read_parquet(path)
    missing = [c for c in GLOSS_COLUMNS if c not in table.columns]
    if missing:
        raise DataError(path, f"not a gloss table: columns {missing} missing")
    return table
