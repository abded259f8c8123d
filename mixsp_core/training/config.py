"""Training configuration: typed dataclasses read from a YAML file (or one section of params.yaml).

Every field is checked when the config is built: an unknown key, a value of the wrong type, NaN or an
infinity (in any float field), or a value out of range raises :class:`mixsp_core.errors.ConfigError`
naming the dotted field (``train.lr``) and, when the config came from a file, the file.

Layout of a config file (every section and field optional; defaults below)::

    name: bi-mixsp-hard
    seed: 42
    output_dir: data/models/bi-mixsp-hard
    model: {kind: bi, encoder: sentence-transformers/all-MiniLM-L6-v2, num_projectors: 2, routing: hard, ...}
    data: {train_tasks: [STSBenchmark, SICKRelatedness], dev_sets: [STSBenchmark-dev, SICK-trial], silver_pairs: 0, ...}
    loss: {cosent: 1.0, routing: 0.1, distill: 0.0, matryoshka: 0.0, layers: 0.0, ese_alignment: 0.0, ...}
    train: {epochs: 1, batch_size: 16, lr: 5.0e-5, snapshot_every: 0, num_threads: 0, ...}

Under torchrun the batch sizes are global (all processes together) and must divide by the process count.
    tracking: {experiment: mixsp, ...}
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mixsp_core.errors import ConfigError
from mixsp_core.paths import stage_dir

MODEL_KINDS = ("bi", "cross", "encoder")
ROUTING_MODES = ("hard", "soft")
ACTIVATIONS = ("tanh", "none")
OUTPUT_INITS = ("random", "pca", "teacher")
POOLINGS = ("mean", "cls")
DROPOUT_SCHEDULES = ("none", "standard", "curriculum", "adaptive")  # 2-Tier SimCSE
STAGE_INITS = ("best", "last")  # multi-stage runs: which checkpoint of the previous stage a stage starts from
STAGE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")  # a folder name under output_dir/stages/


@dataclass
class ModelConfig:
    """What to build. ``kind``: ``bi`` (sentence embedder), ``cross`` (published MixSP pair scorer) or
    ``encoder`` (the base encoder as released: evaluated, never trained)."""

    kind: str = "bi"
    encoder: str = "sentence-transformers/all-MiniLM-L6-v2"
    max_length: int = 64
    pooling: str = "mean"  # pooled state fed to the projectors (bi); the router also sees [CLS]
    num_projectors: int = 2  # 0: no projector; 1: one projector, no router; >= 2: routed
    routing: str = "hard"  # hard: top-1, p kept un-renormalised (published); soft: probability mixture
    projector_mult: int = 10  # projector widths d -> mult*d -> d (published 10)
    projector_residual: bool = False  # z = p * (h + MLP(h)) instead of p * MLP(h)
    output_dim: int = 128  # bi only: 0 keeps the encoder width (no output projection)
    output_activation: str = "tanh"  # HPD's Dense(h -> k, tanh)
    output_bias: bool = True
    output_init: str = "random"  # random | pca (student features) | teacher (least squares to PCA_k(teacher))
    normalize: bool = True  # L2-normalise what .encode returns
    # Token Prepending (Fu et al. 2025; mixsp_core.models.token_prepending): kind encoder over a causal LM
    decoder_prompt: str = ""  # non-empty: `encoder` is a decoder LM read at this template's last token ({text})
    token_prepending: bool = False  # the placeholder before the sentence takes the last token's state
    tp_start_layer: int = 1  # TP at the input of decoder layers [tp_start_layer, tp_end_layer) (0 = the first)
    tp_end_layer: int = 7
    exit_layer: int = 0  # the embedding is read after this decoder layer; 0: the final (normed) output
    # JTCSE twin towers (mixsp_core.models.twin, training.jtcse): train a second tower (a copy of the encoder, its
    # own heads) with cross-attention between the towers' token states, the STS loss on the ensemble and the
    # saved (single) tower distilled from it; the checkpoint stays one plain student
    twin_cross_attention: bool = False
    twin_heads: int = 4  # attention heads of each cross-attention block (must divide the encoder width)
    twin_layers: int = 1  # cross-attention blocks, each tower attending to the other in every block
    twin_dropout: float = 0.1
    twin_encoder_noise: float = 0.0  # tower B's encoder weights times (1 + noise * N(0, 1)), seeded

    def validate(self, prefix: str = "model") -> None:
        _choice(f"{prefix}.kind", self.kind, MODEL_KINDS)
        _choice(f"{prefix}.routing", self.routing, ROUTING_MODES)
        _choice(f"{prefix}.output_activation", self.output_activation, ACTIVATIONS)
        _choice(f"{prefix}.output_init", self.output_init, OUTPUT_INITS)
        _choice(f"{prefix}.pooling", self.pooling, POOLINGS)
        if not self.encoder.strip():
            raise ConfigError(f"{prefix}.encoder", "must name a Hub id or a model directory")
        _at_least(f"{prefix}.max_length", self.max_length, 8)
        _at_least(f"{prefix}.num_projectors", self.num_projectors, 0)
        _at_least(f"{prefix}.projector_mult", self.projector_mult, 1)
        _at_least(f"{prefix}.output_dim", self.output_dim, 0)
        if self.kind == "cross" and self.num_projectors == 0:
            raise ConfigError(f"{prefix}.num_projectors", "the cross model needs at least one projector")
        if self.output_init != "random" and self.output_dim == 0:
            raise ConfigError(f"{prefix}.output_init", "needs an output projection (output_dim > 0)")
        _at_least(f"{prefix}.twin_heads", self.twin_heads, 1)
        _at_least(f"{prefix}.twin_layers", self.twin_layers, 1)
        _at_least(f"{prefix}.twin_encoder_noise", self.twin_encoder_noise, 0.0)
        if not 0.0 <= self.twin_dropout < 1.0:
            raise ConfigError(f"{prefix}.twin_dropout", f"must lie in [0, 1), got {self.twin_dropout}")
        self._validate_decoder(prefix)

    def _validate_decoder(self, prefix: str) -> None:
        """Token Prepending's fields (the bounds that need the model's layer count are checked at load)."""
        if not self.decoder_prompt:
            for name in ("token_prepending", "tp_start_layer", "tp_end_layer", "exit_layer"):
                if getattr(self, name) != getattr(ModelConfig, name):
                    raise ConfigError(f"{prefix}.{name}", "applies to a decoder LM: set model.decoder_prompt")
            return
        if self.kind != "encoder":
            raise ConfigError(f"{prefix}.decoder_prompt", f"is training-free: needs {prefix}.kind 'encoder'")
        if self.decoder_prompt.count("{text}") != 1:
            raise ConfigError(f"{prefix}.decoder_prompt", f"must contain {{text}} exactly once, got "
                              f"{self.decoder_prompt!r}")
        _at_least(f"{prefix}.tp_start_layer", self.tp_start_layer, 0)
        _at_least(f"{prefix}.exit_layer", self.exit_layer, 0)
        if self.tp_end_layer <= self.tp_start_layer:
            raise ConfigError(f"{prefix}.tp_end_layer", f"must be above tp_start_layer ({self.tp_start_layer}), "
                              f"got {self.tp_end_layer}")
        if self.token_prepending and self.exit_layer and self.tp_end_layer > self.exit_layer:
            raise ConfigError(f"{prefix}.tp_end_layer", f"must be at most exit_layer ({self.exit_layer}): layers "
                              f"after the exit never run, got {self.tp_end_layer}")


@dataclass
class DataConfig:
    """Which rows of the pairs table train and select the model, and where the CLI finds the inputs."""

    spec: str = "auto"  # pairs source for the CLI (see mixsp_core.data.sources.load_pairs)
    train_tasks: list[str] = field(default_factory=lambda: ["STSBenchmark"])
    dev_sets: list[str] = field(default_factory=lambda: ["STSBenchmark-dev", "SICK-trial"])
    upper_threshold: float = 4.0  # gold >= this (0-5 scale) is the "upper" class
    max_train_pairs: int = 0  # 0: all
    teacher: str = "sentence-transformers/all-mpnet-base-v2"  # distillation teacher (cache key)
    corpus: str = "auto"  # distillation sentences for the CLI: auto = the pipeline corpus
    nli: bool = False  # add SNLI dev/test triplets (entailment positive, contradiction hard negative)
    nli_dir: str = "auto"
    # Augmented SBERT "silver pairs": this many corpus pairs scored by the teacher (data.teacher), added to the
    # training pairs as task "silver" (mixsp_core.training.silver); 0: off. Each anchor's partner is a random
    # sentence (silver_random_fraction of them) or its teacher-space neighbour at a rank drawn from the list.
    silver_pairs: int = 0
    silver_neighbour_ranks: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32])
    silver_random_fraction: float = 0.2
    # Conan / CoDiEmb (training/mining.py, training/tasks.py): the SNLI splits the NLI triplets come from; keep
    # "test" out when train.retrieval_eval scores SNLI test premises (mixsp_core.evaluate.ir)
    nli_splits: list[str] = field(default_factory=lambda: ["dev", "test"])
    # DefSent+ (mixsp_core.training.definitions): the WordNet gloss table (.parquet of `mixsp defsent-glosses`,
    # or a WordNet dict directory) read when loss.definition > 0; definitions_max > 0 keeps a seeded sample
    definitions: str = ""
    definitions_max: int = 0

    def validate(self, prefix: str = "data") -> None:
        if not self.train_tasks:
            raise ConfigError(f"{prefix}.train_tasks", "must list at least one task")
        if not self.dev_sets:
            raise ConfigError(f"{prefix}.dev_sets", "must list at least one dev set")
        if not 0.0 < self.upper_threshold < 5.0:
            raise ConfigError(f"{prefix}.upper_threshold", f"must lie inside (0, 5), got {self.upper_threshold}")
        _at_least(f"{prefix}.max_train_pairs", self.max_train_pairs, 0)
        _at_least(f"{prefix}.silver_pairs", self.silver_pairs, 0)
        ranks = self.silver_neighbour_ranks
        if not ranks or any(r < 1 for r in ranks) or len(set(ranks)) != len(ranks):
            raise ConfigError(f"{prefix}.silver_neighbour_ranks", f"must be distinct integers >= 1 (1: the nearest "
                              f"neighbour), at least one, got {ranks}")
        # `not a <= x <= b` rather than `x < a or x > b`: NaN must fail
        if not 0.0 <= self.silver_random_fraction <= 1.0:
            raise ConfigError(f"{prefix}.silver_random_fraction",
                              f"must lie in [0, 1], got {self.silver_random_fraction}")
        if not self.nli_splits or not set(self.nli_splits) <= {"dev", "test"} or len(set(self.nli_splits)) != len(
                self.nli_splits):
            raise ConfigError(f"{prefix}.nli_splits", f"must list distinct SNLI splits of dev, test; got {self.nli_splits}")
        _at_least(f"{prefix}.definitions_max", self.definitions_max, 0)  # DefSent+


@dataclass
class LossConfig:
    """Weights of the terms of the total loss (0 switches a term off) and their own settings."""

    cosent: float = 1.0
    cosent_scale: float = 20.0
    pearson: float = 0.0
    rank_kl: float = 0.0
    rank_kl_temperature: float = 0.05
    listwise: float = 0.0  # CoDiEmb's listwise (PRO) term, same temperature as rank_kl
    score_bce: float = 0.0  # cross: BCE-with-logits of the score head against gold/5 (published a1)
    routing: float = 0.0  # MixSP router loss (published a2)
    routing_class_counts: list[int] = field(default_factory=list)  # [lower, upper]; empty: count train pairs
    distill: float = 0.0  # HPD: MSE(student, PCA_k(teacher))
    distill_sim: float = 0.0  # MSE between student and teacher in-batch cosines (distillation sentences)
    infonce: float = 0.0
    infonce_temperature: float = 0.05
    # Trained-in compression (bi only; mixsp_core.losses.matryoshka). A = the weighted STS terms above.
    matryoshka: float = 0.0  # weight of sum_k A(e[:k]) over matryoshka_dims smaller than the embedding
    matryoshka_dims: list[int] = field(default_factory=lambda: [32, 64, 128, 256])
    layers: float = 0.0  # 2DMSE: weight of w_i * [A(e_i) + prefixes + alignment] for an earlier layer i
    layer_mode: str = "sample"  # sample: one earlier layer per step (2DMSE); all: mean over all (ESE)
    ese_alignment: float = 0.0  # ESE: weight of D(e[:ese_dim], PCA_ese_dim(e)) (and inside the layer term)
    ese_dim: int = 64
    # CoDiEmb's IR side (losses/multi_positive_infonce.py): weight of the retrieval term on retrieval steps
    retrieval: float = 0.0
    retrieval_temperature: float = 0.05
    # DefSent+: each gloss predicts its entry among the entry embeddings (softmax over cosine / temperature);
    # candidates 0: every entry, k > 0: the batch's entries plus sampled ones up to k; center: subtract the
    # entry table's mean first (its common direction)
    definition: float = 0.0
    definition_temperature: float = 0.05
    definition_candidates: int = 0
    definition_center: bool = False
    # JTCSE (mixsp_core.losses.modulus): the modulus constraint on positive pairs' pre-normalisation embeddings,
    # STS pairs with gold >= data.upper_threshold (modulus) and NLI anchor/entailment pairs (modulus_nli)
    modulus: float = 0.0
    modulus_nli: float = 0.0
    modulus_form: str = "joint"  # joint: -log(cos) * ||a-b||/(||a||+||b||) (JTCSE) | distance (TNCSE) | ratio
    # JTCSE twin towers (model.twin_cross_attention): the STS terms (and modulus) on the cross-attended ensemble's
    # embedding, and the MSE of the single tower's in-batch cosines to the ensemble's (the distillation)
    twin_ensemble: float = 0.0
    twin_distill: float = 0.0
    # 2-Tier SimCSE: unsupervised SimCSE on corpus sentences (mixsp_core.losses.simcse, training.unsupervised)
    simcse: float = 0.0
    simcse_temperature: float = 0.05
    simcse_symmetric: bool = False  # also the transposed direction (the paper's loss is one-directional)

    @property
    def uses_teacher(self) -> bool:
        """Whether a term reads teacher targets on the distillation sentences."""
        return self.distill > 0 or self.distill_sim > 0

    def validate(self, prefix: str = "loss") -> None:
        for name in LOSS_TERMS:
            _at_least(f"{prefix}.{name}", getattr(self, name), 0.0)
        if any(k < 1 for k in self.matryoshka_dims) or len(set(self.matryoshka_dims)) != len(self.matryoshka_dims):
            raise ConfigError(f"{prefix}.matryoshka_dims", f"must be distinct positive integers, got "
                              f"{self.matryoshka_dims}")
        if self.matryoshka > 0 and not self.matryoshka_dims:
            raise ConfigError(f"{prefix}.matryoshka_dims", "must list prefix sizes when loss.matryoshka > 0")
        _choice(f"{prefix}.layer_mode", self.layer_mode, ("sample", "all"))
        _at_least(f"{prefix}.ese_dim", self.ese_dim, 1)
        _choice(f"{prefix}.modulus_form", self.modulus_form, ("joint", "distance", "ratio"))
        for name in ("cosent_scale", "rank_kl_temperature", "infonce_temperature", "retrieval_temperature"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{prefix}.{name}", f"must be > 0, got {getattr(self, name)}")
        if self.definition_temperature <= 0:  # DefSent+
            raise ConfigError(f"{prefix}.definition_temperature", f"must be > 0, got {self.definition_temperature}")
        _at_least(f"{prefix}.definition_candidates", self.definition_candidates, 0)
        if self.routing_class_counts and (
            len(self.routing_class_counts) != 2 or min(self.routing_class_counts) < 1
        ):
            raise ConfigError(f"{prefix}.routing_class_counts", "must be [lower, upper], both >= 1, or empty")
        if not self.simcse_temperature > 0:  # 2-Tier SimCSE
            raise ConfigError(f"{prefix}.simcse_temperature", f"must be > 0, got {self.simcse_temperature}")


@dataclass
class TrainConfig:
    """Optimisation, schedule, evaluation and checkpointing."""

    epochs: float = 1.0
    max_steps: int = 0  # > 0 overrides epochs
    batch_size: int = 16  # pairs per step (global: all torchrun processes together)
    batch_by_task: bool = True  # each pair batch from one task (gold scales differ between tasks)
    distill_batch_size: int = 32  # corpus sentences per step (when loss.distill or distill_sim > 0)
    # k > 0: each distillation batch is distill_batch_size / (k + 1) random sentences with their k nearest
    # neighbours in the teacher's space, so distill_sim sees close pairs too (random ones are mostly unrelated)
    distill_neighbours: int = 0
    nli_batch_size: int = 16  # triplets per step (when loss.infonce > 0)
    lr: float = 5e-5
    head_lr: float = 0.0  # router/projectors/output layer; 0: same as lr
    weight_decay: float = 0.01
    warmup_ratio: float = 0.15
    grad_clip: float = 1.0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: bool = True  # autocast on CUDA only
    amp_dtype: str = "bf16"  # bf16 | fp16 (fp16 adds a GradScaler)
    eval_every: int = 100  # steps; the run also evaluates at its end
    eval_batch_size: int = 128
    eval_at_start: bool = False  # also score the untrained model (step 0 of the dev curve)
    patience: int = 0  # evaluations without improvement before stopping; 0: never stop early
    log_every: int = 10
    save_last: bool = True  # keep a resumable checkpoint (last/) at every evaluation
    resume: bool = True  # continue from output_dir/last when it exists
    output_init_sentences: int = 2000  # sentences used to fit a pca/teacher output init
    snapshot_every: int = 0  # steps; > 0 writes snapshots/step-N/ (weights only) and start/ (step 0), for merging
    num_threads: int = 0  # torch.set_num_threads for the run; 0: torch's default
    # Conan-embedding dynamic hard negatives (training/mining.py): every mine_every steps (0: off) re-mine
    # mine_negatives per NLI anchor from mine_pool_size pool sentences, skipping near-duplicates of the positive
    mine_every: int = 0
    mine_pool_size: int = 20000
    mine_negatives: int = 3
    mine_duplicate_threshold: float = 0.9
    mine_batch_size: int = 256  # sentences per encoding batch while mining
    # CoDiEmb's IR side (training/tasks.py, evaluate/ir.py): the fraction of steps that are retrieval batches
    # (they count toward epochs' step total: set max_steps = STS steps / (1 - share) to keep the STS epochs)
    retrieval_share: float = 0.0
    retrieval_batch_size: int = 32  # queries per retrieval step
    retrieval_max_positives: int = 4  # per query (SNLI premises have 1-several entailed hypotheses)
    retrieval_max_negatives: int = 4  # hard negatives (contradictions) per query
    retrieval_eval: bool = False  # recall@10 / MRR@10 of the best checkpoint in metrics.json
    retrieval_eval_max_corpus: int = 0  # 0: the whole IR corpus (>= 100k sentences)
    # DefSent+: glosses per step; the entry table (each entry the mean embedding of its glosses, or of its own
    # text with definition_entries: lemma) rebuilt every N steps, blended m * old + (1 - m) * new
    definition_batch_size: int = 32
    definition_refresh_every: int = 100
    definition_entry_momentum: float = 0.0
    definition_entries: str = "glosses"
    # 2-Tier SimCSE and multi-stage runs (mixsp_core.training.dropout, training.unsupervised, training.multistage)
    simcse_batch_size: int = 64  # corpus sentences per step (when loss.simcse > 0), each encoded twice
    dropout_schedule: str = "none"  # none (the encoder's own rates) | standard | curriculum | adaptive
    dropout_p: float = 0.1  # standard: every dropout of the encoder at this rate
    dropout_p_start: float = 0.05  # curriculum / adaptive: the rate of the first step, moving towards ...
    dropout_p_end: float = 0.15  # ... this one (curriculum: reached at the last step; adaptive: as the loss -> 0)
    dropout_loss_momentum: float = 0.9  # adaptive: momentum of the moving average of the training loss
    init_checkpoint: str = ""  # start from this checkpoint's weights (a stage: the previous stage's); "": fresh

    def validate(self, prefix: str = "train") -> None:
        if self.epochs <= 0 and self.max_steps <= 0:
            raise ConfigError(f"{prefix}.epochs", "must be > 0 unless max_steps is set")
        _at_least(f"{prefix}.max_steps", self.max_steps, 0)
        for name in ("batch_size", "distill_batch_size", "nli_batch_size", "eval_every", "eval_batch_size",
                     "log_every", "output_init_sentences"):
            _at_least(f"{prefix}.{name}", getattr(self, name), 1)
        if self.batch_size < 2:
            raise ConfigError(f"{prefix}.batch_size", "needs at least 2 pairs: the STS losses compare pairs")
        _at_least(f"{prefix}.distill_neighbours", self.distill_neighbours, 0)
        if self.distill_batch_size % (self.distill_neighbours + 1):
            raise ConfigError(f"{prefix}.distill_batch_size", f"must be a multiple of distill_neighbours + 1 "
                              f"({self.distill_neighbours + 1}), got {self.distill_batch_size}")
        if self.lr <= 0:
            raise ConfigError(f"{prefix}.lr", f"must be > 0, got {self.lr}")
        _at_least(f"{prefix}.head_lr", self.head_lr, 0.0)
        _at_least(f"{prefix}.weight_decay", self.weight_decay, 0.0)
        _at_least(f"{prefix}.grad_clip", self.grad_clip, 0.0)
        _at_least(f"{prefix}.patience", self.patience, 0)
        _at_least(f"{prefix}.snapshot_every", self.snapshot_every, 0)
        _at_least(f"{prefix}.num_threads", self.num_threads, 0)
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"{prefix}.warmup_ratio", f"must lie in [0, 1), got {self.warmup_ratio}")
        _choice(f"{prefix}.amp_dtype", self.amp_dtype, ("bf16", "fp16"))
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"{prefix}.device", f"must be auto, cpu or cuda[:N], got {self.device!r}")
        # 2-Tier SimCSE: dropout schedules (mixsp_core.training.dropout)
        _at_least(f"{prefix}.simcse_batch_size", self.simcse_batch_size, 2)
        _choice(f"{prefix}.dropout_schedule", self.dropout_schedule, DROPOUT_SCHEDULES)
        for name in ("dropout_p", "dropout_p_start", "dropout_p_end", "dropout_loss_momentum"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{prefix}.{name}", f"must lie in [0, 1), got {getattr(self, name)}")
        _at_least(f"{prefix}.definition_batch_size", self.definition_batch_size, 2)  # DefSent+
        _at_least(f"{prefix}.definition_refresh_every", self.definition_refresh_every, 1)
        if not 0.0 <= self.definition_entry_momentum < 1.0:
            raise ConfigError(f"{prefix}.definition_entry_momentum",
                              f"must lie in [0, 1), got {self.definition_entry_momentum}")
        _choice(f"{prefix}.definition_entries", self.definition_entries, ("glosses", "lemma"))
        self._validate_mining_retrieval(prefix)

    def _validate_mining_retrieval(self, prefix: str) -> None:
        """Conan mining and CoDiEmb retrieval settings."""
        for name in ("mine_every", "retrieval_eval_max_corpus"):
            _at_least(f"{prefix}.{name}", getattr(self, name), 0)
        for name in ("mine_pool_size", "mine_negatives", "mine_batch_size", "retrieval_batch_size",
                     "retrieval_max_positives", "retrieval_max_negatives"):
            _at_least(f"{prefix}.{name}", getattr(self, name), 1)
        if self.retrieval_batch_size < 2:
            raise ConfigError(f"{prefix}.retrieval_batch_size", "needs at least 2 queries: in-batch negatives")
        if self.mine_every and self.mine_pool_size <= self.mine_negatives:
            raise ConfigError(f"{prefix}.mine_pool_size", f"must exceed mine_negatives ({self.mine_negatives}), "
                              f"got {self.mine_pool_size}")
        if not 0.0 < self.mine_duplicate_threshold <= 1.0:
            raise ConfigError(f"{prefix}.mine_duplicate_threshold",
                              f"must lie in (0, 1], got {self.mine_duplicate_threshold}")
        if not 0.0 <= self.retrieval_share < 1.0:
            raise ConfigError(f"{prefix}.retrieval_share", f"must lie in [0, 1), got {self.retrieval_share}")
        if self.retrieval_eval_max_corpus and not self.retrieval_eval:
            raise ConfigError(f"{prefix}.retrieval_eval_max_corpus", "needs train.retrieval_eval: true")


@dataclass
class TrackingConfig:
    """MLflow settings; the tracking URI comes from MLFLOW_TRACKING_URI (default sqlite:///mlflow.db)."""

    enabled: bool = True
    experiment: str = "mixsp"
    run_name: str = ""  # empty: the config's name
    log_checkpoint: bool = True  # upload the best checkpoint directory as an artifact

    def validate(self, prefix: str = "tracking") -> None:
        if not self.experiment.strip():
            raise ConfigError(f"{prefix}.experiment", "must not be empty")


@dataclass
class StageConfig:
    """One stage of a multi-stage run (:mod:`mixsp_core.training.multistage`): the run's own settings with
    ``overrides`` (dotted keys, ``train.lr: 1.0e-5``, or nested sections, ``train: {lr: 1.0e-5}``), trained in
    ``output_dir/stages/<name>/`` from the previous stage's ``init`` checkpoint (best: its dev-selected model)."""

    name: str = ""
    overrides: dict[str, Any] = field(default_factory=dict)
    init: str = "best"  # best | last checkpoint of the previous stage (unused by the first stage)

    def validate(self, prefix: str) -> None:
        if not STAGE_NAME.match(self.name):
            raise ConfigError(f"{prefix}.name", f"must be 1-64 letters, digits, '_' or '-' (a folder name), "
                              f"got {self.name!r}")
        _choice(f"{prefix}.init", self.init, STAGE_INITS)


@dataclass
class RunConfig:
    """One training run: everything ``run_training`` needs besides the data."""

    name: str = "mixsp"
    seed: int = 42
    output_dir: str = ""  # empty: data/models/<name>
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    # multi-stage runs (mixsp_core.training.multistage): empty: one run; else one run per stage, in order
    stages: list[StageConfig] = field(default_factory=list)

    def validate(self) -> RunConfig:
        """Check every field and the combinations between sections; return self."""
        if not self.name.strip():
            raise ConfigError("name", "must not be empty")
        _check_seed("seed", self.seed)
        for prefix in ("model", "data", "loss", "train", "tracking"):
            check_finite(getattr(self, prefix), prefix)
        self.model.validate()
        self.data.validate()
        self.loss.validate()
        self.train.validate()
        self.tracking.validate()
        self._validate_combinations()
        if self.stages:  # multi-stage runs: each stage's config must be a valid run too
            stage_configs(self)
        return self

    def _validate_combinations(self) -> None:
        kind, loss = self.model.kind, self.loss
        if kind == "encoder":
            return  # evaluated as released: the loss settings are unused
        terms = {k: v for k, v in asdict(loss).items() if isinstance(v, float) and k in LOSS_TERMS and v > 0}
        if not terms:
            raise ConfigError("loss", "every loss weight is 0: nothing to train")
        if kind == "cross":
            for name in ("cosent", "pearson", "rank_kl", "listwise", "distill", "distill_sim", "infonce"):
                if getattr(loss, name) > 0:
                    raise ConfigError(f"loss.{name}", "not available for the cross model (it scores pairs, "
                                      "it does not embed sentences); use score_bce and routing")
        elif loss.score_bce > 0:
            raise ConfigError("loss.score_bce", "only the cross model has a score head")
        if loss.simcse > 0 and kind != "bi":  # 2-Tier SimCSE
            raise ConfigError("loss.simcse", "SimCSE embeds sentences: the bi student only")
        if loss.routing > 0 and self.model.num_projectors != 2:
            raise ConfigError("loss.routing", "the routing loss needs model.num_projectors: 2 (upper / lower)")
        for name in ("distill", "distill_sim"):
            if getattr(loss, name) > 0 and self.model.output_dim == 0:
                raise ConfigError(f"loss.{name}", "distillation needs an output projection (model.output_dim > 0)")
        if self.model.output_init == "teacher" and not loss.uses_teacher:
            raise ConfigError("model.output_init",
                              "'teacher' needs teacher targets: set loss.distill or loss.distill_sim > 0")
        if loss.infonce > 0 and not self.data.nli:
            raise ConfigError("loss.infonce", "needs NLI triplets: set data.nli: true")
        compression = [name for name in _COMPRESSION_TERMS if getattr(loss, name) > 0]
        if compression and kind != "bi":
            raise ConfigError(f"loss.{compression[0]}", "trained-in compression applies to the bi student only")
        if compression and not any(getattr(loss, name) > 0 for name in STS_TERMS):
            raise ConfigError(f"loss.{compression[0]}", "needs an STS term to apply to prefixes and layers "
                              "(cosent, pearson, rank_kl or listwise > 0)")
        width = self.model.output_dim
        if loss.matryoshka > 0 and width and all(k >= width for k in loss.matryoshka_dims):
            # every prefix would be skipped (not smaller than the embedding): the term would silently do nothing
            raise ConfigError("loss.matryoshka_dims", f"needs a size below model.output_dim ({width}) when "
                              f"loss.matryoshka > 0, got {loss.matryoshka_dims}")
        if loss.ese_alignment > 0 and width and loss.ese_dim >= width:
            raise ConfigError("loss.ese_dim", f"must be smaller than model.output_dim ({width}), got {loss.ese_dim}")
        _validate_jtcse(self)
        if loss.definition > 0 and kind != "bi":  # DefSent+
            raise ConfigError("loss.definition", "embeds definition sentences: the bi student only")
        if loss.definition > 0 and not self.data.definitions.strip():
            raise ConfigError("data.definitions", "loss.definition > 0 needs the gloss table "
                              "(a .parquet of `mixsp defsent-glosses` or a WordNet dict directory)")
        self._validate_mining_retrieval()

    def _validate_mining_retrieval(self) -> None:
        """Conan mining needs the InfoNCE term; CoDiEmb's retrieval term and its share of steps go together."""
        tc, loss = self.train, self.loss
        if tc.mine_every and loss.infonce == 0:
            raise ConfigError("train.mine_every", "mines hard negatives for InfoNCE: set loss.infonce > 0")
        if (loss.retrieval > 0) != (tc.retrieval_share > 0):
            raise ConfigError("train.retrieval_share" if loss.retrieval > 0 else "loss.retrieval",
                              "loss.retrieval > 0 and train.retrieval_share > 0 go together (retrieval steps "
                              "train the retrieval term only)")
        if (tc.mine_every or loss.retrieval > 0 or tc.retrieval_eval) and self.model.kind != "bi":
            name = "train.mine_every" if tc.mine_every else "loss.retrieval" if loss.retrieval else "train.retrieval_eval"
            raise ConfigError(name, "applies to the bi student only")

    @property
    def needs_teacher(self) -> bool:
        """Whether the run reads the corpus and its teacher rows: distillation, a teacher output init, or
        silver pairs (scored by the teacher)."""
        return self.loss.uses_teacher or self.model.output_init == "teacher" or self.data.silver_pairs > 0

    @property
    def needs_corpus(self) -> bool:
        """Whether the run reads the corpus: for its teacher rows, or as SimCSE's unlabeled sentences."""
        return self.needs_teacher or self.loss.simcse > 0

    def resolved_output_dir(self) -> Path:
        return Path(self.output_dir) if self.output_dir else Path("data") / "models" / self.name

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


STS_TERMS = ("cosent", "pearson", "rank_kl", "listwise")  # losses on (cosine, gold) of a batch of pairs
_COMPRESSION_TERMS = ("matryoshka", "layers", "ese_alignment")
# every weighted term of LossConfig, in the order the trainer sums them
LOSS_TERMS = (*STS_TERMS, "score_bce", "routing", "distill", "distill_sim", "infonce", *_COMPRESSION_TERMS,
              "retrieval", "definition", "modulus", "modulus_nli", "twin_ensemble", "twin_distill",
              "simcse")


def _validate_jtcse(config: RunConfig) -> None:
    """JTCSE's combinations: the modulus terms and the twin towers are for the bi student; the twin's terms
    need the twin and the twin needs its ensemble term (and an STS term to apply there)."""
    loss, model = config.loss, config.model
    for name in ("modulus", "modulus_nli", "twin_ensemble", "twin_distill"):
        if getattr(loss, name) > 0 and model.kind != "bi":
            raise ConfigError(f"loss.{name}", "applies to the bi student only")
    if model.twin_cross_attention and model.kind != "bi":
        raise ConfigError("model.twin_cross_attention", "applies to the bi student only")
    if loss.modulus_nli > 0 and not (config.data.nli and loss.infonce > 0):
        raise ConfigError("loss.modulus_nli", "needs the NLI batches: set data.nli: true and loss.infonce > 0")
    for name in ("twin_ensemble", "twin_distill"):
        if getattr(loss, name) > 0 and not model.twin_cross_attention:
            raise ConfigError(f"loss.{name}", "needs the twin towers: set model.twin_cross_attention: true")
    if model.twin_cross_attention:
        if loss.twin_ensemble <= 0:
            raise ConfigError("loss.twin_ensemble", "must be > 0 with model.twin_cross_attention (the ensemble's "
                              "loss is what trains the second tower and the cross-attention)")
        if not any(getattr(loss, name) > 0 for name in STS_TERMS):
            raise ConfigError("loss.twin_ensemble", "needs an STS term to apply to the ensemble "
                              "(cosent, pearson, rank_kl or listwise > 0)")


# --------------------------------------------------------------------------- building from dicts


MAX_SEED = 2**32 - 1  # numpy's legacy seeding and pandas' random_state take 32-bit seeds


def _check_seed(name: str, value: int) -> None:
    if not 0 <= value <= MAX_SEED:
        raise ConfigError(name, f"must be an integer in 0..{MAX_SEED}, got {value}")


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(name, f"must be one of {', '.join(allowed)}; got {value!r}")


def _at_least(name: str, value: float, low: float) -> None:
    # `not value >= low` rather than `value < low`: NaN fails every comparison, so it must fail this one
    if not value >= low or not math.isfinite(value):
        raise ConfigError(name, f"must be a finite number >= {low}, got {value}")


def _finite(name: str, value: float) -> float:
    """``value`` when it is a finite number; NaN and infinities (YAML ``.nan``, ``.inf``, ``1e400``) raise."""
    if not math.isfinite(value):
        raise ConfigError(name, f"must be a finite number, got {value}")
    return value


def check_finite(section: Any, prefix: str) -> None:
    """Raise ConfigError naming ``prefix.field`` for any NaN / infinite float field of the dataclass
    ``section`` (one built in code, e.g. with ``dataclasses.replace``, never passed through ``_coerce``)."""
    for item in dataclasses.fields(section):
        value = getattr(section, item.name)
        where = f"{prefix}.{item.name}" if prefix else item.name
        if isinstance(value, float):
            _finite(where, value)
        elif isinstance(value, list):
            for i, entry in enumerate(value):
                if isinstance(entry, float):
                    _finite(f"{where}[{i}]", entry)


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Check ``value`` against a field's type hint, converting int -> float where YAML wrote 1 for 1.0."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            try:
                return _coerce(name, value, option)
            except ConfigError:
                continue
        raise ConfigError(name, f"has the wrong type: {type(value).__name__} ({value!r})")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(name, f"must be a list, got {type(value).__name__} ({value!r})")
        (item,) = typing.get_args(hint)
        return [_coerce(f"{name}[{i}]", v, item) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(hint):  # a list of sections (run.stages)
        return build_dataclass(hint, value, name)
    if origin is dict:  # a free mapping (a stage's overrides), checked where it is applied
        if not isinstance(value, dict):
            raise ConfigError(name, f"must be a mapping, got {type(value).__name__} ({value!r})")
        return dict(value)
    if hint is float:
        # YAML 1.1 reads "5e-5" (no dot) as a string: accept numeric strings for float fields
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(name, f"must be a number, got {type(value).__name__} ({value!r})")
        return _finite(name, float(value))
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(name, f"must be an integer, got {type(value).__name__} ({value!r})")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(name, f"must be true or false, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(name, f"must be a string, got {type(value).__name__} ({value!r})")
        return value
    raise ConfigError(name, f"unsupported field type {hint}")  # pragma: no cover - a programming error


def build_dataclass(cls: type, raw: Any, prefix: str) -> Any:
    """Build dataclass ``cls`` from a mapping, recursing into nested dataclass fields; unknown keys and
    wrongly typed values raise ConfigError naming ``prefix.field``. Ranges are checked by ``validate``."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(prefix or "<root>", f"must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in known:
            where = f"{prefix}.{key}" if prefix else str(key)
            raise ConfigError(where, f"unknown field (known: {', '.join(sorted(known))})")
    values = {}
    for key, value in raw.items():
        where = f"{prefix}.{key}" if prefix else key
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            values[key] = build_dataclass(hint, value, where)
        else:
            values[key] = _coerce(where, value, hint)
    return cls(**values)


def config_from_dict(raw: dict[str, Any]) -> RunConfig:
    """Build and validate a :class:`RunConfig` from a plain mapping (as read from YAML)."""
    return build_dataclass(RunConfig, copy.deepcopy(raw), "").validate()


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any] | list[str]) -> dict[str, Any]:
    """Set dotted keys in a raw config mapping: ``{"train.lr": 1e-4}`` or ``["train.lr=1e-4"]``
    (values of the list form are parsed as YAML scalars)."""
    raw = copy.deepcopy(raw)
    items = overrides.items() if isinstance(overrides, dict) else (_split_override(o) for o in overrides)
    for dotted, value in items:
        node = raw
        *parents, leaf = dotted.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(dotted, f"'{part}' is not a section")
            node = child
        node[leaf] = value
    return raw


def _split_override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(text, "an override reads KEY=VALUE, e.g. train.lr=1e-4")
    return key.strip(), yaml.safe_load(value)


def read_yaml(path: str | Path, what: str = "config file") -> Any:
    """The YAML document of ``path``; a missing file or bad YAML raises ConfigError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(str(path), f"{what} not found")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(str(path), f"not valid YAML: {err}") from err


def load_config(path: str | Path, section: str | None = None,
                overrides: dict[str, Any] | list[str] | None = None) -> RunConfig:
    """Read a training config from a YAML file; ``section`` picks one top-level key (e.g. ``train``
    of params.yaml). Errors name the file and the field."""
    path = Path(path)
    raw = read_yaml(path)
    if section is not None:
        if not isinstance(raw, dict) or section not in raw:
            raise ConfigError(section, f"section missing from {path}")
        raw = raw[section] or {}
    if overrides:
        raw = apply_overrides(raw, overrides)
    try:
        return config_from_dict(raw)
    except ConfigError as err:
        raise ConfigError(err.field, f"{str(err).split(': ', 1)[1]} (in {path})") from err


def flatten(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists kept as values), for MLflow params."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict):
            flat.update(flatten(value, name))
        else:
            flat[name] = value
    return flat


def dump_config(config: RunConfig, path: str | Path) -> Path:
    """Write the full config (defaults included) as YAML; ``load_config`` reads it back unchanged."""
    from mixsp_core.io import write_text_atomic

    return write_text_atomic(path, yaml.safe_dump(config.to_dict(), sort_keys=False))


# --------------------------------------------------------------------------- multi-stage runs
# (mixsp_core.training.multistage trains them; the plan lives here because validate() checks it)

# override keys a stage may not set (a key equal to one, or below it)
SHARED_KEYS = ("name", "output_dir", "stages", "model", "tracking", "train.resume", "data.spec", "data.corpus",
               "data.teacher")


def stage_overrides(stage: StageConfig) -> dict[str, Any]:
    """The stage's overrides as dotted keys (nested sections flattened: ``{train: {lr: 1}}`` -> ``train.lr``)."""
    return flatten(stage.overrides)


def stage_configs(config: RunConfig, root: str | Path | None = None) -> list[RunConfig]:
    """The run config of each stage (empty for a one-stage config), validated. With ``root`` (the run
    directory) each one's ``output_dir`` is its stage directory and every stage after the first starts from
    the previous stage's ``init`` checkpoint; without it those paths are left as the run config has them."""
    base = config.to_dict()
    base["stages"] = []
    out: list[RunConfig] = []
    names: set[str] = set()
    for i, stage in enumerate(config.stages):
        where = f"stages[{i}]"
        stage.validate(where)
        if stage.name in names:
            raise ConfigError(f"{where}.name", f"{stage.name!r} names two stages")
        names.add(stage.name)
        overrides = stage_overrides(stage)
        for key in overrides:
            shared = next((s for s in SHARED_KEYS if key == s or key.startswith(f"{s}.")), None)
            if shared is not None or (i > 0 and key == "train.init_checkpoint"):
                raise ConfigError(f"{where}.overrides.{key}", "is shared by every stage of the run (set it at the "
                                  "top level)" if shared else "is set by the chain: the previous stage's checkpoint")
        raw = apply_overrides(base, overrides)
        raw["name"] = f"{config.name}/{stage.name}"
        raw["tracking"]["log_checkpoint"] = False  # the run uploads its one result at the end
        if root is not None:
            raw["output_dir"] = str(stage_dir(root, stage.name))
            if i > 0:
                previous = stage_dir(root, config.stages[i - 1].name)
                raw["train"]["init_checkpoint"] = str(previous / stage.init)
        try:
            stage_config = config_from_dict(raw)
        except ConfigError as err:
            raise ConfigError(f"{where}.overrides.{err.field}", str(err).split(": ", 1)[1]) from err
        if i > 0 and stage.init == "last" and not out[-1].train.save_last:
            raise ConfigError(f"{where}.init", f"'last' needs stage {config.stages[i - 1].name!r} to keep "
                              "last/ (train.save_last: true)")
        out.append(stage_config)
    return out


def check_stages(config: RunConfig) -> None:
    """Validate ``config.stages`` (:meth:`RunConfig.validate` calls it): names, overrides, every stage's config."""
    stage_configs(config)


def run_configs(config: RunConfig) -> list[RunConfig]:
    """The configs of the runs ``config`` makes: its stages', or itself (what its inputs must serve)."""
    return stage_configs(config) or [config]
