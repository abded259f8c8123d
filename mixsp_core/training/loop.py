"""Training loop for the ``bi`` student and the ``cross`` MixSP scorer.

``run_training`` is the one entry point (CLI ``mixsp train``, the Dagster asset and the DVC stage all
call it). Read it top to bottom: pick the data, build the model, then per step draw one batch of pairs
(plus one of distillation sentences and one of NLI triplets when those losses are on), sum the
weighted losses, and step AdamW under a linear warm-up/decay schedule with gradient clipping (and
autocast on CUDA). Every ``eval_every`` steps it scores the dev sets, keeps the best checkpoint by the
mean dev Spearman, writes a resumable ``last/`` checkpoint and stops early after ``patience``
evaluations without improvement.

Batches are a pure function of (seed, step) (:mod:`mixsp_core.training.batches`), so a resumed run
draws exactly the batches the uninterrupted run would have drawn; with the RNG and optimizer state
restored it continues the same trajectory on CPU. Whether ``last/`` may be resumed is decided by
:mod:`mixsp_core.training.resume`; the loss terms and the update live in
:mod:`mixsp_core.training.objective`, the dev scoring and the final report in
:mod:`mixsp_core.training.report`. The run directory's layout is :class:`mixsp_core.paths.RunDir`.

With ``train.snapshot_every`` the run also saves ``start/`` (the step-0 model: the merge start theta_0)
and weights-only ``snapshots/step-N/``, the "epochs of one run" that :mod:`mixsp_core.merging` soups.
Trained-in compression (Matryoshka prefixes, 2DMSE earlier layers, ESE alignment) are terms of
:class:`~mixsp_core.training.objective.Objective`. Under ``torchrun`` the same loop runs data-parallel
(:mod:`mixsp_core.training.distributed`): each rank encodes its slice of the global batch, the losses
see the gathered global batch, and only rank 0 evaluates and writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from mixsp_core.errors import ConfigError, OutputBusyError
from mixsp_core.evaluate.contamination import pair_keys, write_seen_pairs
from mixsp_core.io import claim_output, replacing_file, write_json_atomic
from mixsp_core.models.checkpoint import load_checkpoint, restore_optimizer, save_checkpoint
from mixsp_core.paths import RunDir
from mixsp_core.tracking.metrics import dev_metrics as named_dev_metrics
from mixsp_core.tracking.tracker import NullTracker, Tracker
from mixsp_core.training.batches import TrainData, select_pairs, snli_folder
from mixsp_core.training.config import RunConfig, dump_config, flatten
from mixsp_core.training.definitions import DefinitionTerm
from mixsp_core.training.distributed import DistContext, setup, weights_digest
from mixsp_core.training.dropout import DropoutSchedule
from mixsp_core.training.jtcse import TwinTerms, add_twin_params, build_twin, restore_twin, save_twin, trained_modules
from mixsp_core.training.mining import negative_miner
from mixsp_core.training.multistage import run_stages
from mixsp_core.training.objective import Objective, linear_schedule, make_optimizer, optimizer_step, step_terms
from mixsp_core.training.report import LossWindow, Progress, TrainResult, evaluate_dev, evaluate_encoder, finish_report
from mixsp_core.training.resume import resume_state
from mixsp_core.training.tasks import task_streams
from mixsp_core.training.unsupervised import epoch_batches, simcse_batches
from mixsp_core.training.warm_start import initial_model

log = logging.getLogger(__name__)

PCA_COMPONENTS_FILE = "teacher_pca_components.npy"  # the teacher projection of the distillation targets


def with_method_streams(data: TrainData, config: RunConfig, corpus: Sequence[str] | None) -> TrainData:
    """``data`` with the streams of the methods that are on: Conan's re-mined negatives, CoDiEmb's task sampler
    and retrieval batches, 2-Tier SimCSE's corpus sentences (each None when off)."""
    mined = negative_miner(config, data.triplets, corpus, snli_folder(config).parent)
    return dataclasses.replace(data, mined=mined, simcse=simcse_batches(config, corpus), **task_streams(config))


