"""Small real-data tables and tiny-model configs shared by the training and checkpoint tests."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from mixsp_core.data.senteval import read_sick_file, read_stsb_file
from mixsp_core.data.table import concat_pairs
from mixsp_core.tracking.tracker import NullTracker
from mixsp_core.training.config import config_from_dict


def small_pairs(senteval_dir: Path, n_train: int = 48, n_dev: int = 24) -> pd.DataFrame:
    """A few real STS-B train pairs (both classes present) and small STS-B dev / SICK trial sets."""
    train = read_stsb_file(senteval_dir / "STS" / "STSBenchmark" / "sts-train.csv", "train")
    upper = train[train["score"] >= 4].head(n_train // 2)
    lower = train[train["score"] < 4].head(n_train - len(upper))
    dev = read_stsb_file(senteval_dir / "STS" / "STSBenchmark" / "sts-dev.csv", "dev").head(n_dev)
    trial = read_sick_file(senteval_dir / "SICK" / "SICK_trial.txt", "dev").head(n_dev)
    return concat_pairs([upper, lower, dev, trial])


def tiny_config(encoder: Path, **sections) -> object:
    """A config for the tiny random BERT: short, evaluates often, no MLflow."""
    raw = {
        "name": "tiny",
        "seed": 7,
        "model": {"kind": "bi", "encoder": str(encoder), "num_projectors": 2, "routing": "hard",
                  "projector_mult": 2, "output_dim": 16, "max_length": 32},
        "loss": {"cosent": 1.0, "routing": 0.1},
        "train": {"max_steps": 8, "batch_size": 8, "lr": 1e-3, "eval_every": 4, "log_every": 1,
                  "warmup_ratio": 0.1, "eval_batch_size": 32},
        "tracking": {"enabled": False},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values) if isinstance(values, dict) else raw.__setitem__(section, values)
    return config_from_dict(raw)


def one_thread():
    """Run torch on one thread for the duration of a test module and restore the setting afterwards:
    tiny models gain nothing from a second thread, and on a busy 2-core machine its spin-waiting
    made these tests several times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Interrupt(Exception):
    """What :class:`StopAt` raises: a run cut short."""


class StopAt(NullTracker):
    """Raises :class:`Interrupt` while logging step ``at``: an interruption after that step's checkpoint."""

    def __init__(self, at: int):
        super().__init__()
        self.at = at

    def log_metrics(self, metrics, step):
        if step == self.at:
            raise Interrupt
        super().log_metrics(metrics, step)
