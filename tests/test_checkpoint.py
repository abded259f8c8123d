"""Checkpoint directories: round trips, load_embedder dispatch, and errors naming the broken file."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mixsp_core.errors import CheckpointError
from mixsp_core.models.checkpoint import (
    load_checkpoint,
    load_embedder,
    read_trainer_state,
    restore_optimizer,
    save_checkpoint,
)
from mixsp_core.models.cross import CrossScorer, span_masks
from mixsp_core.models.student import BiStudent
from mixsp_core.training.config import ModelConfig
from tests.train_helpers import one_thread

_one_thread = pytest.fixture(scope="module", autouse=True)(one_thread)

SENTENCES = ["A man is playing a guitar.", "A woman slices an onion.", "Two dogs run in the snow.", "Hi."]


@pytest.fixture(scope="module")
def bi_model(tiny_bert_dir):
    torch.manual_seed(0)
    config = ModelConfig(kind="bi", encoder=str(tiny_bert_dir), projector_mult=2, output_dim=16, max_length=32)
    return BiStudent.from_config(config).eval()


def test_bi_round_trip_gives_identical_embeddings(bi_model, tmp_path):
    before = bi_model.encode(SENTENCES, batch_size=2, show_progress=False)
    save_checkpoint(bi_model, tmp_path / "ckpt", extra={"step": 3})
    loaded = load_embedder(tmp_path / "ckpt", device="cpu")
    assert isinstance(loaded, BiStudent) and loaded.model_config == bi_model.model_config
    after = loaded.encode(SENTENCES, batch_size=2, show_progress=False)
    assert before.shape == (4, 16) and np.array_equal(before, after)
    # other batch sizes pad differently: equal up to float rounding
    assert np.allclose(loaded.encode(SENTENCES, batch_size=3, show_progress=False), after, atol=1e-5)
    assert np.allclose(np.linalg.norm(after, axis=1), 1.0, atol=1e-5)
    meta = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert meta["mixsp_kind"] == "bi" and meta["training"]["step"] == 3
    assert (tmp_path / "ckpt" / "encoder" / "tokenizer.json").is_file()


def test_dims_keeps_a_prefix(bi_model, tmp_path):
    save_checkpoint(bi_model, tmp_path / "ckpt")
    full = load_embedder(tmp_path / "ckpt", device="cpu").encode(SENTENCES, show_progress=False, normalize=False)
    short = load_embedder(tmp_path / "ckpt", device="cpu", dims=4).encode(SENTENCES, show_progress=False)
    expected = full[:, :4] / np.linalg.norm(full[:, :4], axis=1, keepdims=True)
    assert short.shape == (4, 4) and np.allclose(short, expected, atol=1e-6)


def test_cross_round_trip_gives_identical_scores(tiny_bert_dir, tmp_path):
    torch.manual_seed(0)
    config = ModelConfig(kind="cross", encoder=str(tiny_bert_dir), projector_mult=2, output_dim=0)
    model = CrossScorer.from_config(config).eval()
    pairs = list(zip(SENTENCES, reversed(SENTENCES)))
    before = model.predict(pairs)
    save_checkpoint(model, tmp_path / "x")
    loaded = load_embedder(tmp_path / "x", device="cpu")
    assert isinstance(loaded, CrossScorer) and not hasattr(loaded, "encode")
    assert np.array_equal(before, loaded.predict(pairs))
    assert np.allclose(before, loaded.predict(pairs, batch_size=1), atol=1e-6)


def test_span_masks_split_at_separators(tiny_bert_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    batch = tok(["a b", "c"], ["d e f", "g h"], padding=True, return_tensors="pt")
    first, second = span_masks(batch["input_ids"], batch["attention_mask"], tok.sep_token_id)
    ids = batch["input_ids"]
    words = lambda row, mask: tok.convert_ids_to_tokens(ids[row][mask[row]].tolist())  # noqa: E731
    assert words(0, first) == ["a", "b"] and words(0, second) == ["d", "e", "f"]
    assert words(1, first) == ["c"] and words(1, second) == ["g", "h"]


def test_optimizer_state_round_trip(bi_model, tmp_path):
    opt = torch.optim.AdamW(bi_model.parameters(), lr=1e-3)
    bi_model.train()
    out = bi_model(bi_model.tokenize(SENTENCES)).embedding.sum()
    out.backward()
    opt.step()
    save_checkpoint(bi_model, tmp_path / "last", trainer_state={"step": 1}, optimizer=opt)
    state, tensors = read_trainer_state(tmp_path / "last")
    assert state["step"] == 1 and not (tmp_path / "last" / "optimizer.pt").exists()
    fresh = torch.optim.AdamW(bi_model.parameters(), lr=1e-3)
    restore_optimizer(fresh, state, tensors)
    a, b = opt.state_dict(), fresh.state_dict()
    for idx, slots in a["state"].items():
        assert torch.equal(slots["exp_avg"], b["state"][idx]["exp_avg"])
        assert torch.equal(torch.as_tensor(slots["step"]), torch.as_tensor(b["state"][idx]["step"]))
    bi_model.eval()


def test_corrupt_weights_name_the_file(bi_model, tmp_path):
    for part in ("encoder", "2_MixSPHead"):
        save_checkpoint(bi_model, tmp_path / part)
        weights = tmp_path / part / part / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
        with pytest.raises(CheckpointError, match=f"{part}/model.safetensors"):
            load_embedder(tmp_path / part, device="cpu")


def test_missing_or_broken_files_name_the_file(bi_model, tmp_path):
    save_checkpoint(bi_model, tmp_path / "a")
    (tmp_path / "a" / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        load_embedder(tmp_path / "a")
    save_checkpoint(bi_model, tmp_path / "b")
    (tmp_path / "b" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json"):
        load_embedder(tmp_path / "b")
    save_checkpoint(bi_model, tmp_path / "c")
    (tmp_path / "c" / "2_MixSPHead" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="2_MixSPHead/model.safetensors"):
        load_checkpoint(tmp_path / "c")
    with pytest.raises(CheckpointError, match="trainer_state.json"):
        read_trainer_state(tmp_path / "c")


def test_each_weight_is_stored_once_and_the_encoder_folder_is_an_hf_model(bi_model, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModel

    save_checkpoint(bi_model, tmp_path / "ckpt")
    ckpt = tmp_path / "ckpt"
    assert not (ckpt / "model.safetensors").exists()
    encoder, head = load_file(str(ckpt / "encoder" / "model.safetensors")), load_file(
        str(ckpt / "2_MixSPHead" / "model.safetensors"))
    assert not set(encoder) & set(head)
    assert {f"encoder.{k}" for k in encoder} | set(head) == set(bi_model.state_dict())
    hf = AutoModel.from_pretrained(ckpt / "encoder").eval()
    batch = bi_model.tokenize(SENTENCES)
    with torch.no_grad():
        torch.testing.assert_close(hf(**batch).last_hidden_state, bi_model.encoder(**batch).last_hidden_state)


def test_format_1_checkpoints_still_load(bi_model, tmp_path):
    """The layout before issue 13: every weight in one root model.safetensors, encoder/ without weights."""
    import shutil

    from safetensors.torch import save_model

    from mixsp_core.models.checkpoint import read_weights

    save_checkpoint(bi_model, tmp_path / "new")
    old = tmp_path / "old"
    (old / "encoder").mkdir(parents=True)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tmp_path / "new" / "encoder" / name, old / "encoder" / name)
    meta = json.loads((tmp_path / "new" / "config.json").read_text())
    meta["format_version"] = 1
    del meta["head_dir"], meta["weights_sha256"]  # format 1 predates both
    (old / "config.json").write_text(json.dumps(meta))
    save_model(bi_model, str(old / "model.safetensors"))
    before = bi_model.encode(SENTENCES, show_progress=False)
    assert np.array_equal(load_embedder(old, device="cpu").encode(SENTENCES, show_progress=False), before)
    assert read_weights(old).keys() == read_weights(tmp_path / "new").keys()
    meta["format_version"] = 0
    (old / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="format_version"):
        load_checkpoint(old)


def test_plain_hf_folder_gives_an_encoder(tiny_bert_dir):
    from mixsp_core.models.encoder import Encoder

    embedder = load_embedder(str(tiny_bert_dir), device="cpu")
    assert isinstance(embedder, Encoder)
    assert embedder.encode(SENTENCES[:2], show_progress=False).shape == (2, 32)


def test_layer_embedding_matches_a_checkpoint_cut_to_that_layer(bi_model, tmp_path):
    from mixsp_core.compress.layers import truncate_model_dir

    save_checkpoint(bi_model, tmp_path / "full")
    cut = truncate_model_dir(tmp_path / "full", tmp_path / "cut", keep=1)
    shallow = load_embedder(cut, device="cpu")
    assert shallow.num_layers == 1 and bi_model.num_layers == 2
    with torch.no_grad():
        out = bi_model(bi_model.tokenize(SENTENCES), layers=[1, 2])
    torch.testing.assert_close(out.layer_embeddings[2], out.embedding)  # the last layer is the final one
    expected = torch.nn.functional.normalize(out.layer_embeddings[1], dim=-1).numpy()
    got = shallow.encode(SENTENCES, batch_size=len(SENTENCES), show_progress=False)
    assert np.allclose(got, expected, atol=1e-5)
    with pytest.raises(ValueError, match="layers"):
        bi_model(bi_model.tokenize(SENTENCES), layers=[3])


def test_load_embedder_applies_a_saved_transform(bi_model, tmp_path):
    from mixsp_core.compress import TransformChain, TransformedEmbedder, make_step, write_compressed_model

    save_checkpoint(bi_model, tmp_path / "ckpt")
    full = bi_model.encode(SENTENCES, show_progress=False)
    chain = TransformChain([make_step("truncate:8")]).fit(full)
    write_compressed_model(tmp_path / "ckpt", chain, tmp_path / "small")
    small = load_embedder(tmp_path / "small", device="cpu")
    assert isinstance(small, TransformedEmbedder)
    assert np.allclose(small.encode(SENTENCES, show_progress=False), chain.apply(full), atol=1e-6)
    assert isinstance(load_embedder(tmp_path / "ckpt", device="cpu"), BiStudent)  # no transform/: unchanged
    with pytest.raises(ValueError, match="transform"):
        load_embedder(tmp_path / "small", device="cpu", dims=4)
