"""Several processes: under `torchrun --nproc_per_node N` the same `train(...)` call runs data-parallel.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK in each process's environment. Each process holds the
whole model, takes every (rank)-th row of each micro-batch, and DistributedDataParallel averages
the gradients in the backward pass, so every rank applies the same update. NCCL carries the
gradients between GPUs, gloo between CPU processes. Only rank 0 logs and writes checkpoints.
"""
from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

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


def sync_gradients(module: nn.Module, now: bool):
    """Let DDP all-reduce the gradients in this backward pass only when `now` (the last micro-batch)."""
    from .fsdp import is_sharded, set_gradient_sync

    if is_sharded(module):  # FSDP: reduce-scatter only in the last backward pass
        set_gradient_sync(module, now)
        return nullcontext()
    if now or not isinstance(module, nn.parallel.DistributedDataParallel):
        return nullcontext()
    return module.no_sync()


def accumulate(loss_module: nn.Module, micro_batches: Sequence[dict[str, torch.Tensor]], n_answer_tokens: int,
               ctx: DistContext) -> Iterator[tuple[dict[str, torch.Tensor], Callable[[torch.Tensor], None]]]:
    """Each micro-batch of one optimizer step with its `backward(summed_loss)`: the loss scaling
    and the gradient synchronisation of gradient accumulation and DDP, kept out of the loop.

    The loss of a step is the mean over the answer tokens of the whole step, so each micro-batch's
    summed loss is divided by the answer tokens of all micro-batches (of all ranks), not by its own.
    A worked example: two micro-batches of 3 and 5 answer tokens with token losses (2, 1, 3) and
    (1, 1, 1, 1, 1) sum to 6 and 5; each divided by 8 gives 6/8 + 5/8 = 1.375, the mean of the 8
    token losses, and since gradients add up in `.grad`, the gradient of that mean: one batch of 8
    tokens. Dividing each by its own count instead, (6/3 + 5/5) / 2 = 1.5, would weigh each token of
    the short micro-batch 5/3 times more than one of the long.

    Under DDP each rank's backward pass gives the gradient of its own rows, and DDP averages them
    over the ranks (divides their sum by world_size); multiplying the scale by world_size turns that
    average back into the sum over all rows, so two ranks give exactly the single process's
    gradient. DDP all-reduces only in the backward pass of the last micro-batch (`sync_gradients`);
    the earlier ones accumulate locally. The forward pass must run inside that same context: DDP
    decides at the forward whether the coming backward synchronises.
    """
    scale = ctx.world_size / n_answer_tokens

    def backward(summed_loss: torch.Tensor) -> None:
        (summed_loss * scale).backward()

    for i, batch in enumerate(micro_batches):
        with sync_gradients(loss_module, now=i == len(micro_batches) - 1):
            yield batch, backward


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
