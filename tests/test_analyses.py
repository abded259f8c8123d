"""The evaluation analyses: geometry measures on data of known shape, whitening as Kessy et al. define it,
SentEval-style transfer on tiny tasks, and the evaluate stage writing the analyses into its report."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pandas as pd
import pytest

from mixsp_core.compress import WHITENING_METHODS, WhiteningTransform
from mixsp_core.errors import ConfigError
from mixsp_core.evaluate.geometry import (
    isoscore,
    mean_pairwise_cosine,
    partition_isotropy,
    prefix_sizes,
    prefix_spearman,
    twonn_dimension,
)
from mixsp_core.evaluate.transfer import TransferTask, classification_accuracy, load_transfer_task


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# -- geometry ---------------------------------------------------------------------------------------------
def test_twonn_finds_the_dimension_of_a_plane_and_of_a_5d_cloud_embedded_in_more_dims():
    rotation, _ = np.linalg.qr(_rng().normal(size=(10, 10)))
    plane = _rng(1).uniform(size=(2000, 2)) @ rotation[:2]  # a 2-d square inside 10-d
    assert twonn_dimension(plane) == pytest.approx(2.0, abs=0.2)
    cloud = np.c_[_rng(2).normal(size=(2000, 5)), np.zeros((2000, 15))] @ np.linalg.qr(_rng(3).normal(size=(20, 20)))[0]
    assert twonn_dimension(cloud) == pytest.approx(5.0, abs=0.5)


def test_twonn_leaves_duplicate_points_out():
    points = _rng().uniform(size=(500, 2))
    with_duplicates = np.r_[points, points[:50]]  # r1 = 0 for 100 rows: no ratio, not infinity
    assert np.isfinite(twonn_dimension(with_duplicates))
    assert twonn_dimension(with_duplicates) == pytest.approx(2.0, abs=0.4)


def test_isoscore_is_one_for_isotropic_and_zero_for_one_dimensional_data():
    isotropic = _rng().normal(size=(5000, 20))
    assert isoscore(isotropic) > 0.97
    line = np.outer(_rng(1).normal(size=300), _rng(2).normal(size=20))  # all variance on one axis
    assert isoscore(line) == pytest.approx(0.0, abs=1e-9)
    # two equal axes of 20: IsoScore between the extremes, and about the 2/20 of dims in use
    two = np.c_[_rng(3).normal(size=(5000, 2)), np.zeros((5000, 18))]
    assert 0.02 < isoscore(two) < 0.15
    # scale does not matter
    assert isoscore(isotropic * 7.0) == pytest.approx(isoscore(isotropic))


def test_partition_isotropy_and_mean_cosine_see_a_common_direction():
    isotropic = 0.1 * _rng().normal(size=(4000, 16))
    shifted = isotropic + 0.5  # a common mean direction, the "narrow cone"
    assert partition_isotropy(isotropic) > 0.9
    assert partition_isotropy(shifted) < 0.1
    assert abs(mean_pairwise_cosine(isotropic)) < 0.01
    assert mean_pairwise_cosine(shifted) > 0.9


def test_mean_pairwise_cosine_against_hand_computed_pairs():
    x = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    # cosines: (1,2) 0, (1,3) 1/sqrt2, (2,3) 1/sqrt2
    assert mean_pairwise_cosine(x) == pytest.approx((0 + 2 / np.sqrt(2)) / 3)


def test_prefix_sizes_double_from_8_and_end_at_the_width():
    assert prefix_sizes(384) == [8, 16, 32, 64, 128, 256, 384]
    assert prefix_sizes(64) == [8, 16, 32, 64]
    assert prefix_sizes(5) == [5]


def test_prefix_spearman_scores_the_first_k_dims_and_a_corpus_fitted_pca():
    rng = _rng()
    n = 60
    signal = rng.normal(size=(2 * n, 16))
    vectors = np.c_[signal, rng.normal(size=(2 * n, 16))]  # first 16 dims carry the pairs' similarity
    gold = np.linspace(0, 5, n)
    right = vectors[n:].copy()
    right[:, :16] = vectors[:n, :16] * gold[:, None] + (5 - gold[:, None]) * right[:, :16]
    vectors[n:] = right
    pairs = pd.DataFrame({"sentence1": [f"a{i}" for i in range(n)], "sentence2": [f"b{i}" for i in range(n)],
                          "score": gold, "task": "STSBenchmark", "subset": "x", "split": "dev"})
    rows = prefix_spearman(pairs, vectors, np.arange(n), np.arange(n, 2 * n), fit_vectors=rng.normal(size=(200, 32)))
    by_dims = {r["dims"]: r for r in rows}
    assert list(by_dims) == [8, 16, 32]
    assert by_dims[16]["prefix"] > by_dims[32]["prefix"]  # the noise dims only hurt
    assert by_dims[32]["pca"] == by_dims[32]["prefix"]  # full width: the vectors as they are
    assert by_dims[8]["pca"] is not None and set(by_dims[8]["tasks"]) == {"STSBenchmark-dev"}


# -- whitening (Kessy, Lewis & Strimmer 2018) ------------------------------------------------------------
@pytest.fixture(scope="module")
def correlated():
    rng = _rng(4)
    mixing = rng.normal(size=(6, 6)) * np.r_[3.0, 2.0, 1.0, 0.5, 0.3, 0.1][:, None]
    return rng.normal(size=(4000, 6)) @ mixing + rng.normal(size=6) * 4  # correlated, unequal scales, a mean


def _fitted(x):
    return {m: WhiteningTransform(m).fit(x) for m in WHITENING_METHODS}


def test_every_whitening_gives_identity_covariance_and_inverts_sigma(correlated):
    sigma_inv = np.linalg.inv(np.cov(correlated, rowvar=False))
    for method, t in _fitted(correlated).items():
        y = t.apply(correlated).astype(np.float64)
        assert np.allclose(np.cov(y, rowvar=False), np.eye(6), atol=1e-3), method
        w = t.weight.astype(np.float64)
        assert np.allclose(w.T @ w, sigma_inv, rtol=1e-3, atol=1e-5), method  # W^T W = Σ^-1 for any whitening


def test_zca_is_closest_to_the_centred_input_and_zca_cor_to_the_standardised_input(correlated):
    centred = correlated - correlated.mean(axis=0)
    standardised = centred / correlated.std(axis=0, ddof=1)
    outputs = {m: t.apply(correlated).astype(np.float64) for m, t in _fitted(correlated).items()}
    to_input = {m: np.mean((y - centred) ** 2) for m, y in outputs.items()}
    to_standard = {m: np.mean((y - standardised) ** 2) for m, y in outputs.items()}
    assert min(to_input, key=to_input.get) == "zca"
    assert min(to_standard, key=to_standard.get) == "zca-cor"


def test_pca_pca_cor_and_cholesky_have_their_defining_structure(correlated):
    fitted = _fitted(correlated)
    sigma = np.cov(correlated, rowvar=False)
    # PCA: rows of W are the eigenvectors of Σ over sqrt of their eigenvalues: W W^T = Λ^-1, ascending
    w = fitted["pca"].weight.astype(np.float64)
    gram = w @ w.T
    assert np.allclose(gram, np.diag(np.diag(gram)), atol=1e-4 * gram.max())
    assert np.all(np.diff(np.diag(gram)) > 0)
    # PCA-cor: the cross-correlation cor(y, x) = Θ^1/2 G^T has orthogonal rows, descending norms
    y = fitted["pca-cor"].apply(correlated).astype(np.float64)
    cross = np.corrcoef(y.T, correlated.T)[:6, 6:]
    cross_gram = cross @ cross.T
    assert np.allclose(cross_gram, np.diag(np.diag(cross_gram)), atol=1e-3)
    assert np.all(np.diff(np.diag(cross_gram)) < 0)
    # ZCA symmetric; Cholesky upper triangular with a positive diagonal
    assert np.allclose(fitted["zca"].weight, fitted["zca"].weight.T, atol=1e-5)
    chol = fitted["cholesky"].weight
    assert np.allclose(np.tril(chol, -1), 0) and np.all(np.diag(chol) > 0)
    assert not np.allclose(sigma, np.diag(np.diag(sigma)))  # the data really is correlated


def test_the_five_whitenings_differ_by_a_rotation_so_cosines_agree(correlated):
    outputs = [t.apply(correlated[:200]).astype(np.float64) for t in _fitted(correlated).values()]
    units = [y / np.linalg.norm(y, axis=1, keepdims=True) for y in outputs]
    for other in units[1:]:
        assert np.allclose(units[0] @ units[0].T, other @ other.T, atol=1e-4)


# -- transfer ---------------------------------------------------------------------------------------------
def _task(labels, test=None) -> TransferTask:
    labels = np.asarray(labels)
    return TransferTask("toy", [f"s{i}" for i in range(len(labels))], labels, test, "toy")


def test_classification_accuracy_separable_and_noise():
    rng = _rng()
    labels = np.repeat([0, 1], 100)
    separable = rng.normal(size=(200, 8)) + labels[:, None] * 6.0
    assert classification_accuracy(separable, _task(labels)) == 100.0
    noise = rng.normal(size=(200, 8))
    assert 30 < classification_accuracy(noise, _task(labels)) < 70
    # a given split: train on the rest, score the test rows only
    test = np.zeros(200, bool)
    test[::5] = True
    assert classification_accuracy(separable, _task(labels, test)) == 100.0
    with pytest.raises(ValueError, match="feature rows"):
        classification_accuracy(separable[:10], _task(labels))


def test_isotropic_scale_is_rotation_invariant_and_gives_unit_mean_variance():
    from mixsp_core.evaluate.transfer import isotropic_scale

    rng = _rng()
    train, test = rng.normal(size=(300, 6)) * [5, 1, 1, 1, 1, 0.1] + 3, rng.normal(size=(20, 6))
    scaled_train, scaled_test = isotropic_scale(train, test)
    assert np.mean(scaled_train.var(axis=0)) == pytest.approx(1.0)
    assert np.allclose(scaled_train.mean(axis=0), 0)
    rotation = np.linalg.qr(rng.normal(size=(6, 6)))[0]
    rotated_train, rotated_test = isotropic_scale(train @ rotation, test @ rotation)
    assert np.allclose(rotated_test, scaled_test @ rotation)


def _write(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")


def test_load_transfer_task_layouts_caps_and_protocols(tmp_path):
    _write(tmp_path / "MR" / "rt-polarity.pos", [f"good film {i}" for i in range(30)])
    _write(tmp_path / "MR" / "rt-polarity.neg", [f"bad film {i}" for i in range(20)])
    mr = load_transfer_task(tmp_path, "MR")
    assert mr.protocol == "10-fold CV" and mr.test is None and len(mr.sentences) == 50
    assert mr.labels.sum() == 30 and mr.sentences[0] == "good film 0" and mr.labels[0] == 1
    capped = load_transfer_task(tmp_path, "MR", max_sentences=20, seed=3)
    assert len(capped.sentences) == 20 and capped.sentences == load_transfer_task(tmp_path, "MR", 20, 3).sentences
    assert load_transfer_task(tmp_path, "CR") is None  # files not there

    _write(tmp_path / "TREC" / "train_5500.label",
           [f"{lab}:x question {i} ?" for i, lab in enumerate(["DESC", "LOC", "NUM"] * 10)])
    trec = load_transfer_task(tmp_path, "TREC")
    assert trec.classes == 3 and "hold-out" in trec.protocol and trec.test.sum() == 6  # 20% of each class
    _write(tmp_path / "TREC" / "TREC_10.label", ["LOC:city where is it ?", "DESC:def what is it ?"])
    trec = load_transfer_task(tmp_path, "TREC")
    assert trec.protocol == "given train / test split" and trec.test.sum() == 2 and trec.sentences[-1] == "what is it ?"

    _write(tmp_path / "SST" / "binary" / "sentiment-train", [f"phrase {i} \t{i % 2}" for i in range(40)])
    sst = load_transfer_task(tmp_path, "SST2")
    assert sst.classes == 2 and sst.test.sum() == 8 and sst.sentences[0] == "phrase 0"


class HashEmbedder:
    """Deterministic vectors from the sentence text; ``good`` / ``bad`` move one coordinate (a label signal)."""

    dim = 24

    def encode(self, sentences, batch_size=64, show_progress=False):
        rows = []
        for s in sentences:
            seed = int.from_bytes(hashlib.sha256(s.encode()).digest()[:8], "little")
            v = np.random.default_rng(seed).normal(size=self.dim)
            v[0] += 4.0 * ("good" in s) - 4.0 * ("bad" in s)
            rows.append(v)
        return np.asarray(rows, dtype=np.float32)


def _dev_pairs(n=40) -> pd.DataFrame:
    return pd.DataFrame({"sentence1": [f"left {i}" for i in range(n)], "sentence2": [f"right {i}" for i in range(n)],
                         "score": np.linspace(0, 5, n), "task": "STSBenchmark", "subset": "x", "split": "dev"})


def test_run_analyses_end_to_end_writes_json_markdown_and_plots(tmp_path):
    from mixsp_core.evaluate.analyses import AnalysesSpec, analyses_metrics, run_analyses, write_analyses

    senteval = tmp_path / "senteval"
    _write(senteval / "MR" / "rt-polarity.pos", [f"good film {i}" for i in range(60)])
    _write(senteval / "MR" / "rt-polarity.neg", [f"bad film {i}" for i in range(60)])
    spec = AnalysesSpec(sample_sentences=100, transfer_tasks=["MR", "CR"], transfer_max_sentences=80,
                        whitenings=["pca", "zca", "pca:8"], senteval_dir=senteval)
    corpus = [f"corpus sentence {i}" for i in range(150)]
    result = run_analyses(HashEmbedder(), _dev_pairs(), corpus, spec, model="hash")
    assert result["sample_sentences"] == 100 and result["geometry"]["width"] == 24
    assert [r["dims"] for r in result["prefix"]] == [8, 16, 24]
    rows = {r["embedding"]: r for r in result["transfer"]["rows"]}
    assert list(rows) == ["none", "pca", "zca", "pca:8"] and rows["pca:8"]["dims"] == 8
    assert rows["none"]["accuracy"]["MR"] > 90  # the label signal is there
    assert rows["pca"]["dev"] == pytest.approx(rows["zca"]["dev"])  # cosines agree across whitenings
    # and so does an L2 logistic regression behind an isotropic scale (both rotation invariant)
    assert rows["pca"]["accuracy"]["MR"] == pytest.approx(rows["zca"]["accuracy"]["MR"], abs=1.5)
    assert "CR" in result["skipped"] and list(result["transfer"]["tasks"]) == ["MR"]
    assert run_analyses(HashEmbedder(), _dev_pairs(), corpus, spec, model="hash")["transfer"]["rows"] == \
        result["transfer"]["rows"]  # deterministic
    files = write_analyses(result, tmp_path / "out")
    assert all(p.is_file() for p in files.values())
    text = files["markdown"].read_text()
    assert "TwoNN" in text and "| pca:8 | 8 |" in text and "skipped CR" in text
    metrics = analyses_metrics(result)
    assert metrics["analyses/none/transfer/MR"] == rows["none"]["accuracy"]["MR"]
    assert "analyses/geometry/isoscore" in metrics and "analyses/prefix/8/dev" in metrics


def test_analyses_params_are_validated(tmp_path):
    import yaml

    from mixsp_core.params import PARAMS_FILE, load_params

    raw = yaml.safe_load(PARAMS_FILE.read_text())
    params = load_params(PARAMS_FILE)
    assert params.evaluate.analyses is True and params.evaluate.transfer_whitenings == list(WHITENING_METHODS)
    for key, value, field in (("transfer_tasks", ["MR", "IMDB"], "evaluate.transfer_tasks"),
                              ("transfer_whitenings", ["zca:8"], "evaluate.transfer_whitenings"),
                              ("transfer_whitenings", ["pca:x"], "evaluate.transfer_whitenings"),
                              ("transfer_max_sentences", 5, "evaluate.transfer_max_sentences"),
                              ("analyses_sentences", 2, "evaluate.analyses_sentences")):
        bad = {**raw, "evaluate": {**raw["evaluate"], key: value}}
        path = tmp_path / "params.yaml"
        path.write_text(yaml.safe_dump(bad))
        with pytest.raises(ConfigError) as err:
            load_params(path)
        assert err.value.field == field


# -- the evaluate stage ------------------------------------------------------------------------------------
def test_the_evaluate_stage_writes_the_analyses_into_its_report(tmp_path, tiny_bert_dir, senteval_dir):
    import yaml

    from mixsp_core.data.corpus import write_corpus
    from mixsp_core.data.sources import load_pairs
    from mixsp_core.params import PARAMS_FILE, load_params
    from mixsp_core.stages.evaluate import run_evaluate
    from mixsp_core.tracking.tracker import RunTarget
    from tests.pipeline_helpers import write_tiny_senteval

    raw = yaml.safe_load(PARAMS_FILE.read_text())
    raw["data"]["root"] = str(tmp_path / "data")
    raw["evaluate"].update(grid_dims=[8], grid_vector_types=["float32"], grid_fit_sentences=60,
                           analyses_sentences=60, transfer_tasks=["MR", "TREC"], transfer_max_sentences=40,
                           transfer_whitenings=["pca:16", "zca"], transfer_dir=str(senteval_dir))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    params = load_params(tmp_path / "params.yaml")
    paths = params.paths
    pairs = load_pairs(f"senteval:{write_tiny_senteval(senteval_dir, tmp_path / 'tiny')}")
    paths.pairs.parent.mkdir(parents=True)
    pairs.to_parquet(paths.pairs, index=False)
    write_corpus(list(dict.fromkeys([*pairs["sentence1"], *pairs["sentence2"]])), paths.corpus)
    for model in (paths.student.best, paths.merged_model):
        shutil.copytree(tiny_bert_dir, model)

    target = RunTarget(uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    report = run_evaluate(params, target)
    analyses = report["analyses"]
    assert analyses["model"] == report["best"] and analyses["geometry"]["width"] == 32
    # an untrained BERT's LayerNorm (gain 1, bias 0) makes every vector sum to 0: rank 31 of 32, so a full-width
    # whitening does not exist and is reported as skipped; the top-16 PCA whitening does
    assert [r["embedding"] for r in analyses["transfer"]["rows"]] == ["none", "pca:16"]
    assert "singular" in analyses["skipped"]["zca"]
    assert set(analyses["transfer"]["tasks"]) == {"MR", "TREC"}
    markdown = (paths.reports / "evaluation.md").read_text()
    assert "## Analyses of the best variant" in markdown and "TwoNN" in markdown and "| pca:16 | 16 |" in markdown
    for name in ("analyses.json", "analyses.md", "analyses_prefix.png", "analyses_transfer.png"):
        assert (paths.reports / name).is_file(), name
    run = target.client().get_run(report["mlflow_run_id"])
    assert run.data.metrics["analyses/none/transfer/MR"] == pytest.approx(
        analyses["transfer"]["rows"][0]["accuracy"]["MR"])
    artifacts = {a.path for a in target.client().list_artifacts(run.info.run_id, "reports/analyses")}
    assert "reports/analyses/analyses_transfer.png" in artifacts


def test_mixsp_analyse_writes_the_same_files_for_any_model(tmp_path, tiny_bert_dir, senteval_dir, capsys):
    import yaml

    from mixsp_core.cli import main
    from mixsp_core.params import PARAMS_FILE
    from tests.pipeline_helpers import CORPUS_FILE, write_tiny_senteval

    tiny = write_tiny_senteval(senteval_dir, tmp_path / "tiny")
    raw = yaml.safe_load(PARAMS_FILE.read_text())
    raw["data"].update(root=str(tmp_path / "data"), spec=f"senteval:{tiny}", corpus_files=[str(tiny / CORPUS_FILE)])
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    out = tmp_path / "analyses"
    argv = ["analyse", "--model", str(tiny_bert_dir), "--config", str(tmp_path / "params.yaml"), "--out", str(out),
            "--set", "evaluate.transfer_tasks=[SUBJ]", "--set", "evaluate.transfer_max_sentences=30",
            "--set", "evaluate.transfer_whitenings=[pca:8]", "--set", f"evaluate.transfer_dir={senteval_dir}"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "TwoNN" in printed and "| pca:8 | 8 |" in printed
    result = json.loads((out / "analyses.json").read_text())
    assert list(result["transfer"]["tasks"]) == ["SUBJ"] and result["model"] == str(tiny_bert_dir)
    assert (out / "analyses_prefix.png").is_file() and (out / "analyses_transfer.png").is_file()
    assert main([*argv[:-8], "--set", "evaluate.transfer_tasks=[IMDB]"]) == 2  # a bad value: one-line error
    assert "evaluate.transfer_tasks" in capsys.readouterr().err


def test_analyses_off_writes_stub_outputs_and_no_plots(tmp_path):
    """``evaluate.analyses: false``: the DVC outputs analyses.json / .md still exist and say so."""
    import yaml

    from mixsp_core.params import PARAMS_FILE, load_params
    from mixsp_core.stages.evaluate import _analyses

    raw = yaml.safe_load(PARAMS_FILE.read_text())
    raw["data"]["root"] = str(tmp_path / "data")
    raw["evaluate"]["analyses"] = False
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    params = load_params(tmp_path / "params.yaml")
    assert _analyses(params, "no-model-needed", "student", _dev_pairs()) is None
    reports = params.paths.reports
    assert json.loads((reports / "analyses.json").read_text()) == {"enabled": False}
    assert "off" in (reports / "analyses.md").read_text() and not (reports / "analyses_prefix.png").exists()