def run_training(config: RunConfig, pairs: pd.DataFrame, corpus: Sequence[str] | None = None,
                 teacher_targets: np.ndarray | None = None, out_dir: str | Path | None = None,
                 tracker: Tracker | None = None, triplets: pd.DataFrame | None = None,
                 show_progress: bool = True) -> TrainResult:
    """Train (or, for ``model.kind: encoder``, only evaluate) as ``config`` says; see the module doc.

    ``pairs``: the pairs table (training rows and the dev sets); ``corpus`` + ``teacher_targets``
    (rows aligned): distillation data, needed when ``loss.distill > 0``; ``triplets``: NLI triplets
    (columns anchor, positive, hard_negative), loaded from ``data.nli_dir`` when None and
    ``data.nli`` is on. Writes ``out_dir`` (default ``config.output_dir``) in the :class:`RunDir`
    layout: ``best/``, ``last/``, ``metrics.json``, ``history.json``, ``run_config.yaml``, ``plots/``;
    with ``train.snapshot_every`` also ``start/`` (the step-0 model) and ``snapshots/step-N/``.

    Under torchrun every rank calls this with the same arguments; only rank 0 writes files and uses
    ``tracker``, and only rank 0's result carries the metrics. Rank 0 holds the run directory's output
    lock throughout (:func:`_claim_output`): a second run into the same directory is refused at once.
    """
    run = RunDir(Path(out_dir) if out_dir is not None else config.resolved_output_dir())
    threads_before = torch.get_num_threads()
    if config.train.num_threads:
        torch.set_num_threads(config.train.num_threads)
    ctx = setup(resolve_device(config.train.device))
    try:
        if not ctx.is_main:  # rank 0 alone records the run and shows progress
            tracker, show_progress = NullTracker(), False
        with _claim_output(run, ctx):
            args = (config, pairs, corpus, teacher_targets, run, tracker or NullTracker(), triplets, show_progress, ctx)
            if config.stages:  # a multi-stage run: each stage is a run of this function (training.multistage)
                return run_stages(*args, train=run_training)
            return _run(*args)
    finally:
        ctx.close()
        torch.set_num_threads(threads_before)


