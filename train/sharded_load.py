"""Loading a checkpoint straight into FSDP shards: no process ever holds the whole model.

    load_sharded(path, LoRAConfig(...), quant="nf4")  under torchrun  ->  (sharded model, tokenizer)

1. build the model on the meta device (shapes, no memory), each nn.Linear already a 4-bit
   skeleton of the right shapes, the LoRA adapters applied;
2. shard it with FSDP (`shard_model`, the same wrapping `train` does) and give each process
   storage for its shards only (`to_empty`);
3. read the checkpoint one tensor at a time: quantize it whole (NF4 blocks and absmax need the
   full tensor), copy this process's rows into its shard, free the rest;
4. draw the LoRA matrices exactly as `apply_lora` does (same seed, same order) and keep the rows
   this process owns.

Peak host memory per process: its shards plus about one full tensor (and its packed copy).
`train(model, ...)` with `TrainConfig(parallel="fsdp")` takes the model as it is. The process group
joined here outlives the call (training needs it): call `torch.distributed.destroy_process_group()`
when done, or it is destroyed at exit.
"""
from __future__ import annotations

import atexit
import math

import bitsandbytes.functional as bnbF
import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from lora import LoRAConfig, apply_lora, lora_modules
from model import Llama
from model.checkpoint import open_checkpoint
from model.load import release_freed_memory
from quant import Linear4bit
from quant.nf4 import NESTED_BLOCKSIZE

from .distributed import setup_distributed, teardown_distributed
from .fsdp import shard_model


