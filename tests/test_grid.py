"""The evaluation grid (layers x dims x vector type) and the retrieval check, on a tiny BERT and real STS pairs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from mixsp_core.compress import BinaryQuantizer, Int8Quantizer, PCATransform, TransformChain, TruncateTransform
from mixsp_core.errors import ConfigError
from mixsp_core.evaluate.grid import GridSpec, run_grid
from mixsp_core.evaluate.retrieval import (
    Variant,
    recall_at_k,
    retrieval_check,
    search_binary,
    search_float,
    search_int8,
)
from mixsp_core.evaluate.sts import cosine_rows, evaluate_embedder, score_table


@pytest.fixture(scope="module")
def pairs(senteval_dir):
    from mixsp_core.data.sources import load_pairs

    table = load_pairs(f"senteval:{senteval_dir}")
    dev = table[table["split"] == "dev"]
    return dev.groupby("task", group_keys=False).head(40).reset_index(drop=True)


@pytest.fixture(scope="module")
def corpus(senteval_dir) -> list[str]:
    from mixsp_core.data.sources import load_pairs

    train = load_pairs(f"senteval:{senteval_dir}").query("split == 'train'").head(50)
    return list(dict.fromkeys([*train["sentence1"], *train["sentence2"]]))


@pytest.fixture(scope="module")
def encoder(tiny_bert_dir):
    from mixsp_core.models.encoder import Encoder

    return Encoder(tiny_bert_dir, device="cpu")


def _spearman(pairs, vectors_of) -> dict[str, float]:
    left = vectors_of(list(pairs["sentence1"]))
    right = vectors_of(list(pairs["sentence2"]))
    return {k: v["spearman"] for k, v in score_table(pairs, cosine_rows(left, right)).items()}


def _cell(result, layers, dims, vtype):
    (cell,) = [c for c in result.cells if (c.layers, c.dims, c.vector_type) == (layers, dims, vtype)]
    return cell


def test_grid_cells_match_direct_evaluation(encoder, pairs, corpus, tmp_path):
    spec = GridSpec(layers=[1, 2], dims=[8, 16, 32], vector_types=["float32", "int8", "binary"], batch_size=16)
    result = run_grid(encoder, pairs, corpus, spec, model="tiny")
    assert len(result.cells) == 2 * 3 * 3 and result.total_layers == 2 and result.width == 32
    for c in result.cells:
        assert set(c.tasks) == {"STSBenchmark-dev", "SICK-trial"}
        sizes = {"float32": 4 * c.dims, "int8": c.dims, "binary": math.ceil(c.dims / 8)}
        assert c.bytes_per_vector == sizes[c.vector_type]
        assert c.sentences_per_s > 0 and c.dev == pytest.approx(np.mean(list(c.tasks.values())), abs=1e-3)
    assert encoder.num_layers == 2 and encoder.model.config.num_hidden_layers == 2  # layers restored

    # Full model, full width, float32: the plain evaluation.
    plain = evaluate_embedder(encoder, pairs)
    for task, row in plain["tasks"].items():
        assert _cell(result, 2, 32, "float32").tasks[task] == pytest.approx(row["spearman"], abs=1e-3)
    # One layer: the pooled state of layer 1 of the full model.
    layer1 = _spearman(pairs, lambda s: encoder.encode_layers(s, [1], show_progress=False)[1])
    assert _cell(result, 1, 32, "float32").tasks == pytest.approx(layer1, abs=1e-3)
    # PCA to 8 dims + int8, fitted on the corpus (not on the evaluation sentences).
    chain = TransformChain([PCATransform(8), Int8Quantizer()]).fit(encoder.encode(corpus, show_progress=False))
    expected = _spearman(pairs, lambda s: chain.apply(encoder.encode(s, show_progress=False)))
    cell = _cell(result, 2, 8, "int8")
    assert cell.tasks == pytest.approx(expected, abs=1e-3) and cell.transform == "pca8+int8"

    files = result.write(tmp_path)
    saved = json.loads(files["json"].read_text())
    assert len(saved["cells"]) == 18 and saved["spec"]["layers"] == [1, 2]
    table = files["markdown"].read_text().strip().splitlines()
    assert len(table) == 2 + 18 and "STSBenchmark-dev" in table[0]
    assert files["plot"].stat().st_size > 1000


def test_grid_prefix_truncation_and_errors(encoder, pairs, corpus):
    result = run_grid(encoder, pairs, corpus, GridSpec(dims=[8], vector_types=["binary"], dim_method="truncate"))
    (cell,) = result.cells
    prefix = TransformChain([TruncateTransform(8), BinaryQuantizer()]).fit(np.zeros((1, 32), np.float32))
    expected = _spearman(pairs, lambda s: prefix.apply(encoder.encode(s, show_progress=False)))
    assert cell.layers == 2 and cell.tasks == pytest.approx(expected, abs=1e-3) and cell.bytes_per_vector == 1
    with pytest.raises(ConfigError, match="grid.layers"):
        run_grid(encoder, pairs, corpus, GridSpec(layers=[3]))
    with pytest.raises(ConfigError, match="grid.vector_types"):
        run_grid(encoder, pairs, corpus, GridSpec(vector_types=["int4"]))


# -- retrieval ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vectors(encoder, corpus, pairs) -> tuple[np.ndarray, np.ndarray]:
    queries = list(pairs["sentence1"].head(12))
    return encoder.encode(corpus, show_progress=False), encoder.encode(queries, show_progress=False)


def test_exact_searches_match_brute_force(vectors):
    corpus, queries = vectors
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    brute = np.argsort(-(unit(queries) @ unit(corpus).T), axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(search_float(corpus, queries, 10), brute)

    q8 = Int8Quantizer().fit(corpus)
    decoded = q8.dequantize(q8.quantize(corpus))
    np.testing.assert_array_equal(search_int8(q8.quantize(corpus), q8, queries, 10), search_float(decoded, queries, 10))

    bits = BinaryQuantizer().fit(corpus)
    found = search_binary(bits.pack(corpus), bits.pack(queries), 10)
    hamming = (bits.bits(queries)[:, None, :] != bits.bits(corpus)[None, :, :]).sum(axis=2)
    # Ties make ids ambiguous; the distances found must be the 10 smallest, in order.
    np.testing.assert_array_equal(np.take_along_axis(hamming, found, axis=1), np.sort(hamming, axis=1)[:, :10])


def test_retrieval_check_reports_recall_qps_and_bytes(vectors):
    corpus, queries = vectors
    n, d = corpus.shape
    variants = [
        Variant("same", corpus, queries, None),
        Variant("pca16", corpus, queries, TransformChain([PCATransform(16)]).fit(corpus)),
        Variant("int8", corpus, queries, TransformChain([Int8Quantizer()]).fit(corpus)),
        Variant("pca16+binary", corpus, queries, TransformChain([PCATransform(16), BinaryQuantizer()]).fit(corpus)),
    ]
    report = retrieval_check(corpus, queries, variants, k=5)
    rows = {r["name"]: r for r in report["variants"]}
    assert rows["full float32"]["recall_at_k"] == 1.0 and rows["same"]["recall_at_k"] == 1.0
    assert rows["int8"]["index_bytes"] == n * d and rows["full float32"]["index_bytes"] == 4 * n * d
    assert rows["pca16+binary"]["index_bytes"] == n * 2 and rows["pca16+binary"]["bytes_per_vector"] == 2
    assert 0.0 <= rows["pca16+binary"]["recall_at_k"] <= rows["int8"]["recall_at_k"]
    assert all(r["qps"] > 0 for r in report["variants"])
    assert recall_at_k(np.array([[1, 2, 3]]), np.array([[3, 4, 1]])) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="variant bad"):
        retrieval_check(corpus, queries, [Variant("bad", corpus[:5], queries)], k=5)
