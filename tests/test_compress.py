"""Post-hoc transforms (round trips, whitening, quantisers), layer truncation and the Matryoshka loss."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from mixsp_core.compress import (
    WHITENING_METHODS,
    BinaryQuantizer,
    Int8Quantizer,
    L2Normalize,
    PCATransform,
    TransformChain,
    TransformedEmbedder,
    TruncateTransform,
    WhiteningTransform,
    load_transform,
    make_step,
    wrap_if_transformed,
)
from mixsp_core.compress.layers import cut_layers, limited_layers, num_layers, save_truncated_encoder
from mixsp_core.errors import CheckpointError, ConfigError
from mixsp_core.losses.cosent import CoSENTLoss
from mixsp_core.losses.matryoshka import MatryoshkaLoss, alignment_loss, ese_pca, layer_weight

SENTENCES = [
    "A man is playing a guitar.", "A woman is slicing an onion.", "Two dogs run across a field.",
    "The cat sleeps on the warm windowsill.", "A child is riding a red bicycle.", "Stocks fell sharply on Monday.",
    "The committee approved the new budget.", "A plane is taking off from the runway.", "She reads a book in the park.",
    "Rain is expected over the weekend.", "The chef prepares a large pot of soup.", "A boy kicks a football.",
    "Scientists discovered a new species of frog.", "The train was delayed by an hour.", "He is typing on a laptop.",
    "Children are building a sandcastle.", "The museum opens at nine.", "A horse jumps over a fence.",
    "The president spoke to reporters.", "A girl is brushing her hair.", "Oil prices rose again.",
    "The band played until midnight.", "A man is cutting wood with a saw.", "The river flooded the village.",
    "Two women are talking on a bench.", "A dog catches a frisbee.", "The store is closed on Sundays.",
    "He forgot his umbrella at home.", "A bird sits on a wire.", "The team won the championship.",
    "A cook is frying eggs.", "The printer is out of paper.", "Snow covered the mountains.",
    "A man plays the piano on stage.", "The baby is laughing.", "Police arrested two suspects.",
    "A woman is peeling potatoes.", "The bridge was closed for repairs.", "Kids are swimming in a lake.",
    "The old car would not start.", "A couple dances at a wedding.", "Exports grew by five percent.",
    "A monkey climbs a tree.", "The lecture was cancelled.", "Someone is mowing the lawn.",
    "A boat sails across the bay.", "The phone battery died.", "A teacher writes on the board.",
    "Farmers harvest wheat in autumn.", "The kitten chases a ball of yarn.", "Fire destroyed the warehouse.",
    "A man is riding a horse on the beach.", "Voters went to the polls today.", "A woman is playing the violin.",
    "The coffee is too hot to drink.", "Tourists photograph the tower.", "A player scores a goal.",
    "The library has a new wing.", "A cyclist climbs a steep hill.", "The moon is bright tonight.",
    "Workers repair the road.", "A squirrel buries a nut.",
]


@pytest.fixture(scope="module")
def encoder(tiny_bert_dir):
    from mixsp_core.models.encoder import Encoder

    return Encoder(tiny_bert_dir, device="cpu")


@pytest.fixture(scope="module")
def vectors(encoder) -> np.ndarray:
    """Real (random-weight tiny BERT) embeddings: 62 rows of 32 dims."""
    return encoder.encode(SENTENCES, batch_size=16, show_progress=False)


def _chains() -> dict[str, list]:
    return {
        "pca": [PCATransform(8)],
        "pca-nocenter": [PCATransform(8, center=False)],
        "truncate": [TruncateTransform(12)],
        "int8": [Int8Quantizer()],
        "binary": [BinaryQuantizer(center=True)],
        "pca+int8": [PCATransform(16), Int8Quantizer(clip=0.01)],
        "truncate+binary": [TruncateTransform(20), BinaryQuantizer()],
        "truncate+zca+l2": [TruncateTransform(16), WhiteningTransform("zca"), L2Normalize()],
        **{f"whitening-{m}": [TruncateTransform(16), WhiteningTransform(m)] for m in WHITENING_METHODS},
        "whitening-pca-cor:6": [WhiteningTransform("pca-cor", dims=6)],
    }


@pytest.mark.parametrize("name", list(_chains()))
def test_transform_round_trip(name, vectors, tmp_path):
    fit, held_out = vectors[:45], vectors[45:]
    chain = TransformChain(_chains()[name]).fit(fit)
    chain.save(tmp_path / "t", extra={"corpus": "test"})
    loaded = load_transform(tmp_path / "t")
    assert repr(loaded) == repr(chain)
    assert loaded.output_dim == chain.output_dim and loaded.vector_type == chain.vector_type
    np.testing.assert_array_equal(loaded.apply(held_out), chain.apply(held_out))
    np.testing.assert_array_equal(loaded.store(held_out), chain.store(held_out))
    saved = json.loads((tmp_path / "t" / "transform.json").read_text())
    assert saved["bytes_per_vector"] == chain.bytes_per_vector and saved["info"] == {"corpus": "test"}


def test_transformed_embedder_from_checkpoint_dir(encoder, vectors, tmp_path):
    chain = TransformChain([PCATransform(8), Int8Quantizer()]).fit(vectors)
    chain.save(tmp_path / "ckpt" / "transform")
    wrapped = wrap_if_transformed(encoder, tmp_path / "ckpt")
    assert isinstance(wrapped, TransformedEmbedder) and wrapped.dim == 8
    out = wrapped.encode(SENTENCES[:5], batch_size=4, show_progress=False)
    np.testing.assert_allclose(out, chain.apply(vectors[:5]), atol=1e-5)
    assert wrapped.encode_stored(SENTENCES[:5], batch_size=4, show_progress=False).dtype == np.int8
    assert wrap_if_transformed(encoder, tmp_path) is encoder  # no transform/ folder: unchanged


@pytest.mark.parametrize("method", WHITENING_METHODS)
def test_whitening_gives_identity_covariance_on_fitting_data(method, vectors):
    # Mean-pooled LayerNorm outputs of a random BERT sum to zero over dims (covariance of rank d - 1),
    # so full-width whitening is fitted on the first 16 dims (correlated, full rank).
    reduced = vectors[:, :16]
    white = WhiteningTransform(method).fit(reduced)
    out = white.apply(reduced).astype(np.float64)
    np.testing.assert_allclose(out.mean(axis=0), 0.0, atol=1e-4)
    np.testing.assert_allclose(np.cov(out, rowvar=False), np.eye(16), atol=2e-3)
    if method in ("zca", "zca-cor", "cholesky"):  # not just PCA whitening again
        pca_white = WhiteningTransform("pca").fit(reduced).apply(reduced)
        assert not np.allclose(np.abs(out), np.abs(pca_white), atol=1e-2)


@pytest.mark.parametrize("method", WHITENING_METHODS)
def test_whitening_leaves_constant_dims_out(method, vectors):
    # all-MiniLM-L6-v2 has dims that never vary; they cannot be whitened and carry no similarity signal.
    data = np.insert(vectors[:, :16], 5, 0.25, axis=1)
    white = WhiteningTransform(method).fit(data)
    out = white.apply(data).astype(np.float64)
    assert out.shape == (len(data), 16) and white.output_dim == 16
    assert (white.weight[:, 5] == 0).all()
    np.testing.assert_allclose(np.cov(out, rowvar=False), np.eye(16), atol=2e-3)


def test_whitening_refuses_rank_deficient_embeddings(vectors):
    with pytest.raises(ConfigError, match="singular"):
        WhiteningTransform("zca").fit(vectors)


@pytest.mark.parametrize("method", ["pca", "pca-cor"])
def test_reduced_whitening_keeps_identity_covariance(method, vectors):
    out = WhiteningTransform(method, dims=5).fit(vectors).apply(vectors).astype(np.float64)
    assert out.shape == (len(vectors), 5)
    np.testing.assert_allclose(np.cov(out, rowvar=False), np.eye(5), atol=2e-3)


def test_whitening_errors():
    with pytest.raises(ConfigError, match="whitening.dims"):
        WhiteningTransform("zca", dims=8)
    with pytest.raises(ConfigError, match="whitening.method"):
        WhiteningTransform("pca-corr")
    rank_deficient = np.random.default_rng(0).normal(size=(10, 32)).astype(np.float32)
    with pytest.raises(ConfigError, match="singular"):
        WhiteningTransform("zca").fit(rank_deficient)


def test_pca_matches_sklearn_and_torch_linear(vectors):
    from sklearn.decomposition import PCA

    pca = PCATransform(6).fit(vectors)
    ref = PCA(n_components=6, random_state=0).fit(vectors.astype(np.float64)).transform(vectors)
    np.testing.assert_allclose(pca.apply(vectors), ref, atol=1e-4)
    linear, mean = pca.torch_linear()
    assert linear.bias is None and not linear.weight.requires_grad
    with torch.no_grad():
        out = linear(torch.from_numpy(vectors) - mean).numpy()
    np.testing.assert_allclose(out, pca.apply(vectors), atol=1e-5)
    # Uncentred: a plain projection onto the top right-singular vectors, orthonormal rows.
    raw = PCATransform(6, center=False).fit(vectors)
    np.testing.assert_allclose(raw.weight @ raw.weight.T, np.eye(6), atol=1e-5)
    np.testing.assert_allclose(raw.apply(vectors), vectors @ raw.weight.T, atol=1e-6)
    with pytest.raises(ConfigError, match="pca.dims"):
        PCATransform(64).fit(vectors)


def test_int8_quantiser(vectors):
    q = Int8Quantizer().fit(vectors)
    codes = q.quantize(vectors)
    assert codes.dtype == np.int8 and codes.min() == -128 and codes.max() == 127
    # On calibration data every value lies inside its dim's range: error at most half a step.
    assert (np.abs(q.dequantize(codes) - vectors) <= q.step / 2 + 1e-6).all()
    chain = TransformChain([q])
    assert chain.bytes_per_vector == vectors.shape[1] and chain.vector_type == "int8"


def test_binary_quantiser_bytes_and_hamming(vectors):
    b = BinaryQuantizer().fit(vectors)
    packed = b.pack(vectors)
    assert packed.dtype == np.uint8 and packed.shape == (len(vectors), math.ceil(vectors.shape[1] / 8))
    signs = b.apply(vectors)
    assert set(np.unique(signs)) <= {-1.0, 1.0}
    hamming = np.unpackbits(packed[0] ^ packed[1]).sum()
    cosine = signs[0] @ signs[1] / vectors.shape[1]
    assert cosine == pytest.approx(1 - 2 * hamming / vectors.shape[1])
    assert TransformChain([TruncateTransform(20), BinaryQuantizer()]).fit(vectors).bytes_per_vector == 3


def test_load_transform_errors(vectors, tmp_path):
    with pytest.raises(CheckpointError, match="no saved transform"):
        load_transform(tmp_path)
    TransformChain([PCATransform(4)]).fit(vectors).save(tmp_path / "t")
    config = tmp_path / "t" / "transform.json"
    text = config.read_text()
    config.write_text(text.replace('"pca"', '"lda"'))
    with pytest.raises(CheckpointError, match="unknown kind 'lda'"):
        load_transform(tmp_path / "t")
    config.write_text(text.replace('"dims": 4', '"dims": 5'))
    with pytest.raises(CheckpointError, match="weight has shape"):
        load_transform(tmp_path / "t")
    config.write_text("{\n  \"mixsp_transform\": 1,\n  oops\n}")
    with pytest.raises(CheckpointError, match=r"transform.json:3: invalid JSON"):
        load_transform(tmp_path / "t")


def test_chain_rules_and_make_step(vectors):
    with pytest.raises(ValueError, match="only the last step"):
        TransformChain([Int8Quantizer(), PCATransform(4)])
    assert TransformChain([make_step("pca:8"), make_step("binary")]).fit(vectors).name == "pca8+binary"
    assert make_step("whitening:pca-cor:16").dims == 16
    with pytest.raises(ConfigError, match="unknown step"):
        make_step("svd:8")
    with pytest.raises(ValueError, match="fitted on 32-dim"):
        PCATransform(4).fit(vectors).apply(vectors[:, :16])


# -- fewer layers ---------------------------------------------------------------------------------

def test_truncated_encoder_matches_hidden_state_of_full_model(tiny_teacher_dir, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    out = save_truncated_encoder(tiny_teacher_dir, tmp_path / "cut", keep=2)
    full = AutoModel.from_pretrained(tiny_teacher_dir).eval()
    cut = AutoModel.from_pretrained(out).eval()
    assert cut.config.num_hidden_layers == 2 and num_layers(cut) == 2 and num_layers(full) == 3
    tokenizer = AutoTokenizer.from_pretrained(out)
    batch = tokenizer(SENTENCES[:6], padding=True, return_tensors="pt")
    with torch.no_grad():
        reference = full(**batch, output_hidden_states=True).hidden_states[2]
        mine = cut(**batch).last_hidden_state
    torch.testing.assert_close(mine, reference, rtol=0, atol=1e-6)
    assert not torch.allclose(mine, full(**batch).last_hidden_state)  # layer 3 really was dropped
    assert json.loads((out / "mixsp_layers.json").read_text())["kept_layers"] == 2


def test_limited_layers_is_temporary_and_matches_encode_layers(tiny_teacher_dir):
    from mixsp_core.models.encoder import Encoder

    enc = Encoder(tiny_teacher_dir, device="cpu")
    reference = enc.encode_layers(SENTENCES[:8], [1], show_progress=False)[1]
    full = enc.encode(SENTENCES[:8], show_progress=False)
    with limited_layers(enc, 1) as shallow:
        assert shallow.num_layers == 1 and enc.model.config.num_hidden_layers == 1
        np.testing.assert_allclose(shallow.encode(SENTENCES[:8], show_progress=False), reference, atol=1e-6)
    assert enc.num_layers == 3 and num_layers(enc.model) == 3
    np.testing.assert_array_equal(enc.encode(SENTENCES[:8], show_progress=False), full)
    with pytest.raises(ConfigError, match="layers"):
        cut_layers(enc.model, 4)


# -- trained-in compression: Matryoshka / 2DMSE / ESE -----------------------------------------------

def _pairs(batch: int = 8, dim: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    e1 = torch.randn(batch, dim, generator=g, requires_grad=True)
    e2 = torch.randn(batch, dim, generator=g, requires_grad=True)
    gold = torch.rand(batch, generator=g) * 5
    return e1, e2, gold


def test_matryoshka_sums_prefix_losses():
    cosent = CoSENTLoss()
    e1, e2, gold = _pairs()
    loss = MatryoshkaLoss(cosent, dims=[4, 8, 16, 32], ese_dim=None)(e1, e2, gold)
    cos = torch.nn.functional.cosine_similarity
    # The full term covers width 16; prefixes at or above the width (16, 32) add nothing more.
    torch.testing.assert_close(loss, cosent(cos(e1, e2), gold) + cosent(cos(e1[:, :4], e2[:, :4]), gold)
                               + cosent(cos(e1[:, :8], e2[:, :8]), gold))
    loss.backward()
    assert e1.grad is not None and e1.grad[:, 8:].abs().sum() > 0


def test_ese_alignment_and_layers():
    cosent = CoSENTLoss()
    e1, e2, gold = _pairs(dim=16)
    l1, l2, _ = _pairs(dim=16, seed=1)
    target = ese_pca(torch.cat([e1, e2]), 4)
    assert target.shape == (16, 4) and not target.requires_grad
    assert alignment_loss(target, target) == pytest.approx(0.0, abs=1e-6)
    assert layer_weight(1) == pytest.approx(1 / (1 + math.log(2)))
    loss_fn = MatryoshkaLoss(cosent, dims=[4, 8], ese_dim=4, layer_mode="all")
    torch.manual_seed(0)
    total = loss_fn(e1, e2, gold, layers1={2: l1}, layers2={2: l2})
    terms = loss_fn.last_terms
    assert {"final/full", "final/4", "final/8", "final/align", "layer2/full", "layer2/align"} <= set(terms)
    layer_part = terms["layer2/full"] + terms["layer2/4"] + terms["layer2/8"] + terms["layer2/align"]
    final_part = terms["final/full"] + terms["final/4"] + terms["final/8"] + terms["final/align"]
    assert float(total.detach()) == pytest.approx(final_part + layer_weight(2) * layer_part, rel=1e-5)
    total.backward()
    assert l1.grad is not None and l1.grad.abs().sum() > 0
    sampler = MatryoshkaLoss(cosent, seed=3)
    assert {sampler.sample_layer(6) for _ in range(200)} == {1, 2, 3, 4, 5}
    assert sampler.sample_layer(1) is None
    with pytest.raises(ConfigError, match="matryoshka.layer_mode"):
        MatryoshkaLoss(cosent, layer_mode="every")


def test_write_compressed_model_is_self_contained(tiny_bert_dir, encoder, vectors, tmp_path):
    from mixsp_core.compress import write_compressed_model
    from mixsp_core.models.encoder import Encoder

    chain = TransformChain([PCATransform(8), BinaryQuantizer()]).fit(vectors)
    out = write_compressed_model(tiny_bert_dir, chain, tmp_path / "pca8-bin", info={"corpus": "SENTENCES"})
    assert (out / "model.safetensors").is_file() and (out / "transform" / "transform.json").is_file()
    reloaded = wrap_if_transformed(Encoder(out, device="cpu"), out)
    np.testing.assert_array_equal(reloaded.encode(SENTENCES[:4], show_progress=False), chain.apply(vectors[:4]))
    with pytest.raises(ValueError, match="new directory"):
        write_compressed_model(out, chain, out)


def test_project_checkpoint_cut_to_fewer_layers(tiny_teacher_dir, tmp_path):
    """A BiStudent checkpoint cut to 2 of 3 layers loads on its own and embeds as the full one run
    with 2 layers."""
    from mixsp_core.compress.layers import truncate_model_dir
    from mixsp_core.models.checkpoint import load_checkpoint, save_checkpoint
    from mixsp_core.models.student import BiStudent
    from mixsp_core.training.config import ModelConfig

    torch.manual_seed(0)
    full = BiStudent.from_config(ModelConfig(encoder=str(tiny_teacher_dir), output_dim=16)).eval()
    src = save_checkpoint(full, tmp_path / "full", extra={"dev": 1.0})
    out = truncate_model_dir(src, tmp_path / "cut2", keep=2)
    cut = load_checkpoint(out)
    assert cut.encoder.config.num_hidden_layers == 2 and num_layers(cut.encoder) == 2
    with limited_layers(full, 2):
        reference = full.encode(SENTENCES[:6], show_progress=False)
    np.testing.assert_allclose(cut.encode(SENTENCES[:6], show_progress=False), reference, atol=1e-6)
    meta = json.loads((out / "config.json").read_text())
    assert meta["training"]["layers"]["kept_layers"] == 2 and meta["training"]["dev"] == 1.0
