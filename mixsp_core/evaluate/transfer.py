"""SentEval-style classification transfer on frozen embeddings, with and without whitening.

Tasks (Conneau & Kiela 2018, SentEval), read from a SentEval folder: MR, CR, SUBJ, MPQA (binary, 10-fold
stratified cross-validation), SST-2 and TREC (the given train / test split: ``SST/binary/sentiment-test``,
``TREC/TREC_10.label``). The shared data holds only the training files of SST-2 and TREC; without the test
file a task falls back to a fixed stratified 80/20 hold-out of what is there, and its ``protocol`` says so
(SST-2's training file holds phrases of the same sentences, so that hold-out reads high).

Classifier: scikit-learn ``LogisticRegression`` (L2, ``C`` fixed, default 1) behind an
:func:`isotropic_scale` fitted on each training fold (centre, then one scale for all dims so that the mean
per-dim variance is 1). SentEval instead searches ``C`` by an inner cross-validation; one fixed ``C`` keeps
the analysis within minutes on a CPU, and the scaler keeps that penalty comparable between raw (unit-norm,
tiny per-dim variance) and whitened (unit-variance) features, so the comparison measures the geometry rather
than the scale meeting the penalty. The scaler is isotropic on purpose: every whitening
(``y = W (x - m)``, W Σ W^T = I) is ``Q Σ^-1/2`` for some rotation Q (Kessy et al. 2018), and cosines, an
L2 penalty and an isotropic scale are all rotation invariant, so the five kinds get the same dev STS and
the same accuracy (up to the solver's tolerance): only "whitened or not" (and the reduced ``pca:K`` forms)
can differ. A per-dim ``StandardScaler`` would break that invariance and make the kinds differ through an
arbitrary choice of axes.

Each task's sentences are capped by a deterministic sample (``max_sentences`` per split); every
embedding variant is a transform of the one set of cached vectors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mixsp_core.data.senteval import read_text_lines
from mixsp_core.errors import ConfigError, DataError

TRANSFER_TASKS = ("MR", "CR", "SUBJ", "MPQA", "SST2", "TREC")
CV_FOLDS = 10
HOLDOUT_FRACTION = 0.2
# (positive file, negative file) of the binary cross-validated tasks
_BINARY_FILES = {
    "MR": ("MR/rt-polarity.pos", "MR/rt-polarity.neg"),
    "CR": ("CR/custrev.pos", "CR/custrev.neg"),
    "SUBJ": ("SUBJ/subj.subjective", "SUBJ/subj.objective"),
    "MPQA": ("MPQA/mpqa.pos", "MPQA/mpqa.neg"),
}


@dataclass(frozen=True)
class TransferTask:
    """One classification task: sentences, integer labels and ``test`` (the rows of the given or held-out
    test split; None: k-fold cross-validation over all rows). ``protocol`` says which."""

    name: str
    sentences: list[str]
    labels: np.ndarray
    test: np.ndarray | None
    protocol: str

    @property
    def classes(self) -> int:
        return int(len(np.unique(self.labels)))


def check_task_names(names: Sequence[str], field: str = "evaluate.transfer_tasks") -> list[str]:
    bad = [n for n in names if n not in TRANSFER_TASKS]
    if bad:
        raise ConfigError(field, f"unknown transfer task(s) {bad}; known: {', '.join(TRANSFER_TASKS)}")
    return list(names)


def _lines(path: Path, encoding: str = "utf-8") -> list[str]:
    return [line.strip() for line in read_text_lines(path, encoding) if line.strip()]


def _sst_rows(path: Path) -> tuple[list[str], list[int]]:
    sentences, labels = [], []
    for number, line in enumerate(read_text_lines(path), start=1):
        if not line.strip():
            continue
        sentence, tab, label = line.rpartition("\t")
        if not tab or label.strip() not in ("0", "1"):
            raise DataError(path, "expected 'sentence<TAB>0|1'", number)
        sentences.append(sentence.strip())
        labels.append(int(label))
    return sentences, labels


def _trec_rows(path: Path) -> tuple[list[str], list[str]]:
    sentences, labels = [], []
    # SentEval reads TREC as Latin-1: train_5500.label holds a non-UTF-8 byte
    for number, line in enumerate(read_text_lines(path, "latin-1"), start=1):
        if not line.strip():
            continue
        label, space, question = line.partition(" ")
        if not space or ":" not in label:
            raise DataError(path, "expected 'LABEL:fine question'", number)
        sentences.append(question.strip())
        labels.append(label.split(":")[0])  # the 6 coarse classes, as SentEval
    return sentences, labels


def _sample(count: int, cap: int | None, rng: np.random.Generator) -> np.ndarray:
    """Sorted row indices: all ``count`` rows, or a random ``cap`` of them."""
    if cap is None or count <= cap:
        return np.arange(count)
    return np.sort(rng.permutation(count)[:cap])


def _holdout(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A stratified test mask: about :data:`HOLDOUT_FRACTION` of each class (at least one row of a class
    with two or more rows)."""
    test = np.zeros(len(labels), dtype=bool)
    for value in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == value))
        if len(rows) >= 2:
            test[rows[: max(1, round(HOLDOUT_FRACTION * len(rows)))]] = True
    return test


