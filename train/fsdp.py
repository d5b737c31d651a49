"""Sharded data parallel: `TrainConfig(parallel="fsdp")` under torchrun, on PyTorch's FSDP2 engine.

DDP copies the whole model to every process. Fully sharded data parallel (FSDP) cuts every tensor
into N pieces along dim 0 and gives each of the N processes one piece, so the frozen base costs
1/N per process. torch's `fully_shard` does the work; this file only says what to wrap:

    each decoder layer        fully_shard(layer)   all-gathered just before its forward (and again
                                                   for its backward), freed right after
    the rest (root)           fully_shard(model)   embeddings, final norm, head, their LoRA

The training step calls the loss (decoder, then the head at answer positions only), not the
model's forward, so the loss is registered as a forward method of the root: FSDP gathers the
root's tensors around it as it would around `model(...)`.

A 4-bit layer's packed uint8 weight is a (frozen) parameter, so FSDP shards it like any other.
Its quant state (absmax per block of 64 weights, the nested absmax of double quantization, and the
fp32 scales decoded from them once for the kernels) lives in buffers, which FSDP would copy whole to every process; they are turned into frozen parameters
first so they are sharded too. The code books (16 and 256 values) and the scalar offset stay
replicated: 1,092 bytes per 4-bit layer. The root's tensors stay gathered from the forward pass to
the end of the backward pass (FSDP does not free the root in between): `train.memory` counts them.

Gradients: each process runs its rows of the micro-batch; in the backward pass FSDP
reduce-scatters (averages) the LoRA gradients, each process keeping the slice its optimizer owns,
so AdamW's moments are sharded as well. Averaging over processes is what DDP does, so the loss
scaling of `training_step` stays the same.
"""
from __future__ import annotations

import functools
import os
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor

from .distributed import DistContext, all_gather_object, wrap_ddp
from .loss import AnswerLossModule, answer_loss

SHARDED_QUANT_STATE = ("absmax", "nested_absmax", "decoded_absmax")  # per-block scales: they grow with the weight
OPTIMIZER_DIR = "optimizer"                        # torch.distributed.checkpoint folder in a checkpoint


def wrap_model(loss_module: nn.Module, ctx: DistContext, parallel: str = "ddp") -> nn.Module:
    """The module the training step calls: as is (one process), DDP, or sharded with FSDP2."""
    if parallel == "fsdp":
        if not ctx.enabled:
            raise ValueError("parallel='fsdp' shards the model across processes, but this is a single process: "
                             "launch with `torchrun --nproc-per-node N` (N >= 2), or use parallel='ddp'")
        return wrap_fsdp(loss_module, ctx)
    return wrap_ddp(loss_module, ctx)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ValueError(f"parallel='fsdp' wraps each decoder layer (model.model.layers), but {type(model).__name__} "
                         "has none: FSDP needs at least one layer to shard")
    return layers


def check_shardable(model: nn.Module, world_size: int) -> None:
    """Every 4-bit weight must give each process at least one quant block (blocksize/2 packed bytes)."""
    from quant import Linear4bit

    decoder_layers(model)
    for name, m in model.named_modules():
        if isinstance(m, Linear4bit):
            block_bytes = m.blocksize // 2
            if m.weight.numel() < world_size * block_bytes:
                raise ValueError(f"{name}: a {m.out_features}x{m.in_features} 4-bit weight has {m.weight.numel()} packed "
                                 f"bytes, fewer than one block of {m.blocksize} weights ({block_bytes} bytes) for each "
                                 f"of {world_size} processes; use fewer processes or parallel='ddp'")


def quant_state_as_parameters(model: nn.Module) -> None:
    """Turn each Linear4bit's per-block scales from buffers into frozen parameters, so FSDP shards them."""
    from quant import Linear4bit

    for m in model.modules():
        if isinstance(m, Linear4bit):
            for name in SHARDED_QUANT_STATE:
                t = m._buffers.get(name)
                if t is not None:
                    del m._buffers[name]
                    m.register_parameter(name, nn.Parameter(t, requires_grad=False))


def shard_model(model: nn.Module, mesh) -> nn.Module:
    """fully_shard each decoder layer, then the root, in place (real or meta tensors alike)."""
    check_shardable(model, mesh.size())
    quant_state_as_parameters(model)
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)  # the root: embeddings, final norm, head