def _run(config: RunConfig, pairs: pd.DataFrame, corpus: Sequence[str] | None, teacher_targets: np.ndarray | None,
         run: RunDir, tracker: Tracker, triplets: pd.DataFrame | None, show_progress: bool,
         ctx: DistContext) -> TrainResult:
    """The body of :func:`run_training` on one process (rank ``ctx.rank``)."""
    tc, main, device = config.train, ctx.is_main, ctx.device
    seed_everything(config.seed)
    train, dev = select_pairs(pairs, config)
    def save(directory: Path, **kwargs) -> None:
        save_checkpoint(model, directory, **kwargs)
        write_seen_pairs(seen, directory)

    if main:
        run.root.mkdir(parents=True, exist_ok=True)
        dump_config(config, run.config)
    tracker.set_tags({"mixsp_kind": config.model.kind, "config_name": config.name})
    if config.model.kind == "encoder":  # a released model: evaluate only
        return evaluate_encoder(config, dev, run, tracker, ctx)

    # ---- data streams (global batches; each rank takes its slice)
    _check_batch_sizes(config, ctx)
    data = with_method_streams(TrainData.build(config, train, corpus, teacher_targets, triplets), config, corpus)
    # the pairs this model is trained (silver pairs included) and selected on, recorded with each checkpoint so
    # that evaluation can score it on the test pairs it never saw (mixsp_core.evaluate.contamination)
    seen = pair_keys(pd.concat([data.train, *dev.values()], ignore_index=True))
    total_steps = tc.max_steps or max(1, math.ceil(tc.epochs * epoch_batches(config, data)))
    if data.pca_components is not None and main:
        with replacing_file(run.root / PCA_COMPONENTS_FILE) as tmp, open(tmp, "wb") as handle:
            np.save(handle, data.pca_components)

    # ---- model, optimizer, schedule: fresh or resumed
    saved = resume_state(config, run) if tc.resume else None
    model = load_checkpoint(run.last) if saved else initial_model(config)
    model.to(device).train()
    if saved is None and config.model.output_init != "random" and not tc.init_checkpoint:
        _init_output(model, config, data)
    twin = build_twin(config, model, ctx.enabled)  # JTCSE's second tower + cross-attention (None: off)
    if saved is None and tc.snapshot_every and main:
        # the fusion start theta_0: the heads are random per seed, so the base encoder alone is not it
        save(run.start, extra={"step": 0, "config": config.to_dict()})
    net = ctx.wrap(model)  # DDP copies rank 0's weights to every rank here
    optimizer = make_optimizer(model, config)
    add_twin_params(optimizer, twin, config)
    scheduler = linear_schedule(optimizer, int(tc.warmup_ratio * total_steps), total_steps)
    progress = Progress()
    dropout = DropoutSchedule.from_config(tc, total_steps)  # train.dropout_schedule (2-Tier SimCSE)
    if saved:
        state, tensors = saved
        restore_optimizer(optimizer, state, tensors, run.last)
        scheduler.load_state_dict(state["scheduler"])
        progress = Progress.from_state(state)
        restore_twin(twin, run.last, progress.step)
        dropout.load_state_dict(state.get("dropout"))
        log.info("resuming %s from step %d", run.root, progress.step)
    if ctx.rank > 0:  # own dropout masks per rank; rank 0 keeps the single-process RNG stream
        torch.manual_seed(int(np.random.default_rng([config.seed, ctx.rank, progress.step]).integers(2**31)))
    objective = Objective(config, data.class_counts).to(device)
    definitions = DefinitionTerm.build(config, ctx)  # DefSent+ (None unless loss.definition > 0)
    objective.twin_terms = TwinTerms(twin) if twin is not None else None
    use_amp = tc.amp and device.type == "cuda"
    amp_dtype = torch.bfloat16 if tc.amp_dtype == "bf16" else torch.float16
    scaler = torch.amp.GradScaler("cuda") if use_amp and amp_dtype == torch.float16 else None
    tracker.log_params({**flatten(config.to_dict()), "derived.total_steps": total_steps,
                        "derived.train_pairs": len(train), "derived.class_counts": list(data.class_counts),
                        "derived.device": str(device), "derived.distill_sentences": len(data.distill_sentences),
                        "derived.world_size": ctx.world_size})

    best_scores: dict[str, np.ndarray] = {}  # the best model's dev scores, for the final report

    def evaluate_and_checkpoint() -> None:
        """Rank 0 scores the dev sets, keeps the best model and writes the resumable last/ checkpoint;
        the other ranks wait, then all take rank 0's early-stopping decision."""
        if main:
            metrics, scores = evaluate_dev(model, dev, tc.eval_batch_size)
            progress.train_seconds = time.perf_counter() - started
            progress.history.append({"step": progress.step, **metrics, "train_seconds": progress.train_seconds})
            tracker.log_metrics(named_dev_metrics(metrics), progress.step)  # dev/STSBenchmark, dev/SICK, dev/mean
            if not math.isfinite(metrics["primary"]):
                # NaN Spearman means constant similarities: the model collapsed (e.g. a saturated tanh).
                raise FloatingPointError(f"{config.name}: dev Spearman is {metrics} at step {progress.step}: "
                                         "the model's similarities are constant or not finite")
            if metrics["primary"] > progress.best_metric:
                progress.best_metric, progress.best_step, progress.evals_since_best = (metrics["primary"],
                                                                                       progress.step, 0)
                best_scores.update(scores)
                save(run.best, extra={"step": progress.step, "dev": metrics, "config": config.to_dict()})
            else:
                progress.evals_since_best += 1
            progress.stopped_early = bool(tc.patience and progress.evals_since_best >= tc.patience)
            if tc.save_last:
                save(run.last, optimizer=optimizer, trainer_state={
                    **asdict(progress), "total_steps": total_steps, "scheduler": scheduler.state_dict(),
                    "config": config.to_dict(), "tracking_run_id": tracker.run_id,
                    "dropout": dropout.state_dict()})
                save_twin(twin, run.last, progress.step)
        ctx.barrier()
        progress.stopped_early = ctx.broadcast_flag(progress.stopped_early)

    # ---- the loop
    window = LossWindow()
    bar = tqdm(total=total_steps, initial=progress.step, desc=f"train {config.name}", disable=not show_progress)
    started = time.perf_counter() - progress.train_seconds
    try:
        if progress.step == 0 and tc.eval_at_start:
            evaluate_and_checkpoint()
        while progress.step < total_steps and not progress.stopped_early:
            step = progress.step
            if data.mined is not None:  # Conan: re-mine the NLI hard negatives with the current model
                data.mined.step(step, model, run.root, ctx, tracker)
            model.train()
            if definitions is not None:
                definitions.refresh_if_due(model, step)  # the entry table, outside autocast (encode casts itself)
            dropout_p = dropout.apply(model, step)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                terms = step_terms(objective, model, net, data, step, ctx, config.loss.uses_teacher)
                if definitions is not None:
                    terms |= definitions.terms(model, net, step, ctx)
                loss = objective.total(terms)
            grad_norm = optimizer_step(loss, trained_modules(model, twin), optimizer, scaler, ctx, tc.grad_clip)
            scheduler.step()
            progress.step = step = step + 1
            bar.update(1)

            loss_value = float(loss.detach())  # one device sync a step, shared by the log and the dropout rule
            window.add("loss", loss_value)
            dropout.observe(loss_value)
            if dropout_p is not None:
                window.add("dropout_p", dropout_p)
            for name, value in terms.items():
                window.add(name, float(value.detach()))
            if math.isfinite(grad_norm):
                window.add("grad_norm", grad_norm)
            if step % tc.log_every == 0 or step == total_steps:
                logged = window.flush()
                logged["train/lr"] = scheduler.get_last_lr()[0]
                tracker.log_metrics(logged, step)
                bar.set_postfix(loss=f"{logged['train/loss']:.4f}")
            if tc.snapshot_every and step % tc.snapshot_every == 0 and main:
                save(run.snapshot(step), extra={"step": step, "start": str(run.start), "config": config.to_dict()})
            if step % tc.eval_every == 0 or step == total_steps:
                evaluate_and_checkpoint()
    except BaseException:
        tracker.finish("KILLED")
        raise
    finally:
        bar.close()
    seconds = time.perf_counter() - started
    digest = weights_digest(model)
    if not ctx.all_equal(digest):
        raise RuntimeError("the training processes ended with different weights (DDP replicas diverged)")
    if not main:
        ctx.barrier()  # rank 0 writes the report
        return TrainResult(run.root, run.best, progress.best_step, {}, {}, progress.history, progress.step,
                           seconds, None, {}, digest)

    # ---- the best model's report
    write_json_atomic(run.history, progress.history)
    if not best_scores:  # resumed after the best evaluation: score the saved best model again
        best_scores.update(evaluate_dev(load_checkpoint(run.best, device=device), dev, tc.eval_batch_size)[1])
    metrics, per_class = finish_report(best_scores, dev, config, run, progress.history, tracker)
    if tc.retrieval_eval:  # recall@10 / MRR@10 of the best checkpoint, beside its STS dev metrics
        from mixsp_core.evaluate.ir import report_ir

        report_ir(load_checkpoint(run.best, device=device), config, run, tracker, progress.step)
    tracker.log_metrics({"train_seconds": seconds, "best_step": progress.best_step}, progress.step)
    tracker.log_artifact(run.config)
    tracker.log_artifact(run.history)
    if config.tracking.log_checkpoint:
        tracker.log_artifact(run.best, "best_checkpoint")
    tracker.finish()
    ctx.barrier()
    return TrainResult(run.root, run.best, progress.best_step, metrics, per_class, progress.history, progress.step,
                       seconds, tracker.run_id, {"plots": str(run.plots), "metrics": str(run.metrics)}, digest)


