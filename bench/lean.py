"""How lean is a training step? Ops dispatched and bytes saved for backward, ours against transformers + PEFT.

On a GPU every ATen op is a kernel launch, and a QLoRA step at the course's shape is bound by those
launches, by dequantizing the 4-bit weights and by memory traffic more than by its matrix products.
This benchmark counts them, device-independently, in one forward + loss + backward pass per side on
the same weights and the same batch (no optimizer step):

  * compute ops: ATen ops dispatched (seen by a `TorchDispatchMode`), other than views and metadata
    (`NOT_COMPUTE`: view, reshape aliases, t, transpose, permute, expand, slice, select, (un)squeeze,
    detach, alias, as_strided, split, unbind);
  * dequantization ops: those of the compute ops that dequantize NF4: bitsandbytes' dequantize ops
    and the double-quant arithmetic around them (the ops dispatched while a function whose name
    holds "dequantize" runs). bitsandbytes' fused 4-bit product (`gemm_4bit`) is a product, not
    counted here;
  * bytes saved for backward: every tensor autograd keeps for the backward pass passes through
    `torch.autograd.graph.saved_tensors_hooks`; each storage is counted once. Of these, the model's
    own weights (parameters and buffers, in memory anyway) are also shown apart.

fp32 by default. `--preset` counts both sides in the precision of the course preset
(`examples/pricer/recipe.py`, PRESETS["llama31-8b"] on a GPU): frozen weights in bf16, the NF4 base
computing in bf16, LoRA weights in fp32, the forward pass under bf16 autocast (ours as `train()` runs
it with `TrainConfig.autocast_dtype`, theirs with `BitsAndBytesConfig(bnb_4bit_compute_dtype=bf16)` as
`SFTTrainer(bf16=True)` runs it); here on the CPU, whose autocast casts to bf16 as CUDA's does.

Ops and bytes are also shown for one decoder layer (the last: unlike the first, its input needs a
gradient, as in every other layer), per token, and outside the decoder layers (embedding, final
norm, head, loss).

    python bench/lean.py                          # SmolLM2 NF4 at shapes (a) and (b); Llama-3.1-8B-shaped layers
    python bench/lean.py --shapes smollm2-b       # one of them
    python bench/lean.py --plain                  # ours on the plain autograd path (the reference)
    python bench/lean.py --preset                 # both sides in the course preset's precision (below)
    python bench/lean.py --top 15                 # also each side's most frequent ops
"""
from __future__ import annotations

import argparse
import collections
import os
import shutil
import sys
from dataclasses import dataclass, field

import common  # noqa: F401  (puts the repository root on sys.path)
import torch
from common import header, hf_folder_for_nf4, set_threads, table
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from train_step import IGNORE_INDEX, SHAPES, build_losses, make_batch, vocab_and_pad

NOT_COMPUTE = {  # views and metadata: no kernel, no memory traffic
    "view", "_unsafe_view", "_reshape_alias", "reshape", "view_as", "t", "t_", "transpose", "transpose_",
    "permute", "expand", "expand_as", "slice", "select", "narrow", "squeeze", "squeeze_", "unsqueeze",
    "unsqueeze_", "detach", "detach_", "alias", "as_strided", "as_strided_", "split", "split_with_sizes",
    "unsafe_split", "unsafe_split_with_sizes", "chunk", "unbind", "sym_size", "sym_stride", "sym_numel",
    "sym_storage_offset", "is_same_size", "size", "stride", "dim", "is_contiguous",
}


def op_name(func) -> str:
    """'aten::mm.default' -> 'mm'; a custom op keeps its namespace: 'bitsandbytes::dequantize_4bit'."""
    packet = func.overloadpacket
    ns = getattr(packet, "_qualified_op_name", str(packet)).split("::")[0]
    return packet.__name__ if ns == "aten" else f"{ns}::{packet.__name__}"


def in_dequantize() -> bool:
    """Whether a Python function whose name holds "dequantize" is on the stack (bitsandbytes'
    `dequantize_4bit` with its nested absmax, our `Linear4bit.dequantize`, ...)."""
    frame = sys._getframe(2)
    while frame is not None:
        if "dequantize" in frame.f_code.co_name:
            return True
        frame = frame.f_back
    return False


