"""Data-parallel training across processes (``torchrun``): process group, batch sharding, gathering.

``run_training`` calls :func:`setup` once. Under ``torchrun`` (any ``--nproc_per_node``, one included:
that runs the NCCL path on a single GPU) it joins the process group (NCCL on CUDA, gloo on CPU) and each rank takes its contiguous slice of every
global batch (:meth:`DistContext.shard`). The loss is computed on the *global* batch: each rank gathers
the others' embeddings (:meth:`DistContext.gather`; its own slice keeps its gradient), so CoSENT ranks all
pairs of the global batch and InfoNCE sees every rank's in-batch negatives, exactly as one process with
the whole batch would. DistributedDataParallel then averages the ranks' gradients; since each rank's
gradient covers only its own slice of the same global loss, the loss is scaled by the world size first
(:attr:`DistContext.grad_scale`), making the update the single-process one up to float rounding.
Outside ``torchrun`` everything is a no-op (world size 1).
"""

from __future__ import annotations

import datetime
import hashlib
import inspect
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from mixsp_core.errors import ConfigError

# Rank 0 evaluates on the dev sets while the others wait at a barrier: allow a long wait.
_TIMEOUT = datetime.timedelta(minutes=60)


def env_world_size() -> int:
    """``WORLD_SIZE`` as torchrun sets it (1 when absent)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def env_rank() -> int:
    """``RANK`` as torchrun sets it (0 when absent); usable before the process group exists."""
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    """True on rank 0 (or when not distributed): the process that writes files and MLflow records."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return env_rank() == 0


@dataclass
class DistContext:
    """Where this process stands: ``rank`` of ``world_size``, its ``device``; ``owns_group`` when
    :func:`setup` created the process group (and :meth:`close` should destroy it)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device | None = None
    owns_group: bool = False
    in_group: bool = False  # a process group is joined (also with one process, under torchrun)

    @property
    def enabled(self) -> bool:
        return self.in_group or self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def grad_scale(self) -> float:
        """Factor on the global loss before ``backward`` so DDP's gradient average equals its gradient."""
        return float(self.world_size)

    def check_divisible(self, field: str, size: int) -> None:
        """Every rank must get an equal slice of a global batch of ``size`` (config field ``field``)."""
        if size % self.world_size:
            raise ConfigError(field, f"{size} is not divisible by the {self.world_size} training processes")

    def shard(self, indices: np.ndarray) -> np.ndarray:
        """This rank's contiguous slice of a global batch's row indices (ranks in order make the batch)."""
        per = len(indices) // self.world_size
        return indices[self.rank * per:(self.rank + 1) * per]

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's ``local`` ``[n, ...]`` (same shape on all ranks) in rank order.

        The other ranks' rows are constants here; this rank's rows are ``local`` itself, so its gradient
        flows back to this rank's forward pass.
        """
        if not self.enabled:
            return local
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(parts, local.detach().contiguous())
        parts[self.rank] = local
        return torch.cat(parts, dim=0)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def broadcast_flag(self, value: bool) -> bool:
        """Rank 0's ``value`` on every rank (e.g. the early-stopping decision, taken after evaluation)."""
        if not self.enabled:
            return value
        holder = [value]
        dist.broadcast_object_list(holder, src=0)
        return bool(holder[0])

    def all_equal(self, text: str) -> bool:
        """Whether every rank passed the same ``text`` (e.g. a weights digest)."""
        if not self.enabled:
            return True
        texts: list[str | None] = [None] * self.world_size
        dist.all_gather_object(texts, text)
        return all(t == texts[0] for t in texts)

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` in DistributedDataParallel (its constructor copies rank 0's weights to every rank),
        or ``model`` itself when not distributed."""
        if not self.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [self.device.index] if self.device is not None and self.device.type == "cuda" else None
        # No buffer sync per forward (the student's buffers are constants). torch 2.13 renamed the
        # argument and deprecated the old name; older torch (>= 2.2 is supported) knows only the old one.
        no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
                   else {"broadcast_buffers": False})
        # find_unused_parameters: the encoder's pooler feeds nothing in the bi student
        return DDP(model, device_ids=ids, find_unused_parameters=True, **no_sync)

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def launched_by_torchrun() -> bool:
    """Whether torchrun (torch.distributed.elastic) started this process, whatever its process count."""
    return "TORCHELASTIC_RUN_ID" in os.environ or env_world_size() > 1


def setup(device: torch.device) -> DistContext:
    """Join the process group when launched by torchrun, else a single-process context.

    ``device``: the configured device; on CUDA each rank takes ``cuda:LOCAL_RANK``. A group that already
    exists (created by the caller) is used as is.
    """
    if not launched_by_torchrun() and not (dist.is_available() and dist.is_initialized()):
        return DistContext(device=device)
    if not dist.is_available():
        raise RuntimeError("launched by torchrun but this torch build has no torch.distributed")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    owns = False
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=_TIMEOUT)
        owns = True
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device, owns, in_group=True)


def weights_digest(model: nn.Module) -> str:
    """SHA-256 over every parameter's bytes (name order): equal digests mean bitwise-equal weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
