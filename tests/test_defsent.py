"""DefSent+ (issue 16 item 6): the WordNet data-file parser, the definition loss, the progressive entry
table, the gloss batches, the config fields and one short training run."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from mixsp_core.cli import main
from mixsp_core.data.wordnet import definition, export_glosses, read_data_file, read_glosses, read_wordnet
from mixsp_core.errors import ConfigError, DataError
from mixsp_core.losses import DefinitionLoss
from mixsp_core.training.batches import BatchStream
from mixsp_core.training.config import config_from_dict, load_config
from mixsp_core.training.definitions import (
    DEFINITION_STREAM,
    DefinitionBatches,
    DefinitionSet,
    EntryTable,
    entry_text,
    synonym_cells,
)

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "bi_defsent.yaml"

# Made-up lines in the wndb(5) layout: a licence header (two leading spaces), a two-word synset with an
# example in its gloss, a verb with a frame list, a lex_id in hex (f), an adjective with a syntactic marker.
HEADER = "  1 This software and database is being provided to you, the LICENSEE, by  \n  2   \n"
NOUNS = HEADER + (
    "00000001 03 n 02 river_bank 0 Bank 1 001 @ 00000002 n 0000 | sloping land beside water; "
    '"they pulled the canoe up on the bank"  \n'
    "00000002 03 n 01 slope 0 000 | an elevated geological formation  \n"
)
VERBS = HEADER + "00000003 29 v 02 cover f wrap_up 0 001 @ 00000004 v 0000 01 + 08 00 | clothe, as if for protection  \n"
ADJS = HEADER + "00000004 00 s 01 galore(ip) 0 000 | in great numbers  \n"
ADVS = HEADER + '00000005 02 r 01 quickly 0 000 | "run quickly"  \n'


def _wordnet_dir(root: Path, nouns: str = NOUNS) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, text in (("data.noun", nouns), ("data.verb", VERBS), ("data.adj", ADJS), ("data.adv", ADVS)):
        (root / name).write_text(text, encoding="utf-8")
    return root


# --------------------------------------------------------------------------- parser


def test_parser_reads_every_word_of_every_synset(tmp_path):
    table = read_wordnet(_wordnet_dir(tmp_path / "dict"))
    assert table.values.tolist() == [
        ["river_bank", "n", "00000001-n", "sloping land beside water"],  # the example is cut off
        ["Bank", "n", "00000001-n", "sloping land beside water"],
        ["slope", "n", "00000002-n", "an elevated geological formation"],
        ["cover", "v", "00000003-v", "clothe, as if for protection"],  # lex_id f, frames after the pointers
        ["wrap_up", "v", "00000003-v", "clothe, as if for protection"],
        ["galore", "s", "00000004-s", "in great numbers"],  # the (ip) marker cut
        ["quickly", "r", "00000005-r", '"run quickly"'],  # examples only: the whole gloss kept
    ]


def test_definition_keeps_the_text_before_the_examples():
    assert definition('a hill; a mound; "climb the hill"; "x"') == "a hill; a mound"
    assert definition("no examples (here)") == "no examples (here)"


@pytest.mark.parametrize(("line", "reason"), [
    ("00000009 03 n 01 thing 0 000 no bar here", "no '|'"),
    ("0000009 03 n 01 thing 0 000 | short offset", "not 8 digits"),
    ("00000009 03 x 01 thing 0 000 | bad type", "ss_type 'x'"),
    ("00000009 03 n 0g thing 0 000 | bad count", "w_cnt '0g' is not hexadecimal"),
    ("00000009 03 n 03 thing 0 other 0 | fewer words", "3 words announced"),
    ("00000009 03 n 01 thing 0 002 @ 00000001 n 0000 | one pointer short", "p_cnt 2 pointers announced"),
    ("00000009 03 n 01 thing 0 000 |   ", "empty gloss"),
])
def test_a_malformed_line_names_its_file_and_line(tmp_path, line, reason):
    path = tmp_path / "data.noun"
    path.write_text(NOUNS + line + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=reason) as err:
        list(read_data_file(path))
    assert err.value.path == str(path) and err.value.line == 5  # 2 header lines, 2 good ones, then this
    assert str(err.value).startswith(f"{path}:5: ")


def test_export_round_trips_through_parquet_and_the_cli(tmp_path, capsys):
    wordnet = _wordnet_dir(tmp_path / "dict")
    out = tmp_path / "glosses.parquet"
    exported = export_glosses(wordnet, out)
    pd.testing.assert_frame_equal(read_glosses(out), exported)
    pd.testing.assert_frame_equal(read_glosses(wordnet), exported)  # a dict directory is read directly
    assert main(["defsent-glosses", "--wordnet-dir", str(wordnet), "--output", str(tmp_path / "cli.parquet")]) == 0
    assert "7 glosses (5 synsets" in capsys.readouterr().out
    assert main(["defsent-glosses", "--wordnet-dir", str(tmp_path), "--output", str(tmp_path / "x.parquet")]) == 2
    assert "data.noun, data.verb, data.adj, data.adv missing" in capsys.readouterr().err


def test_reading_a_table_without_the_columns_or_no_file_fails(tmp_path):
    pd.DataFrame({"lemma": ["a"]}).to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"columns \['pos', 'synset', 'gloss'\] missing"):
        read_glosses(tmp_path / "bad.parquet")
    with pytest.raises(DataError, match="definitions not found"):
        read_glosses(tmp_path / "absent.parquet")


# --------------------------------------------------------------------------- entries and the loss


def test_definition_set_folds_entries_and_drops_repeated_rows():
    table = pd.DataFrame({"lemma": ["Bank", "bank", "river_bank", "bank"],
                          "pos": ["n"] * 4, "synset": ["1-n", "1-n", "1-n", "2-n"],
                          "gloss": ["land beside water", "land beside water", "land beside water", "an institution"]})
    found = DefinitionSet.from_table(table)
    assert entry_text("Abraham_Lincoln") == "abraham lincoln"
    assert found.entries == ["bank", "river bank"]
    assert found.glosses == ["land beside water", "land beside water", "an institution"]
    assert found.entry_of.tolist() == [0, 1, 0]
    assert found.texts == ["land beside water", "an institution"] and found.text_of.tolist() == [0, 0, 1]
    assert len(DefinitionSet.from_table(table, max_glosses=2, seed=3).glosses) == 2


def test_an_entry_is_the_mean_unit_embedding_of_its_glosses():
    found = DefinitionSet(glosses=["g0", "g1", "g2"], entries=["bank", "river bank"],
                          entry_of=np.array([0, 1, 0]), texts=["g0", "g1", "g2"], text_of=np.array([0, 1, 2]))
    seen = []

    def encode(texts):
        seen.append(list(texts))
        return np.array([[2.0, 0.0], [0.0, 3.0], [0.0, 1.0]])  # rows are normalised before the mean

    vectors = found.entry_vectors(encode)
    assert seen == [["g0", "g1", "g2"]]  # each distinct gloss encoded once
    np.testing.assert_allclose(vectors.numpy(), [[0.5, 0.5], [0.0, 1.0]])


def test_definition_loss_matches_a_hand_computed_value():
    glosses = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    entries = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    labels = torch.tensor([0, 2])
    loss = DefinitionLoss(temperature=0.5)(glosses, entries, labels)
    r = 1 / math.sqrt(2)  # cosine with the diagonal entry
    # gloss 0: cosines (1, 0, r) / 0.5, target 0; gloss 1: cosines (0, 1, r) / 0.5, target 2
    first = -2.0 + math.log(math.exp(2.0) + math.exp(0.0) + math.exp(2 * r))
    second = -2 * r + math.log(math.exp(0.0) + math.exp(2.0) + math.exp(2 * r))
    assert float(loss) == pytest.approx((first + second) / 2, rel=1e-6)


def test_definition_loss_stays_fp32_under_autocast():
    glosses = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    entries = torch.tensor([[1.0, 0.001], [1.0, 0.0], [0.6, 0.8]])
    labels = torch.tensor([1, 2])
    plain = DefinitionLoss(temperature=0.01)(glosses, entries, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = DefinitionLoss(temperature=0.01)(glosses, entries, labels)
    assert inside.dtype == torch.float32 and float(inside) == pytest.approx(float(plain), rel=1e-6)


def test_centred_definition_loss_and_no_gradient_into_the_entries():
    glosses = torch.tensor([[2.0, 1.0]], requires_grad=True)
    entries = torch.tensor([[1.0, 1.0], [3.0, 1.0]], requires_grad=True)
    center = torch.tensor([1.0, 1.0])
    # centred: gloss (1, 0); entries (0, 0) -> cosine 0 (normalising a zero row gives zero), (2, 0) -> 1
    loss = DefinitionLoss(temperature=1.0)(glosses, entries, torch.tensor([1]), center)
    assert float(loss.detach()) == pytest.approx(-1.0 + math.log(math.exp(0.0) + math.exp(1.0)), rel=1e-6)
    loss.backward()
    assert glosses.grad is not None and entries.grad is None


def test_excluded_candidates_leave_the_softmax():
    glosses = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    entries = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    # row 0's target is entry 0; entry 1 (a synonym, same vector) is excluded, so only entry 2 competes
    loss = DefinitionLoss(temperature=1.0)(glosses, entries, torch.tensor([0, 2]),
                                           exclude=(torch.tensor([0]), torch.tensor([1])))
    first = -1.0 + math.log(math.exp(1.0) + math.exp(0.0))
    second = -1.0 + math.log(2 * math.exp(0.0) + math.exp(1.0))
    assert float(loss) == pytest.approx((first + second) / 2, rel=1e-6)


def test_synonyms_are_the_other_entries_of_a_shared_gloss():
    table = pd.DataFrame({"lemma": ["river_bank", "Bank", "slope", "bank"], "pos": ["n"] * 4,
                          "synset": ["1-n", "1-n", "2-n", "3-n"],
                          "gloss": ["land beside water", "land beside water", "a formation", "an institution"]})
    found = DefinitionSet.from_table(table)  # entries: river bank 0, bank 1, slope 2
    assert [found.synonyms(i).tolist() for i in range(4)] == [[1], [0], [], []]
    at, cols = synonym_cells(found, np.array([3, 0, 1]), None)
    assert at.tolist() == [1, 2] and cols.tolist() == [1, 0]
    at, cols = synonym_cells(found, np.array([0, 1]), np.array([2, 0]))  # entry 1 is not a candidate here
    assert at.tolist() == [1] and cols.tolist() == [1]


def test_entry_table_refresh_schedule_and_momentum():
    table = EntryTable(["a", "b"], refresh_every=3, momentum=0.5)
    encoded = iter([np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([[0.0, 1.0], [0.0, 1.0]])] + [np.eye(2)] * 2)
    for step in range(10):
        if table.due(step):
            table.refresh(lambda texts: next(encoded), step)
    assert table.refreshed_at == [0, 3, 6, 9]
    assert not table.due(9)  # already rebuilt at this step
    # step 3 blended half the step-0 table with the new rows and renormalised: row 0 (1, 1)/sqrt 2, row 1 (0, 1)
    resumed = EntryTable(["a", "b"], refresh_every=3, momentum=0.5)
    resumed.refresh(lambda texts: np.array([[1.0, 0.0], [0.0, 1.0]]), 0)
    resumed.refresh(lambda texts: np.array([[0.0, 1.0], [0.0, 1.0]]), 3)
    r = 1 / math.sqrt(2)
    np.testing.assert_allclose(resumed.vectors.numpy(), [[r, r], [0.0, 1.0]], atol=1e-6)
    np.testing.assert_allclose(resumed.center.numpy(), [r / 2, (r + 1) / 2], atol=1e-6)
    late = EntryTable(["a"], refresh_every=3)  # a resumed run: rebuilt at its first step, then on the multiples
    for step in range(4, 10):
        if late.due(step):
            late.refresh(lambda texts: np.ones((1, 2)), step)
    assert late.refreshed_at == [4, 6, 9]


def test_gloss_batches_and_sampled_candidates_are_a_function_of_seed_and_step():
    stream = BatchStream(10, 4, seed=5, stream=DEFINITION_STREAM)
    batches = DefinitionBatches(stream, num_entries=50, candidates=8)
    again = DefinitionBatches(BatchStream(10, 4, seed=5, stream=DEFINITION_STREAM), 50, 8)
    targets = np.array([7, 3, 7, 40])
    rows, labels = batches.candidate_rows(2, targets)
    assert len(rows) == 8 and len(set(rows.tolist())) == 8
    assert rows[labels].tolist() == targets.tolist()  # each label points at its own entry
    assert rows[:3].tolist() == [3, 7, 40]  # the batch's own entries first
    np.testing.assert_array_equal(again.candidate_rows(2, targets)[0], rows)
    np.testing.assert_array_equal(again.indices(6), batches.indices(6))
    assert not np.array_equal(batches.candidate_rows(3, targets)[0], rows)
    whole = DefinitionBatches(stream, num_entries=50, candidates=0)
    assert whole.candidate_rows(2, targets)[0] is None and whole.candidate_rows(2, targets)[1] is targets


# --------------------------------------------------------------------------- config


def _raw(**loss) -> dict:
    return {"model": {"kind": "bi"}, "loss": {"cosent": 1.0, "definition": 0.1, **loss},
            "data": {"definitions": "glosses.parquet"}}


def test_the_shipped_config_validates():
    config = load_config(CONFIG)
    assert config.loss.definition > 0 and config.data.definitions.endswith(".parquet")
    assert config.model.encoder == "sentence-transformers/all-MiniLM-L6-v2"


@pytest.mark.parametrize(("change", "field"), [
    ({"data": {"definitions": ""}}, "data.definitions"),
    ({"model": {"kind": "cross"}, "loss": {"cosent": 0.0, "score_bce": 1.0, "definition": 0.1}}, "loss.definition"),
    ({"loss": {"cosent": 1.0, "definition": 0.1, "definition_temperature": 0.0}}, "loss.definition_temperature"),
    ({"loss": {"cosent": 1.0, "definition": 0.1, "definition_candidates": -1}}, "loss.definition_candidates"),
    ({"loss": {"cosent": 1.0, "definition": -0.1}}, "loss.definition"),
    ({"train": {"definition_refresh_every": 0}}, "train.definition_refresh_every"),
    ({"train": {"definition_entry_momentum": 1.0}}, "train.definition_entry_momentum"),
    ({"train": {"definition_batch_size": 1}}, "train.definition_batch_size"),
    ({"train": {"definition_entries": "words"}}, "train.definition_entries"),
    ({"data": {"definitions": "x", "definitions_max": -2}}, "data.definitions_max"),
])
def test_bad_definition_settings_name_their_field(change, field):
    raw = _raw()
    for section, values in change.items():
        raw.setdefault(section, {}).update(values)
    with pytest.raises(ConfigError) as err:
        config_from_dict(raw)
    assert err.value.field == field


def test_the_definition_term_alone_is_something_to_train():
    config = config_from_dict({**_raw(), "loss": {"cosent": 0.0, "definition": 1.0}})
    assert config.loss.definition == 1.0


# --------------------------------------------------------------------------- a short run


@pytest.mark.parametrize("entries", ["glosses", "lemma"])
def test_a_run_trains_with_the_definition_term(tiny_bert_dir, senteval_dir, tmp_path, entries, monkeypatch):
    from mixsp_core.tracking.tracker import NullTracker
    from mixsp_core.training.loop import run_training
    from tests.train_helpers import small_pairs, tiny_config

    refreshed = []
    original = EntryTable.refresh

    def recording(table, encode, step, device=None):
        original(table, encode, step, device)
        refreshed.append((step, tuple(table.vectors.shape)))

    monkeypatch.setattr(EntryTable, "refresh", recording)
    glosses = tmp_path / "glosses.parquet"
    export_glosses(_wordnet_dir(tmp_path / "dict"), glosses)
    config = tiny_config(tiny_bert_dir, loss={"definition": 0.5, "definition_candidates": 3},
                         data={"definitions": str(glosses)},
                         train={"max_steps": 3, "eval_every": 3, "definition_batch_size": 4,
                                "definition_refresh_every": 2, "definition_entries": entries})
    tracker = NullTracker()
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = run_training(config, small_pairs(senteval_dir), out_dir=tmp_path / "run", tracker=tracker,
                              show_progress=False)
    finally:
        torch.set_num_threads(before)
    values = [v for _, v in tracker.series("train/definition")]
    assert result.steps == 3 and len(values) == 3 and all(math.isfinite(v) and v > 0 for v in values)
    assert (result.best_checkpoint / "config.json").is_file()
    assert refreshed == [(0, (7, 16)), (2, (7, 16))]  # 7 entries (one per made-up word), output_dim 16; steps 0, 2