class Region:
    """Which part of the step is running: "last" in the last decoder layer (a typical one: unlike the
    first, its input needs a gradient), "layers" in the others, "rest" outside the decoder stack.

    Forward: module hooks on the first and the last layer. Backward: gradient hooks on the tensors
    that enter and leave those layers; each fires when its gradient is ready, that is when the
    backward pass of the layer it enters is done, or about to begin for the tensor it leaves.
    """

    def __init__(self, layers: nn.ModuleList):
        self.now = "rest"
        first, last = layers[0], layers[-1]
        self.handles = [last.register_forward_pre_hook(self._enter_last, with_kwargs=True),
                        last.register_forward_hook(self._leave_last, with_kwargs=True)]
        if first is not last:
            self.handles.insert(0, first.register_forward_pre_hook(self._enter_first, with_kwargs=True))

    def _watch(self, t, where: str) -> None:
        if isinstance(t, tuple):
            t = t[0]
        if t.requires_grad:
            t.register_hook(lambda g: self._set(where))

    def _enter_first(self, module, args, kwargs):
        self.now = "layers"
        self._watch(args[0] if args else next(iter(kwargs.values())), "rest")

    def _enter_last(self, module, args, kwargs):
        before = self.now
        self.now = "last"
        self._watch(args[0] if args else next(iter(kwargs.values())), before)

    def _leave_last(self, module, args, kwargs, out):
        self.now = "rest"
        self._watch(out, "last")

    def _set(self, where: str) -> None:
        self.now = where

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@dataclass
class Counts:
    ops: dict = field(default_factory=lambda: collections.Counter())        # region -> compute ops
    dequant: dict = field(default_factory=lambda: collections.Counter())    # region -> dequantization ops
    saved: dict = field(default_factory=lambda: collections.Counter())      # region -> bytes saved for backward
    weights_saved: int = 0                                                    # bytes of the model's own weights saved
    by_name: collections.Counter = field(default_factory=collections.Counter)


class CountOps(TorchDispatchMode):
    """Inside `with CountOps(counts, region):` every compute op (and each dequantization op) of the
    forward and the backward pass is added to `counts` under the region running. The autograd engine
    carries the mode to the thread that runs the backward pass."""

    def __init__(self, counts: Counts, region: Region | None = None):
        super().__init__()
        self.counts, self.region = counts, region

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = op_name(func)
        if name not in NOT_COMPUTE:
            where = self.region.now if self.region else "rest"
            self.counts.ops[where] += 1
            self.counts.by_name[name] += 1
            if "dequantize" in name or in_dequantize():
                self.counts.dequant[where] += 1
        return func(*args, **(kwargs or {}))


def count_saved(counts: Counts, region: Region | None, weights: set[int]):
    """saved_tensors_hooks that add each new storage's bytes to `counts.saved` (the model's own
    weights to `counts.weights_saved`) and keep the tensor as it is."""
    seen: dict[int, torch.UntypedStorage] = {}  # held until the end, so no address is reused meanwhile

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr and ptr not in seen:
            seen[ptr] = storage
            if ptr in weights:
                counts.weights_saved += storage.nbytes()
            else:
                counts.saved[region.now if region else "rest"] += storage.nbytes()
        return t

    return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The largest ModuleList whose name ends in "layers": the decoder stack, ours or transformers'."""
    lists = [m for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and n.endswith("layers")]
    if not lists:
        raise ValueError(f"{type(model).__name__}: no ModuleList named '...layers' (the decoder stack) found")
    return max(lists, key=len)


def count_step(model: nn.Module, loss_fn, input_ids: torch.Tensor, labels: torch.Tensor,
               by_layer: bool = True) -> Counts:
    """Count one forward + loss + backward pass of loss_fn(input_ids, labels)."""
    counts = Counts()
    region = Region(decoder_layers(model)) if by_layer else None
    weights = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    try:
        with CountOps(counts, region), count_saved(counts, region, weights):
            loss_fn(input_ids, labels).backward()
    finally:
        if region:
            region.remove()
    model.zero_grad(set_to_none=True)
    return counts


# ------------------------------------------------------------------------------------------ report
def mib(n: float) -> str:
    return f"{n / 2**20:,.1f}"


def report(counts: dict[str, Counts], tokens: int, top: int) -> str:
    rows = [["per step", *counts, "ours / theirs" if len(counts) == 2 else ""]]

    def row(label, values, fmt):
        ratio = f"{values[0] / values[1]:.2f}x" if len(values) == 2 and values[1] else ""
        rows.append([label, *(fmt(v) for v in values), ratio])

    c = list(counts.values())
    row("compute ops", [sum(x.ops.values()) for x in c], lambda v: f"{v:,}")
    row("  in one decoder layer", [x.ops["last"] for x in c], lambda v: f"{v:,}")
    row("dequantization ops", [sum(x.dequant.values()) for x in c], lambda v: f"{v:,}")
    row("  in one decoder layer", [x.dequant["last"] for x in c], lambda v: f"{v:,}")
    row("saved for backward, each storage once (MiB)", [sum(x.saved.values()) + x.weights_saved for x in c], mib)
    row("  activations of one decoder layer (MiB)", [x.saved["last"] for x in c], mib)
    row("    per token (KiB)", [x.saved["last"] / tokens for x in c], lambda v: f"{v / 1024:,.2f}")
    row("  activations outside the decoder layers (MiB)", [x.saved["rest"] for x in c], mib)
    row("  the model's own weights (MiB)", [x.weights_saved for x in c], mib)
    out = table(rows)
    if top:
        for side, x in counts.items():
            out += f"\n\n{side}'s {top} most frequent ops: " + ", ".join(f"{n} {k}" for n, k in x.by_name.most_common(top))
    return out