# --------------------------------------------------------------------------- the loop's helpers


@contextlib.contextmanager
def _claim_output(run: RunDir, ctx: DistContext) -> Iterator[None]:
    """Rank 0 holds ``run``'s output lock for the block (the ranks of one run share its directory, so
    only rank 0 takes it) and, holding it, clears what killed writes left there (``.*.partial`` work
    directories; a checkpoint swap cut short is put back, so ``last/`` still resumes). The other ranks
    wait for that and share its outcome: a run refused on rank 0 stops on every rank."""
    with contextlib.ExitStack() as held:
        refused: OutputBusyError | None = None
        if ctx.is_main:
            try:
                held.enter_context(claim_output(run.root, "training run"))
            except OutputBusyError as err:
                refused = err
        if ctx.broadcast_flag(refused is not None):
            raise refused or OutputBusyError(f"{run.root}: is being written by another process (rank 0 found "
                                             "it locked); training refused, nothing written")
        yield


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("train.device", f"{name} requested but CUDA is not available")
    return torch.device(name)


def _check_batch_sizes(config: RunConfig, ctx: DistContext) -> None:
    """Every global batch in use must split evenly over the ranks."""
    tc, lc = config.train, config.loss
    ctx.check_divisible("train.batch_size", tc.batch_size)
    if lc.uses_teacher:
        ctx.check_divisible("train.distill_batch_size", tc.distill_batch_size)
    if lc.infonce > 0:
        ctx.check_divisible("train.nli_batch_size", tc.nli_batch_size)


def _init_output(model: nn.Module, config: RunConfig, data: TrainData) -> None:
    """Data-driven output layer (``model.output_init``), on a seeded sample of sentences."""
    from mixsp_core.models.student import init_output_layer

    rng = np.random.default_rng(config.seed)
    n = config.train.output_init_sentences
    if config.model.output_init == "teacher":
        rows = rng.permutation(len(data.distill_sentences))[:n]
        stats = init_output_layer(model, [data.distill_sentences[i] for i in rows], data.distill_targets[rows])
    else:
        pool = list(dict.fromkeys(list(data.train["sentence1"]) + list(data.train["sentence2"])))
        stats = init_output_layer(model, [pool[i] for i in rng.permutation(len(pool))[:n]])
    log.info("output layer initialised (%s): %s", config.model.output_init, stats)