class ShardedAnswerLoss(AnswerLossModule):
    """AnswerLossModule for a sharded model: the loss runs as a registered forward method of the root."""

    def forward(self, input_ids, labels, attention_mask=None, position_ids=None):
        return self.model.fsdp_answer_loss(input_ids, labels, attention_mask, position_ids=position_ids)

    def set_requires_gradient_sync(self, now: bool) -> None:
        """FSDP's no_sync (`train.distributed.sync_gradients`): reduce-scatter only in the last backward pass."""
        self.model.set_requires_gradient_sync(now)

    def reshard(self) -> None:
        self.model.reshard()


def wrap_fsdp(loss_module: nn.Module, ctx: DistContext) -> nn.Module:
    """Shard the model inside `loss_module` (unless it was loaded sharded) and return the loss to call.

    Every process must hold the same values before sharding (each keeps its own slice of its own
    copy): the trainable parameters are broadcast from rank 0, as DDP does; the frozen base was
    read from the same file everywhere.
    """
    model = loss_module.model
    if not isinstance(model, FSDPModule):
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    dist.broadcast(p.data, src=0)
        shard_model(model, init_device_mesh(torch.device(ctx.device).type, (ctx.world_size,)))
    model.fsdp_answer_loss = functools.partial(answer_loss, model, reduction="sum")
    register_fsdp_forward_method(model, "fsdp_answer_loss")
    return ShardedAnswerLoss(model)


def local_nbytes(t: torch.Tensor) -> int:
    """Bytes this process holds of a (possibly sharded) tensor."""
    local = t.to_local() if isinstance(t, DTensor) else t
    return local.numel() * local.element_size()


@contextmanager
def gathered_trainable(model: nn.Module):
    """Inside: every trainable parameter of `model` is a plain tensor holding the full value.

    A collective: every process must enter. Used to write the adapter once, in PEFT's layout,
    through the same `save_adapter` a single process calls (the LoRA matrices are small).
    """
    swapped = []
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and p.requires_grad and isinstance(p, DTensor):
                module._parameters[name] = nn.Parameter(p.full_tensor().detach(), requires_grad=True)
                swapped.append((module, name, p))
    try:
        yield model
    finally:
        for module, name, p in swapped:
            module._parameters[name] = p


# ------------------------------------------------------------------ checkpoints

def save_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, folder: str, ctx: DistContext) -> None:
    """Each process writes its shard of AdamW's moments with torch.distributed.checkpoint (a collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    if ctx.is_main:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder)
    dist.barrier()
    dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=folder)
    dist.barrier()


def load_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, path: str, parallel: str) -> None:
    """Restore the optimizer of checkpoint `path`: whole from its state (DDP, one process) or sharded (FSDP).

    torch.distributed.checkpoint reshards on load, so an FSDP checkpoint resumes on any number of
    processes. A whole optimizer state and a sharded one do not convert into each other here.
    """
    folder = os.path.join(path, OPTIMIZER_DIR)
    saved = state.get("parallel", "ddp")
    if parallel == "fsdp":
        if not os.path.isdir(folder):
            raise ValueError(f"{path} was saved with parallel={saved!r} (one whole optimizer state, "
                             f"{state.get('world_size', 1)} process(es)) and cannot be resharded for parallel='fsdp': "
                             "resume it with parallel='ddp'")
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

        template = {"optimizer": get_optimizer_state_dict(model, optimizer)}
        dcp.load(template, checkpoint_id=folder)
        set_optimizer_state_dict(model, optimizer, template["optimizer"])
        return
    if "optimizer" not in state:
        raise ValueError(f"{path} holds a sharded optimizer state (parallel='fsdp', {state.get('world_size')} "
                         f"processes in {folder}); resume it under torchrun with parallel='fsdp'")
    optimizer.load_state_dict(state["optimizer"])


def even_eval_batches(batches: list[dict], ctx: DistContext, example_batch: dict | None) -> list[dict]:
    """Pad this process's evaluation batches to the count of the busiest process.

    Under FSDP every forward pass is a collective (each layer is all-gathered), so all processes
    must run the same number. A padding batch has every label -100: it runs the model and adds
    nothing to the loss or the token count.
    """
    most = max(all_gather_object(len(batches), ctx))
    if len(batches) == most:
        return batches
    filler = batches[0] if batches else example_batch
    pad = {"input_ids": filler["input_ids"], "labels": torch.full_like(filler["labels"], -100)}
    return batches + [pad] * (most - len(batches))