def measure(args, shape_name: str, device: str, dtype: torch.dtype) -> str:
    shape = SHAPES[shape_name]
    hf_dir = hf_folder_for_nf4(dtype) if "theirs" in args.sides and shape.model == "smollm2" else None
    try:
        sides = build_losses(args.sides, args, shape, device, dtype, hf_dir)
        vocab, pad = vocab_and_pad(args, shape)
        input_ids, labels = (t.to(device) for t in make_batch(shape, vocab, pad, args.seed))
        counts = {}
        for name, (model, loss) in sides.items():
            if name == "ours" and args.plain:
                model.set_handwritten_backward(False)
            loss(input_ids, labels).backward()  # warm-up: lazy initialisations are not the step's
            model.zero_grad(set_to_none=True)
            counts[name] = count_step(model, loss, input_ids, labels)
        layers = len(decoder_layers(next(iter(sides.values()))[0]))
        del sides
    finally:
        if hf_dir:
            shutil.rmtree(hf_dir, ignore_errors=True)
    B, T = input_ids.shape
    answer = int((labels[:, 1:] != IGNORE_INDEX).sum())
    what = ("SmolLM2-135M, NF4 (double quant)" if shape.model == "smollm2" else
            f"Llama-3.1-8B-shaped, {layers} decoder layers (the second is the one shown), random weights, "
            f"NF4 (double quant), vocabulary cut to {vocab:,}")
    precision = ("the course preset's precision (bf16 frozen weights, NF4 computing in bf16, fp32 LoRA, "
                 "bf16 autocast on both sides)" if dtype == torch.bfloat16 else "float32")
    lines = [f"### {shape_name}: {what}, {precision}",
             f"batch {B} x {T} tokens ({answer} labelled), LoRA r={shape.r} alpha={shape.alpha} on "
             f"{', '.join(shape.targets)}; ours on the {'plain autograd' if args.plain else 'default (hand-written)'} path; "
             "one forward + loss + backward pass, no checkpointing", "",
             report(counts, B * T, args.top)]
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="smollm2-a,smollm2-b,llama31-8b", help="comma-separated (default: all three)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="compute dtype (default float32); bfloat16 is the course preset's precision, as --preset")
    p.add_argument("--preset", action="store_true",
                   help="the course preset's precision: bf16 frozen weights and NF4 compute, fp32 LoRA, bf16 autocast")
    p.add_argument("--sides", default="ours,theirs", help="which sides to count (default ours,theirs)")
    p.add_argument("--plain", action="store_true", help="ours on the plain autograd path (set_handwritten_backward(False))")
    p.add_argument("--top", type=int, default=0, help="also list each side's N most frequent ops")
    p.add_argument("--vocab", type=int, default=8192,
                   help="llama31-8b: vocabulary of the random model (default 8192; the head is not a decoder layer)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu): the same code, though SDPA and "
                   "dropout dispatch other kernels on a GPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = p.parse_args(argv)
    args.shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    for s in args.shapes:
        if s not in ("smollm2-a", "smollm2-b", "llama31-8b"):
            p.error(f"--shapes {s}: expected smollm2-a, smollm2-b or llama31-8b")
    args.sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    if not args.sides or any(s not in ("ours", "theirs") for s in args.sides):
        p.error(f"--sides {args.sides}: expected ours, theirs or both")
    if args.preset:
        args.dtype = "bfloat16"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no GPU here")
    # what train_step's model builders read: NF4 bases; full-width Llama-3.1-8B layers, two of them
    # so that the one shown has an input that needs a gradient, as in layers 1 to 31 of the real model
    args.quant, args.layers, args.shrink, args.compile, args.offload = "nf4", 2, 1, False, False
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    set_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    print(header("Lean step: ops and saved bytes, ours vs transformers + PEFT", args.device,
                 [os.path.abspath(__file__)] + sys.argv[1:]), flush=True)
    for name in args.shapes:
        print("\n" + measure(args, name, args.device, dtype), flush=True)


if __name__ == "__main__":
    main()