def meta_linear4bit(linear: nn.Linear, quant_type: str, dtype: torch.dtype, compute_dtype: torch.dtype | None,
                    blocksize: int = 64) -> Linear4bit:
    """A Linear4bit on the meta device with the shapes quantizing `linear` with double quant would give."""
    out_f, in_f = linear.out_features, linear.in_features
    n_blocks = math.ceil(out_f * in_f / blocksize)
    meta = dict(device="meta")
    state2 = bnbF.QuantState(absmax=torch.empty(math.ceil(n_blocks / NESTED_BLOCKSIZE), dtype=torch.float32, **meta),
                             code=torch.empty(256, dtype=torch.float32, **meta), blocksize=NESTED_BLOCKSIZE,
                             dtype=torch.float32)
    state = bnbF.QuantState(absmax=torch.empty(n_blocks, dtype=torch.uint8, **meta), shape=torch.Size((out_f, in_f)),
                            code=torch.empty(16, dtype=torch.float32, **meta), blocksize=blocksize,
                            quant_type=quant_type, dtype=dtype, offset=torch.empty((), dtype=torch.float32, **meta),
                            state2=state2)
    packed = torch.empty(((out_f * in_f + 1) // 2, 1), dtype=torch.uint8, **meta)
    bias = torch.empty(out_f, dtype=dtype, **meta) if linear.bias is not None else None
    return Linear4bit(packed, state, bias=bias, compute_dtype=compute_dtype)


def local_rows(target: torch.Tensor) -> slice:
    """The rows of dim 0 this process holds of `target`: FSDP's split into equal chunks, the last shorter."""
    if not isinstance(target, DTensor) or target.dim() == 0:
        return slice(None)
    rank, n = target.device_mesh.get_local_rank(), target.device_mesh.size()
    rows = -(-target.shape[0] // n)
    return slice(min(rank * rows, target.shape[0]), min((rank + 1) * rows, target.shape[0]))


@torch.no_grad()
def fill_shard(target: torch.Tensor, full: torch.Tensor, name: str, rows_only: bool = False) -> None:
    """Copy this process's rows of `full` into `target` (a sharded DTensor, or a plain tensor held whole).

    rows_only: `full` already holds just this process's rows (read as a slice of the file).
    """
    shape = tuple(target.shape[1:] if rows_only else target.shape)
    if tuple(full.shape[1:] if rows_only else full.shape) != shape:
        raise ValueError(f"{name}: the checkpoint holds shape {tuple(full.shape)}, the model expects {tuple(target.shape)}")
    if not isinstance(target, DTensor):
        target.copy_(full)
        return
    local = target.to_local()
    piece = full if rows_only else full[local_rows(target)]
    if tuple(local.shape) != tuple(piece.shape):
        raise ValueError(f"{name}: this process's shard has shape {tuple(local.shape)}, the rows read {tuple(piece.shape)}")
    local.copy_(piece)


def _fill_linear4bit(m: Linear4bit, weight: torch.Tensor, bias: torch.Tensor | None, name: str) -> None:
    """Quantize the full weight (blocks of 64 need it whole) and keep this process's rows of each piece."""
    packed, state = bnbF.quantize_4bit(weight.contiguous(), blocksize=m.blocksize, compress_statistics=True,
                                       quant_type=m.quant_type)
    fill_shard(m.weight, packed, name)
    fill_shard(m.absmax, state.absmax, name + ".absmax")
    fill_shard(m.nested_absmax, state.state2.absmax, name + ".nested_absmax")
    fill_shard(m.quant_map, state.code, name + ".quant_map")
    fill_shard(m.nested_quant_map, state.state2.code, name + ".nested_quant_map")
    fill_shard(m.offset, state.offset.reshape(()), name + ".offset")
    decoded = bnbF.dequantize_blockwise(state.absmax, state.state2) + state.offset  # as Linear4bit decodes them
    fill_shard(m.decoded_absmax, decoded, name + ".decoded_absmax")
    if bias is not None:
        fill_shard(m.bias, bias, name + ".bias")


def load_sharded(path: str, lora_config: LoRAConfig, quant: str | None = "nf4", dtype: torch.dtype = torch.float32,
                 compute_dtype: torch.dtype | None = None, device: str = "cpu"):
    """(model, tokenizer): the checkpoint at `path` with LoRA applied, sharded over the torchrun processes."""
    ctx = setup_distributed(device)
    if not ctx.enabled:
        raise ValueError("load_sharded splits the model across processes: launch with `torchrun --nproc-per-node N`")
    # A gloo group still alive when the interpreter tears down can abort the process ("terminate called
    # without an active exception", pytorch/pytorch#190489): the group made here is destroyed at exit,
    # while the interpreter is whole, unless the caller destroyed it first.
    atexit.register(teardown_distributed, ctx)
    checkpoint = open_checkpoint(path)
    config = checkpoint.config
    with torch.device("meta"):
        model = Llama(config).to(dtype)
    expected = set(dict(model.named_parameters()))  # tied: the head is the embedding, listed once
    if quant is not None:
        for name, m in list(model.named_modules()):
            if isinstance(m, nn.Linear) and name != "lm_head":
                model.set_submodule(name, meta_linear4bit(m, quant, dtype, compute_dtype or dtype))
    apply_lora(model, lora_config)
    shard_model(model, init_device_mesh(torch.device(ctx.device).type, (ctx.world_size,)))
    model.to_empty(device=ctx.device)  # storage for this process's shards only

    pending: dict[str, dict[str, torch.Tensor]] = {}
    seen = set()
    for name, t, rows_only in _read_tensors(checkpoint, model):
        if config.tie_word_embeddings and name == "lm_head.weight":
            continue
        module_name, _, kind = name.rpartition(".")
        module = _owner(model, module_name)
        t = t.to(dtype)
        if isinstance(module, Linear4bit):
            parts = pending.setdefault(module_name, {})
            parts[kind] = t
            if "weight" in parts and (module.bias is None or "bias" in parts):
                parts = pending.pop(module_name)
                _fill_linear4bit(module, parts["weight"], parts.get("bias"), module_name)
        elif name in expected:
            fill_shard(getattr(module, kind), t, name, rows_only)
        else:
            raise ValueError(f"{path}: unexpected tensor {name!r} for a {config.model_type} model with this config")
        seen.add(name)
        del t
        release_freed_memory()
    missing = sorted(expected - seen)
    if pending or missing:
        raise ValueError(f"{path}: missing tensors {(missing + sorted(pending))[:8]}")
    model.model.rotary_emb._buffers["inv_freq"] = config.rope_inv_freq().to(ctx.device)
    _init_lora(model, lora_config)
    model.eval()  # as load_pretrained returns it; train() switches it back
    model.checkpoint = checkpoint
    return model, checkpoint.tokenizer


def _owner(model: nn.Module, module_name: str) -> nn.Module:
    module = model.get_submodule(module_name)
    return module.base_layer if hasattr(module, "base_layer") else module  # a LoRA wraps it


def _read_tensors(checkpoint, model: nn.Module):
    """(name, tensor, rows_only) one at a time. From safetensors files, a tensor that is not quantized is
    read as this process's rows only (the embedding need never be whole); a 4-bit weight is read whole,
    since its blocks and the nested absmax (centred on the mean of all blocks) need every value."""
    if checkpoint.kind == "gguf":  # its reader dequantizes whole tensors
        for name, t in checkpoint.tensors():
            yield name, t, False
        return
    from safetensors import safe_open

    for file in checkpoint.weight_files():
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                if name.endswith("rotary_emb.inv_freq"):
                    continue
                module_name, _, kind = name.rpartition(".")
                try:
                    target = getattr(_owner(model, module_name), kind)
                except AttributeError:
                    yield name, f.get_tensor(name), False  # the caller names the unexpected tensor
                    continue
                if isinstance(target, DTensor) and not isinstance(_owner(model, module_name), Linear4bit):
                    yield name, f.get_slice(name)[local_rows(target)], True
                else:
                    yield name, f.get_tensor(name), False


@torch.no_grad()
def _init_lora(model: nn.Module, config: LoRAConfig) -> None:
    """A ~ Kaiming-uniform(a=√5) from the seeded generator in `apply_lora`'s order, B = 0, each rank its rows."""
    generator = torch.Generator().manual_seed(config.seed) if config.seed is not None else None
    for name, m in lora_modules(model).items():
        A = torch.empty(m.r, m.in_features, dtype=torch.float32)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
        fill_shard(m.lora_A.weight, A, name + ".lora_A.weight")
        fill_shard(m.lora_B.weight, torch.zeros(m.out_features, m.r), name + ".lora_B.weight")