def _split_task(name: str, train: tuple[list[str], list], test: tuple[list[str], list] | None,
                cap: int | None, rng: np.random.Generator) -> TransferTask:
    """A task with a given test split when ``test`` is there, else a stratified hold-out of ``train``."""
    if test is not None:
        keep_train, keep_test = _sample(len(train[0]), cap, rng), _sample(len(test[0]), cap, rng)
        sentences = [train[0][i] for i in keep_train] + [test[0][i] for i in keep_test]
        raw = [train[1][i] for i in keep_train] + [test[1][i] for i in keep_test]
        mask = np.r_[np.zeros(len(keep_train), bool), np.ones(len(keep_test), bool)]
        protocol = "given train / test split"
    else:
        keep = _sample(len(train[0]), cap, rng)
        sentences, raw = [train[0][i] for i in keep], [train[1][i] for i in keep]
        mask = None
        protocol = f"hold-out {HOLDOUT_FRACTION:.0%} of the training file (no test file)"
    labels = np.unique(np.asarray(raw), return_inverse=True)[1]
    return TransferTask(name, sentences, labels, _holdout(labels, rng) if mask is None else mask, protocol)


def load_transfer_task(root: str | Path, name: str, max_sentences: int | None = None,
                       seed: int = 0) -> TransferTask | None:
    """Task ``name`` from the SentEval folder ``root``; None when its files are not there. At most
    ``max_sentences`` rows (per split for the split tasks), a random sample fixed by ``seed``."""
    root = Path(root)
    rng = np.random.default_rng([seed, TRANSFER_TASKS.index(check_task_names([name])[0])])
    if name in _BINARY_FILES:
        positive, negative = (root / f for f in _BINARY_FILES[name])
        if not (positive.is_file() and negative.is_file()):
            return None
        pos, neg = _lines(positive), _lines(negative)
        sentences, labels = pos + neg, np.r_[np.ones(len(pos), int), np.zeros(len(neg), int)]
        keep = _sample(len(sentences), max_sentences, rng)
        return TransferTask(name, [sentences[i] for i in keep], labels[keep], None, f"{CV_FOLDS}-fold CV")
    if name == "SST2":
        folder = root / "SST" / "binary"
        if not (folder / "sentiment-train").is_file():
            return None
        test = folder / "sentiment-test"
        return _split_task(name, _sst_rows(folder / "sentiment-train"),
                           _sst_rows(test) if test.is_file() else None, max_sentences, rng)
    folder = root / "TREC"
    if not (folder / "train_5500.label").is_file():
        return None
    test = folder / "TREC_10.label"
    return _split_task(name, _trec_rows(folder / "train_5500.label"),
                       _trec_rows(test) if test.is_file() else None, max_sentences, rng)


def isotropic_scale(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """``train`` and ``others`` centred on ``train``'s mean and divided by one number, the RMS of ``train``'s
    centred values (mean per-dim variance 1): a scale that, unlike a per-dim one, is rotation invariant."""
    mean = train.mean(axis=0)
    scale = max(float(np.sqrt(np.mean((train - mean) ** 2))), 1e-12)
    return [(x - mean) / scale for x in (train, *others)]


def _fit_score(features: np.ndarray, labels: np.ndarray, train: np.ndarray, test: np.ndarray, c: float,
               seed: int) -> float:
    from sklearn.linear_model import LogisticRegression

    x_train, x_test = isotropic_scale(features[train], features[test])
    model = LogisticRegression(C=c, max_iter=2000, random_state=seed).fit(x_train, labels[train])
    return float(model.score(x_test, labels[test]))


def classification_accuracy(features: np.ndarray, task: TransferTask, c: float = 1.0, folds: int = CV_FOLDS,
                            seed: int = 0) -> float:
    """Accuracy x100 of logistic regression on ``features`` (one row per ``task`` sentence): on the test
    split when the task has one, else the mean over stratified ``folds``-fold cross-validation (fewer folds
    when a class has fewer rows)."""
    from sklearn.model_selection import StratifiedKFold
    from threadpoolctl import threadpool_limits

    features = np.asarray(features, dtype=np.float64)
    if len(features) != len(task.labels):
        raise ValueError(f"{task.name}: {len(features)} feature rows for {len(task.labels)} labels")
    # One BLAS thread: these fits are small, and threads fighting over a busy CPU made one 1800 x 384 fit
    # 60x slower (2.3 s against 0.04 s on the 2-core machine).
    with threadpool_limits(1):
        if task.test is not None:
            return 100 * _fit_score(features, task.labels, ~task.test, task.test, c, seed)
        smallest = int(np.bincount(task.labels).min())
        splits = StratifiedKFold(n_splits=max(2, min(folds, smallest)), shuffle=True, random_state=seed)
        return float(100 * np.mean([_fit_score(features, task.labels, train, test, c, seed)
                                    for train, test in splits.split(features, task.labels)]))
