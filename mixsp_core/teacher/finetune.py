"""Teacher fine-tuning: train the distillation teacher on the STS training pairs, then export it.

The released all-mpnet-base-v2 scores below the student on dev, so distilling it pulls the student down.
Fine-tuning it first with the student's own STS loss (CoSENT on STS-B train + SICK train) is one ordinary
training run of :func:`mixsp_core.training.loop.run_training`: a ``bi`` model with no projector and no output layer
(``num_projectors: 0``, ``output_dim: 0``) *is* the encoder with mean pooling, so the run trains, evaluates
on dev and keeps its best checkpoint like any student (``configs/teacher_finetune.yaml``). The best
checkpoint's encoder is then written as a plain Hugging Face / sentence-transformers folder (safetensors),
which :class:`mixsp_core.models.encoder.Encoder`, ``mixsp encode|evaluate`` and the teacher cache load like
the released teacher.

Layout of ``out_dir``::

    run/        the training run (best/, last/ for resuming, history.json, metrics.json, plots/)
    teacher/    the exported encoder: config.json, model.safetensors, tokenizer files, modules.json,
                1_Pooling/, sentence_bert_config.json, mixsp_teacher.json (provenance and dev metrics)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from mixsp_core.errors import CheckpointError, ConfigError
from mixsp_core.io import sha256_file, write_json_atomic, writing_dir
from mixsp_core.paths import WEIGHTS_FILE
from mixsp_core.teacher.cache import FINETUNED_TEACHER_FILE
from mixsp_core.tracking.tracker import Tracker
from mixsp_core.training.config import RunConfig
from mixsp_core.training.loop import TrainResult, run_training

RUN_DIR, TEACHER_DIR = "run", "teacher"


@dataclass
class TeacherFinetuneResult:
    """``teacher_dir``: the exported encoder folder (None on a torchrun rank other than 0);
    ``weights_sha256``: of its model.safetensors; ``train``: the training run's result."""

    teacher_dir: Path | None
    weights_sha256: str | None
    train: TrainResult

    def summary(self) -> str:
        return f"{self.train.summary()}\nteacher: {self.teacher_dir} (model.safetensors sha256 {self.weights_sha256})"


def check_teacher_config(config: RunConfig) -> None:
    """Refuse a config whose trained model is more than an encoder with pooling: the export keeps the
    encoder only, so projectors, an output layer or a distillation target would be silently dropped."""
    model = config.model
    if model.kind != "bi":
        raise ConfigError("model.kind", f"a teacher fine-tune trains a 'bi' encoder, got {model.kind!r}")
    if model.num_projectors != 0:
        raise ConfigError("model.num_projectors", "must be 0 for a teacher (the export keeps the encoder only)")
    if model.output_dim != 0:
        raise ConfigError("model.output_dim", "must be 0 for a teacher (the export keeps the encoder only)")
    if config.loss.uses_teacher:
        raise ConfigError("loss.distill", "not available when fine-tuning a teacher (plain STS losses only)")
    if config.data.silver_pairs > 0:
        raise ConfigError("data.silver_pairs", "must be 0 for a teacher (silver pairs are scored by the teacher)")
    for name in ("routing", "matryoshka", "layers", "ese_alignment"):
        if getattr(config.loss, name) > 0:
            raise ConfigError(f"loss.{name}", "not available when fine-tuning a teacher (plain STS losses only)")


def finetune_teacher(config: RunConfig, pairs: pd.DataFrame, out_dir: str | Path, tracker: Tracker | None = None,
                     show_progress: bool = True) -> TeacherFinetuneResult:
    """Fine-tune ``config.model.encoder`` on the training pairs and export its best checkpoint.

    ``config``: a plain-encoder training config (see :func:`check_teacher_config`); ``pairs``: the pairs
    table (``data.train_tasks`` train rows are trained on, ``data.dev_sets`` select the best checkpoint).
    The run lives in ``out_dir/run/`` (it resumes from ``run/last/`` when present); ``out_dir/teacher/`` is
    replaced only after the run has finished and the export is complete.
    """
    check_teacher_config(config)
    out = Path(out_dir)
    result = run_training(config, pairs, None, None, out / RUN_DIR, tracker, show_progress=show_progress)
    from mixsp_core.training.distributed import is_main_process

    if not is_main_process():  # rank 0 alone evaluated, so only it knows the best checkpoint is final
        return TeacherFinetuneResult(None, None, result)
    if result.best_checkpoint is None or not result.best_checkpoint.is_dir():
        raise CheckpointError(f"{out / RUN_DIR}: the run left no best checkpoint to export")
    provenance = {"base_encoder": config.model.encoder, "config_name": config.name, "best_step": result.best_step,
                  "steps": result.steps, "train_seconds": round(result.train_seconds, 1),
                  "dev": result.best_metrics, "train_max_length": config.model.max_length,
                  "checkpoint": str(result.best_checkpoint)}
    digest = export_teacher(result.best_checkpoint, out / TEACHER_DIR, provenance)
    return TeacherFinetuneResult(out / TEACHER_DIR, digest, result)


def export_teacher(checkpoint_dir: str | Path, target: str | Path, provenance: dict[str, Any] | None = None) -> str:
    """Write the encoder of a plain-encoder ``bi`` checkpoint to ``target`` as an HF folder plus the
    sentence-transformers module files (mean pooling, L2 normalisation); returns the weights' sha256.

    The folder is built beside ``target`` and swapped in at the end, so a failure keeps the old one.
    """
    from mixsp_core.models.checkpoint import load_checkpoint

    model = load_checkpoint(checkpoint_dir, device="cpu")
    mc = model.model_config
    if model.kind != "bi" or mc.num_projectors != 0 or mc.output_dim != 0:
        raise CheckpointError(f"{Path(checkpoint_dir) / 'config.json'}: not a plain encoder (kind {model.kind!r}, "
                              f"num_projectors {mc.num_projectors}, output_dim {mc.output_dim}); cannot export "
                              "it as a teacher without dropping trained layers")
    with writing_dir(Path(target)) as work:
        model.encoder.save_pretrained(work, safe_serialization=True)
        model.tokenizer.save_pretrained(work)
        _write_sentence_transformers_files(work, mc.pooling, mc.normalize, model.hidden_dim,
                                           int(model.tokenizer.model_max_length))
        digest = sha256_file(work / WEIGHTS_FILE)
        record = {**(provenance or {}), "pooling": mc.pooling, "normalize": mc.normalize,
                  "weights_sha256": digest}
        write_json_atomic(work / FINETUNED_TEACHER_FILE, record, default=str)
    return digest


def _write_sentence_transformers_files(folder: Path, pooling: str, normalize: bool, dim: int,
                                       tokenizer_max: int) -> None:
    """modules.json, 1_Pooling/config.json and sentence_bert_config.json, so sentence-transformers loads the
    folder with the pooling the model was trained with (our Encoder needs only the HF files)."""
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    write_json_atomic(folder / "modules.json", modules)
    (folder / "1_Pooling").mkdir()
    pool_cfg = {"word_embedding_dimension": dim, "pooling_mode_cls_token": pooling == "cls",
                "pooling_mode_mean_tokens": pooling == "mean", "pooling_mode_max_tokens": False,
                "pooling_mode_mean_sqrt_len_tokens": False}
    write_json_atomic(folder / "1_Pooling" / "config.json", pool_cfg)
    # 256: what mixsp's Encoder feeds by default (capped by the tokenizer's own limit)
    st_cfg = {"max_seq_length": min(256, tokenizer_max), "do_lower_case": False}
    write_json_atomic(folder / "sentence_bert_config.json", st_cfg)
