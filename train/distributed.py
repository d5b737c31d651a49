"""Several processes: under `torchrun --nproc_per_node N` the same `train(...)` call runs data-parallel.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK in each process's environment. Each process holds the
whole model, takes every (rank)-th row of each micro-batch, and DistributedDataParallel averages
the gradients in the backward pass, so every rank applies the same update. NCCL carries the
gradients between GPUs, gloo between CPU processes. Only rank 0 logs and writes checkpoints.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"
    owns_group: bool = False  # True when this run created the process group and must destroy it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup_distributed(device: str) -> DistContext:
    """Join the process group torchrun describes (if any); single-process runs get a plain context."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if "RANK" not in os.environ or world_size <= 1:
        return DistContext(device=device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    on_gpu = torch.device(device).type == "cuda"
    if on_gpu:
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend="nccl" if on_gpu else "gloo")
    return DistContext(rank, dist.get_world_size(), local_rank, device, owns)


def teardown_distributed(ctx: DistContext) -> None:
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def wrap_ddp(module: nn.Module, ctx: DistContext) -> nn.Module:
    """DistributedDataParallel over the trainable parameters, starting from rank 0's values.

    Only the trainable (LoRA) parameters are broadcast: every rank loaded the same frozen base
    weights from disk, and broadcasting a whole quantized model would only cost time.
    """
    if not ctx.enabled:
        return module
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                dist.broadcast(p.data, src=0)
    device_ids = [ctx.local_rank] if torch.device(ctx.device).type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=device_ids, forward_sync_buffers=False, init_sync=False)


@contextmanager
def sync_gradients(module: nn.Module, now: bool) -> Iterator[None]:
    """Inside: a forward and backward pass that all-reduce the gradients only when `now` (the last
    micro-batch of a step); before that each process accumulates its own in `.grad`.

    DDP decides at the forward pass whether the coming backward synchronises, so both run inside.
    A module with FSDP's switch (`set_requires_gradient_sync`, train/fsdp.py) reduce-scatters only
    when `now`; a single process has nothing to synchronise.
    """
    if hasattr(module, "set_requires_gradient_sync"):  # FSDP
        module.set_requires_gradient_sync(now)
        yield
    elif isinstance(module, nn.parallel.DistributedDataParallel) and not now:
        with module.no_sync():
            yield
    else:
        yield


def all_reduce_sum(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum a tensor over all ranks (a no-op in a single process)."""
    if ctx.enabled:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_object(obj, ctx: DistContext) -> list:
    """Every rank's `obj`, in rank order (a list of one in a single process)."""
    if not ctx.enabled:
        return [obj]
    out = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out
