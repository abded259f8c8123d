"""DistributedDataParallel training: 2 CPU processes (gloo) against one process on the same global batches.

Dropout is switched off in the tiny BERT used here, so the only difference between the runs is float
rounding (each rank encodes half the batch, padded to its own longest sentence).
"""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from mixsp_core.errors import ConfigError
from mixsp_core.models.checkpoint import load_checkpoint, read_weights
from mixsp_core.tracking.tracker import NullTracker
from mixsp_core.training.config import config_from_dict
from mixsp_core.training.distributed import DistContext, setup, weights_digest
from mixsp_core.training.loop import run_training
from tests.train_helpers import one_thread, small_pairs

_one_thread = pytest.fixture(scope="module", autouse=True)(one_thread)
WORLD = 2


def _raw_config(encoder: Path) -> dict:
    """Every gathered loss path at once: pair terms, routing, Matryoshka, 2DMSE layers, ESE, HPD, InfoNCE."""
    return {
        "name": "ddp", "seed": 5,
        "model": {"kind": "bi", "encoder": str(encoder), "num_projectors": 2, "routing": "hard",
                  "projector_mult": 2, "output_dim": 16, "max_length": 32},
        "data": {"nli": True},
        "loss": {"cosent": 1.0, "routing": 0.1, "distill": 0.5, "infonce": 0.2, "matryoshka": 1.0,
                 "matryoshka_dims": [4, 8], "layers": 0.5, "ese_alignment": 0.3, "ese_dim": 4},
        "train": {"max_steps": 4, "batch_size": 8, "distill_batch_size": 8, "nli_batch_size": 4, "lr": 1e-3,
                  "eval_every": 4, "log_every": 1, "warmup_ratio": 0.0, "eval_batch_size": 32, "num_threads": 1},
        "tracking": {"enabled": False},
    }


@pytest.fixture(scope="module")
def no_dropout_bert(tiny_bert_dir, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-bert-nodrop") / "bert"
    shutil.copytree(tiny_bert_dir, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.fixture(scope="module")
def inputs(senteval_dir):
    from mixsp_core.data.corpus import load_nli_triplets

    pairs = small_pairs(senteval_dir, n_train=16, n_dev=12)
    corpus = list(dict.fromkeys(pairs["sentence1"]))[:24]
    teacher = np.random.default_rng(0).normal(size=(len(corpus), 16)).astype(np.float32)
    triplets = load_nli_triplets(senteval_dir / "SNLI", "dev").head(12).reset_index(drop=True)
    return pairs, corpus, teacher, triplets


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, raw: dict, inputs: tuple, out: str, report: str, world: int = WORLD) -> None:
    """One torchrun-like process: the environment torchrun would set, then the ordinary entry point."""
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), TORCHELASTIC_RUN_ID="test")
    pairs, corpus, teacher, triplets = inputs
    tracker = NullTracker()
    result = run_training(config_from_dict(raw), pairs, corpus, teacher, out, tracker, triplets, show_progress=False)
    Path(report, f"rank{rank}.json").write_text(json.dumps({
        "digest": result.weights_digest, "steps": result.steps, "loss": tracker.series("train/loss"),
        "grad_norm": tracker.series("train/grad_norm"),
        "terms": sorted({k for _, m in tracker.metrics for k in m}),
        "world_size": torch.distributed.get_world_size() if torch.distributed.is_initialized() else None}))


def _single_and_spawned(model_dir, inputs, tmp_path, world: int, out: str) -> tuple[NullTracker, list[dict]]:
    """One plain single-process run into tmp_path/single and a ``world``-process run into tmp_path/``out`` of
    the same config: the single run's tracker and each rank's report."""
    raw = _raw_config(model_dir)
    pairs, corpus, teacher, triplets = inputs
    single = NullTracker()
    run_training(config_from_dict(raw), pairs, corpus, teacher, tmp_path / "single", single, triplets,
                 show_progress=False)
    report = tmp_path / "report"
    report.mkdir()
    mp.spawn(_worker, args=(_free_port(), raw, inputs, str(tmp_path / out), str(report), world), nprocs=world,
             join=True)
    return single, [json.loads((report / f"rank{r}.json").read_text()) for r in range(world)]


def test_two_processes_match_one_process(no_dropout_bert, inputs, tmp_path):
    single, ranks = _single_and_spawned(no_dropout_bert, inputs, tmp_path, WORLD, "ddp")

    # both ranks end with bitwise-identical weights, and rank 0 saved exactly those
    assert ranks[0]["digest"] == ranks[1]["digest"]
    assert ranks[0]["digest"] == weights_digest(load_checkpoint(tmp_path / "ddp" / "last"))
    assert ranks[0]["steps"] == ranks[1]["steps"] == 4
    # only rank 0 records: the other rank's tracker was replaced
    assert ranks[1]["loss"] == [] and {"train/infonce", "train/layers", "train/distill"} <= set(ranks[0]["terms"])
    # the 2-process run follows the 1-process run on the same global batches
    steps, losses = zip(*ranks[0]["loss"])
    assert list(steps) == [1, 2, 3, 4]
    np.testing.assert_allclose(losses, [v for _, v in single.series("train/loss")], rtol=1e-4, atol=1e-5)
    # the gradient, not only the (scale-free) Adam update, is the global batch's
    np.testing.assert_allclose([v for _, v in ranks[0]["grad_norm"]],
                               [v for _, v in single.series("train/grad_norm")], rtol=1e-4)
    a = read_weights(tmp_path / "single" / "last")
    b = read_weights(tmp_path / "ddp" / "last")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-4, msg=key)


def test_torchrun_with_one_process_takes_the_process_group_path(no_dropout_bert, inputs, tmp_path):
    """``torchrun --nproc_per_node 1`` (one GPU) joins a process group of one and runs DDP and the
    gathers, as on several GPUs, and trains what the plain single process trains."""
    single, (rank0,) = _single_and_spawned(no_dropout_bert, inputs, tmp_path, 1, "ddp1")
    assert rank0["world_size"] is None  # the loop destroyed the group it created
    assert "train/loss" in rank0["terms"]
    np.testing.assert_allclose([v for _, v in rank0["loss"]], [v for _, v in single.series("train/loss")],
                               rtol=1e-5, atol=1e-6)


def test_setup_joins_a_group_of_one_under_torchrun(monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    for name, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0",
                        "LOCAL_RANK": "0", "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(name, value)
    ctx = setup(torch.device("cpu"))
    try:
        assert ctx.enabled and ctx.owns_group and torch.distributed.get_backend() == "gloo"
        x = torch.arange(6.0).reshape(3, 2)
        assert torch.equal(ctx.gather(x), x) and ctx.all_equal("digest")
    finally:
        ctx.close()
    assert not torch.distributed.is_initialized()


def test_sharding_and_gather_in_one_process():
    ctx = DistContext(rank=1, world_size=2)
    assert ctx.shard(np.arange(8)).tolist() == [4, 5, 6, 7]
    with pytest.raises(ConfigError, match="train.batch_size"):
        ctx.check_divisible("train.batch_size", 7)
    single = DistContext()
    x = torch.ones(3, 2, requires_grad=True)
    assert single.gather(x) is x and single.grad_scale == 1.0 and not single.enabled
