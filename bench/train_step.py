"""Training-step speed and memory: this library against transformers + PEFT (+ bitsandbytes), side by side.

A training step is the course's four steps on one mini-batch: forward, loss, backward, AdamW step.
Both sides train the same weights on the same batch with the same LoRA (r, alpha, dropout 0, q, k,
v, o projections) and the same optimizer; theirs is written as a course user writes it:
`model(input_ids, labels=labels).loss`. Steps are timed after warm-up, alternating the two sides in
rounds, in one process; peak memory is measured per side in a fresh subprocess.

    python bench/train_step.py --shape smollm2-a --quant none      # SmolLM2-135M, 8 x 64, every token labelled
    python bench/train_step.py --shape smollm2-b --quant nf4       # 8 prompts of ~60 tokens, 4-token answers
    python bench/train_step.py --all                                # the four CPU combinations
    python bench/train_step.py --shape llama31-8b --device cuda    # Llama-3.1-8B-shaped, random weights, NF4
    python bench/train_step.py --shape llama31-8b --layers 1 --shrink 8    # the same code path, CPU-sized
    python bench/train_step.py --shape llama31-8b-2k --device cuda --offload   # 2 x 2048, r=16 on all seven projections
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
from dataclasses import dataclass, replace
from typing import Callable

import common  # noqa: F401  (puts the repository root on sys.path)
import torch
from common import (alternate_rounds, emit_probe_result, header, hf_folder_for_nf4, load_theirs, median, now_mb, peak_mb, reset_peak,
                    run_probe, set_threads, smollm2_gguf, table)
from floor import matmul_floor
from random_llama import build_random, llama_config, parameter_count
from torch import nn

H100_BF16_FLOPS = 790e12   # measured dense bf16 matmul throughput of an H100, the MFU denominator
IGNORE_INDEX = -100


@dataclass(frozen=True)
class Shape:
    """What one benchmark trains: which model, which batch, which LoRA."""

    name: str
    model: str                    # "smollm2" (the embedded GGUF) or "llama31-8b" (random weights)
    batch: int
    prompt: int                   # tokens per row before the answer (all of them when labels == "all")
    answer: int                   # answer tokens per row (labels kept only there when labels == "answer")
    spread: int                   # prompt lengths vary by up to +-spread tokens; rows are right-padded
    labels: str                   # "all" or "answer"
    r: int
    alpha: int
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")


SHAPES = {
    "smollm2-a": Shape("smollm2-a", "smollm2", batch=8, prompt=64, answer=0, spread=0, labels="all", r=8, alpha=16),
    "smollm2-b": Shape("smollm2-b", "smollm2", batch=8, prompt=60, answer=4, spread=4, labels="answer", r=8, alpha=16),
    # The course's QLoRA run: Llama-3.1-8B in NF4, r=32, alpha=64, sequences of 182 tokens, batch 4,
    # the loss on the price tokens at the end of each sequence.
    "llama31-8b": Shape("llama31-8b", "llama31-8b", batch=4, prompt=178, answer=4, spread=0, labels="answer",
                        r=32, alpha=64),
    # Long sequences: 2 x 2048 tokens, every one labelled, LoRA r=16 on all seven projections; with
    # --offload, each layer's input waits in host memory and the layer is recomputed in backward.
    "llama31-8b-2k": Shape("llama31-8b-2k", "llama31-8b", batch=2, prompt=2048, answer=0, spread=0, labels="all",
                           r=16, alpha=32, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                    "down_proj")),
}

# ----------------------------------------------------------------------------------------- the batch
def make_batch(shape: Shape, vocab: int, pad_id: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token ids of the shape's lengths -> input_ids, labels (B, T), right-padded.

    The step's cost depends on the lengths and on which positions carry a label, not on which
    tokens they are. Right padding keeps every real token's causal context free of padding, so
    neither side needs an attention mask (labels are -100 on padding).
    """
    g = torch.Generator().manual_seed(seed)
    low = min(100, vocab // 2)  # keep clear of the special tokens at the start of the vocabulary
    lens = [shape.prompt + int(d) for d in torch.randint(-shape.spread, shape.spread + 1, (shape.batch,), generator=g)]
    T = max(lens) + shape.answer
    input_ids = torch.full((shape.batch, T), pad_id, dtype=torch.long)
    labels = torch.full((shape.batch, T), IGNORE_INDEX, dtype=torch.long)
    for b, p in enumerate(lens):
        row = torch.randint(low, vocab, (p + shape.answer,), generator=g)
        input_ids[b, : len(row)] = row
        if shape.labels == "all":
            labels[b, : len(row)] = row
        else:
            labels[b, p : len(row)] = row[p:]
    return input_ids, labels


# -------------------------------------------------------------------------------------------- sides
# A side is its training step: step(input_ids, labels) -> the loss (detached); the model lives in its closure
Side = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# A loss is the forward pass and the loss of one batch: loss(input_ids, labels) -> a scalar with a graph
Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def adamw(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)


def ours_loss(args, shape: Shape, device: str, dtype: torch.dtype, base: nn.Module | None) -> tuple[nn.Module, Loss]:
    """Our library as its user writes it: load (quantizing as it reads), apply_lora, answer_loss."""
    from lora import LoRAConfig, apply_lora
    from model import load_pretrained
    from train import answer_loss

    if base is None:
        base, _ = load_pretrained(smollm2_gguf(), dtype=dtype, device=device, quant=None if args.quant == "none" else "nf4")
    model = base
    apply_lora(model, LoRAConfig(r=shape.r, alpha=shape.alpha, dropout=0.0, target_modules=shape.targets))
    if getattr(args, "offload", False):
        model.set_gradient_checkpointing("offload")  # keep each layer's input on the host, recompute the rest
    if getattr(args, "compile", False):
        model.compile_layers()  # torch.compile each decoder layer; the first steps pay for compiling
    model.train()
    # In bf16 the course preset's precision, as train() runs it (TrainConfig.autocast_dtype): a bf16 model,
    # the NF4 base computing in bf16, LoRA weights in fp32, the forward pass under bf16 autocast
    autocast = (torch.autocast(torch.device(device).type, dtype=dtype) if dtype != torch.float32
                else contextlib.nullcontext())

    def loss(input_ids, labels):
        with autocast:
            return answer_loss(model, input_ids, labels)

    return model, loss


def theirs_loss(args, shape: Shape, device: str, dtype: torch.dtype, base: nn.Module | None,
                hf_dir: str | None) -> tuple[nn.Module, Loss]:
    """transformers + PEFT (+ bitsandbytes) as the course uses them: from_pretrained with a
    BitsAndBytesConfig, get_peft_model, `model(input_ids, labels=labels).loss`."""
    from peft import LoraConfig, get_peft_model

    model = base if base is not None else load_theirs(args.quant, dtype, device, hf_dir)
    model.config.use_cache = False  # a training step keeps no KV cache
    lora = LoraConfig(r=shape.r, lora_alpha=shape.alpha, lora_dropout=0.0, target_modules=list(shape.targets),
                      bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    if getattr(args, "offload", False):  # transformers' own checkpointing: each layer recomputed in backward
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    # The course trains with SFTTrainer(bf16=True), which runs the forward pass under autocast; PEFT keeps
    # LoRA weights in fp32 and would otherwise run the low-rank path in fp32.
    autocast = (torch.autocast(torch.device(device).type, dtype=dtype) if dtype != torch.float32
                else contextlib.nullcontext())

    def loss(input_ids, labels):
        with autocast:
            return model(input_ids=input_ids, labels=labels).loss

    return model, loss


def with_adamw(model: nn.Module, loss: Loss, lr: float) -> Side:
    """The training step around a loss: backward, AdamW step, gradients cleared."""
    opt = adamw(model, lr)

    def step(input_ids, labels):
        value = loss(input_ids, labels)
        value.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return value.detach()

    return step


def build_losses(names: list[str], args, shape: Shape, device: str, dtype: torch.dtype,
                 hf_dir: str | None) -> dict[str, tuple[nn.Module, Loss]]:
    """{side: (model, loss function)} on the same weights: the SmolLM2 GGUF, or one random model per side."""
    bases = build_random(args, names, device, dtype) if shape.model != "smollm2" else {}
    make = {"ours": lambda b: ours_loss(args, shape, device, dtype, b),
            "theirs": lambda b: theirs_loss(args, shape, device, dtype, b, hf_dir)}
    return {n: make[n](bases.pop(n, None)) for n in names}


def build_sides(names: list[str], args, shape: Shape, device: str, dtype: torch.dtype, hf_dir: str | None) -> dict[str, Side]:
    return {n: with_adamw(model, loss, args.lr) for n, (model, loss) in build_losses(names, args, shape, device, dtype, hf_dir).items()}


def vocab_and_pad(args, shape: Shape) -> tuple[int, int]:
    if shape.model == "smollm2":
        from model import read_config

        config = read_config(smollm2_gguf())
        return config.vocab_size, config.pad_token_id if config.pad_token_id is not None else 0
    return llama_config(args)["vocab_size"], 0


# ------------------------------------------------------------------------------------------ measuring
def probe(args, shape: Shape, device: str, dtype: torch.dtype) -> None:
    """In a fresh process: build one side, run warm-up plus a few steps, report its peak memory."""
    if args.probe == "ours":
        import lora, model, quant, train  # noqa: F401,E401
    else:
        import bitsandbytes, peft, transformers  # noqa: F401,E401
    baseline = now_mb(device)  # the interpreter, torch and this side's libraries, before any weights
    side = build_sides([args.probe], args, shape, device, dtype, args.hf_dir)[args.probe]
    input_ids, labels = (t.to(device) for t in make_batch(shape, *vocab_and_pad(args, shape), args.seed))
    built_peak, built_now = peak_mb(device), now_mb(device)
    reset_peak(device)
    for _ in range(args.warmup + args.memory_steps):
        side(input_ids, labels)
    steps_peak = peak_mb(device)
    emit_probe_result({"baseline_mb": baseline, "built_mb": built_now, "steps_peak_mb": steps_peak,
                       "process_peak_mb": max(built_peak, steps_peak)})


def measure(args, shape: Shape, device: str, dtype: torch.dtype) -> str:
    """Time both sides in this process (alternating rounds), probe each side's memory; a Markdown block."""
    hf_dir = hf_folder_for_nf4(dtype) if "theirs" in args.sides and shape.model == "smollm2" and args.quant == "nf4" else None
    try:
        sides = build_sides(args.sides, args, shape, device, dtype, hf_dir)
        input_ids, labels = (t.to(device) for t in make_batch(shape, *vocab_and_pad(args, shape), args.seed))
        first_loss = {n: s(input_ids, labels).item() for n, s in sides.items()}  # same weights: same loss
        for _ in range(args.warmup - 1):
            for s in sides.values():
                s(input_ids, labels)
        times = alternate_rounds(sides, lambda s: s(input_ids, labels), args.rounds, args.steps, device)
        floor = None
        if "ours" in sides and not args.compile:  # the same GEMMs either way; recording needs eager mode
            floor = matmul_floor(lambda: sides["ours"](input_ids, labels), device)
        del sides
        memory = {}
        if not args.no_memory:
            for n in args.sides:
                argv = [a for a in sys.argv[1:] if a != "--all"] + ["--probe", n, "--shape", shape.name, "--quant", args.quant]
                memory[n] = run_probe(os.path.abspath(__file__), argv + (["--hf-dir", hf_dir] if hf_dir else []))
    finally:
        if hf_dir:
            shutil.rmtree(hf_dir, ignore_errors=True)

    B, T = input_ids.shape
    tokens, answer_tokens = B * T, int((labels[:, 1:] != IGNORE_INDEX).sum())
    N = parameter_count(llama_config(args)) if shape.model != "smollm2" else None
    label = {"ours": "ours, compiled layers" if args.compile else "ours", "theirs": "transformers + PEFT"}
    if args.offload:
        label = {"ours": label["ours"] + ", offloaded checkpointing", "theirs": "transformers + PEFT, gradient checkpointing"}
    rows = [["side", "ms/step (median)", "tokens/s", "peak memory in steps (MiB)", "peak memory, whole process (MiB)",
             "first loss"] + (["MFU"] if device.startswith("cuda") else [])]
    stats = {}
    for n in args.sides:
        ms = median(times[n]) * 1e3
        tps = tokens / (ms / 1e3)
        mem = memory.get(n, {})
        stats[n] = (tps, mem.get("steps_peak_mb"), mem.get("process_peak_mb"))
        row = [label[n], f"{ms:.1f}", f"{tps:,.0f}", f"{mem['steps_peak_mb']:,.0f}" if mem else "-",
               f"{mem['process_peak_mb']:,.0f}" if mem else "-", f"{first_loss[n]:.4f}"]
        if device.startswith("cuda"):
            row.append(f"{tps * 4 * N / H100_BF16_FLOPS:.1%}")
        rows.append(row)
    quant = "NF4 (double quant)" if args.quant == "nf4" else "none"
    lines = [f"### {shape.name}, quant {quant}, {str(dtype).replace('torch.', '')} compute",
             f"batch {B} x {T} tokens ({tokens} positions, {answer_tokens} labelled), LoRA r={shape.r} alpha={shape.alpha} "
             f"dropout 0 on {', '.join(shape.targets)}, AdamW lr {args.lr}; warm-up {args.warmup}, then "
             f"{args.rounds} rounds x {args.steps} steps per side, alternating"
             + ("; the course preset's precision: both sides under torch.autocast (ours as train() runs the preset, "
                "theirs as SFTTrainer(bf16=True) runs it), LoRA weights in fp32" if dtype != torch.float32 else ""),
             "", table(rows), ""]
    if N:
        lines.insert(2, f"N = {N:,} parameters; MFU = tokens/s x 4N / {H100_BF16_FLOPS / 1e12:.0f} TFLOP/s")
    if memory and device.startswith("cuda"):
        lines.append("allocated after building (weights, LoRA): "
                     + ", ".join(f"{label[n]} {memory[n]['built_mb']:,.0f} MiB" for n in args.sides))
    elif memory:
        lines.append("resident before loading (Python, torch and the side's libraries): "
                     + ", ".join(f"{label[n]} {memory[n]['baseline_mb']:,.0f} MiB" for n in args.sides)
                     + "; resident after building: "
                     + ", ".join(f"{label[n]} {memory[n]['built_mb']:,.0f} MiB" for n in args.sides))
    if floor:
        seconds, count, gflop = floor
        lines.append(f"matmul floor: ours' {count} matrix products ({gflop:.0f} GFLOP) replayed alone take {seconds * 1e3:.1f} ms "
                     f"({gflop / seconds:.0f} GFLOP/s)"
                     + (f"; theirs' step / floor = {median(times['theirs']) / seconds:.2f}x, the most any library doing "
                        "these products could gain over theirs" if "theirs" in times else ""))
    if len(stats) == 2:
        (t_o, m_o, p_o), (t_t, m_t, p_t) = stats["ours"], stats["theirs"]
        ratio = f"ratio ours/theirs: tokens/s {t_o / t_t:.2f}x"
        if m_o and m_t:
            ratio += f", peak memory in steps {m_o / m_t:.2f}x, whole process {p_o / p_t:.2f}x"
        lines.append(ratio)
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-a", help="what to train (default smollm2-a)")
    p.add_argument("--quant", choices=("none", "nf4"), default="none", help="base weights in NF4 or not (llama31-8b: always nf4)")
    p.add_argument("--all", action="store_true", help="the four CPU runs: smollm2-a and smollm2-b, each with --quant none and nf4")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), help="compute dtype (default: float32 on cpu, bfloat16 on cuda)")
    p.add_argument("--warmup", type=int, help="untimed steps per side first (default 2 on cpu, 3 on cuda)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds; the side that goes first alternates (default 3)")
    p.add_argument("--steps", type=int, help="timed steps per side per round (default 2 on cpu, 5 on cuda)")
    p.add_argument("--compile", action="store_true", help="ours: torch.compile each decoder layer (Llama.compile_layers)")
    p.add_argument("--offload", action="store_true",
                   help="ours: grad checkpointing with each layer's input offloaded to the host; theirs: "
                        "transformers' gradient checkpointing (it has no offload)")
    p.add_argument("--memory-steps", type=int, default=2, help="steps after warm-up in each memory probe (default 2)")
    p.add_argument("--no-memory", action="store_true", help="skip the per-side memory probes")
    p.add_argument("--sides", default="ours,theirs", help="which sides to run (default ours,theirs)")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate of both sides (default 1e-4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the batch and the random weights (default 0)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's, one per core)")
    p.add_argument("--layers", type=int, help="llama31-8b: this many decoder layers instead of 32")
    p.add_argument("--shrink", type=int, default=1, help="llama31-8b: divide hidden, heads, MLP and vocabulary by this (1, 2, 4, 8)")
    p.add_argument("--labels", choices=("all", "answer"), help="override the shape's labelled positions")
    p.add_argument("--probe", choices=("ours", "theirs"), help=argparse.SUPPRESS)   # internal: one side's memory
    p.add_argument("--hf-dir", help=argparse.SUPPRESS)                              # internal: theirs' NF4 folder
    args = p.parse_args(argv)
    args.sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    if not args.sides or any(s not in ("ours", "theirs") for s in args.sides):
        p.error(f"--sides {args.sides}: expected ours, theirs or both")
    gpu = args.device.startswith("cuda")
    args.warmup = args.warmup if args.warmup is not None else (3 if gpu else 2)
    args.steps = args.steps if args.steps is not None else (5 if gpu else 2)
    if args.warmup < 1 or args.rounds < 1 or args.steps < 1:
        p.error("--warmup, --rounds and --steps must be at least 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no GPU here")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    set_threads(args.threads)
    device = args.device
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    if args.all:
        runs = [(s, q) for s in ("smollm2-a", "smollm2-b") for q in ("none", "nf4")]
    else:
        runs = [(args.shape, "nf4" if args.shape.startswith("llama31-8b") else args.quant)]
    if args.probe:
        shape = SHAPES[args.shape]
        probe(args, replace(shape, labels=args.labels) if args.labels else shape, device, dtype)
        return
    print(header("Training step: ours vs transformers + PEFT", device, [os.path.abspath(__file__)] + sys.argv[1:]), flush=True)
    for name, quant in runs:
        args.quant = quant
        shape = replace(SHAPES[name], labels=args.labels) if args.labels else SHAPES[name]
        print("\n" + measure(args, shape, device, dtype), flush=True)


if __name__ == "__main__":
    main()
