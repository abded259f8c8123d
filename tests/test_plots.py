"""MixSP class measurements: overlap coefficient and within-class Spearman."""

from __future__ import annotations

import numpy as np
import pytest

from mixsp_core.evaluate.plots import class_metrics, overlap_coefficient, plot_class_histogram, plot_dev_curve


def test_overlap_coefficient_by_hand():
    assert overlap_coefficient([0.1, 0.2], [0.1, 0.2], bins=2) == pytest.approx(1.0)
    assert overlap_coefficient([0.0, 0.1], [0.9, 1.0], bins=2) == pytest.approx(0.0)
    # bins [0, .5), [.5, 1]: a = (2/3, 1/3), b = (1/3, 2/3) -> min sum = 2/3
    assert overlap_coefficient([0.0, 0.1, 0.9], [0.2, 0.8, 1.0], bins=2) == pytest.approx(2 / 3)


def test_class_metrics_and_figures(tmp_path):
    gold = np.array([0.5, 1.0, 2.0, 3.0, 4.0, 4.5, 5.0, 4.2])
    pred = np.array([0.1, 0.2, 0.3, 0.4, 0.8, 0.7, 0.9, 0.75])
    m = plot_class_histogram(pred, gold, tmp_path / "h.png", threshold=4.0, bins=4)
    assert (tmp_path / "h.png").is_file()
    assert m["n_upper"] == 4 and m["n_lower"] == 4
    assert m["spearman_lower"] == pytest.approx(100.0)
    # gold ranks [1, 3, 4, 2], predicted ranks [3, 1, 4, 2]: sum d^2 = 8 -> 1 - 6*8/(4*15) = 0.2
    assert m["spearman_upper"] == pytest.approx(20.0)
    assert m == class_metrics(pred, gold, 4.0, bins=4)
    plot_dev_curve([{"step": 1, "primary": 50.0}, {"step": 2, "primary": 60.0}], tmp_path / "c.png")
    assert (tmp_path / "c.png").is_file()
