"""The memory model (train/memory.py) against the measured peak of a training step on a packed long row, CPU.

Each step runs in a fresh process: a SmolLM2-shaped model (bench/long_rows.py's body with its 49,152-token
head, untied; seeded random weights, NF4 with double quantization computing in fp32, LoRA r 8 on q, k, v, o),
AdamW, one warm-up step on a short row (so the optimizer's moments exist), then the measured step: a row of
T tokens in n documents, every token labelled (the fused head at every position), forward, loss, backward,
AdamW step. Measured: the peak resident set (VmHWM, reset just before the step) above the resident set
before it, with glibc's mmap threshold fixed at 64 KiB (MALLOC_MMAP_THRESHOLD_), so every large tensor is
its own mapping, returned when freed, and the peak follows the tensors alive. Predicted:
`train.memory.step_peak_bytes` for the same shape, the growth of a step on top of the weights and the
optimizer.

    python bench/long_memory.py                                   # 32,768 tokens in 8 documents, 4 layers
    python bench/long_memory.py --tokens 8192 --layers 2          # a quick look
"""
from __future__ import annotations

import argparse
import os
import sys

import common  # noqa: F401  (puts the repository root on sys.path)
import torch
from common import emit_probe_result, header, reset_peak_rss, rss_mb, peak_rss_mb, run_probe, set_threads, table
from long_rows import SMOLLM2_BODY, TARGETS
from random_llama import RandomOurs, random_tensors

MODES = {"none": False, "offload": "offload"}


def probe(args) -> None:
    """In this fresh process: build, warm up, measure one step; print the result for the parent."""
    from lora import LoRAConfig, apply_lora
    from train import answer_loss

    set_threads(1)
    cfg = dict(SMOLLM2_BODY, num_hidden_layers=args.layers)
    build = RandomOurs(cfg, "cpu", torch.float32)
    for layer, named in random_tensors(cfg, 0, "cpu", torch.float32):
        build.add(layer, named)
    model = build.finish()
    apply_lora(model, LoRAConfig(r=8, alpha=16, dropout=0.0, target_modules=TARGETS))
    model.set_gradient_checkpointing(MODES[args.probe])
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step(T: int, n: int) -> None:
        ids = torch.randint(100, cfg["vocab_size"], (1, T), generator=torch.Generator().manual_seed(T))
        pos = torch.arange(T // n).repeat(n)[None]
        answer_loss(model, ids, ids, reduction="sum", position_ids=pos).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(512, 4)
    reset_peak_rss()
    before = rss_mb()
    step(args.tokens, args.docs)
    emit_probe_result({"peak_mib": peak_rss_mb() - before})


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=32768, help="tokens of the row (32768)")
    ap.add_argument("--docs", type=int, default=8, help="documents packed in it (8)")
    ap.add_argument("--layers", type=int, default=4, help="decoder layers (4)")
    ap.add_argument("--probe", choices=list(MODES), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.probe:
        return probe(args)
    set_threads(1)  # as the probes run
    from model import LlamaConfig
    from train.memory import Shape, step_peak_bytes

    shape = Shape.of(LlamaConfig.from_hf(dict(SMOLLM2_BODY, num_hidden_layers=args.layers)))
    rows = [["checkpointing", "measured MiB", "predicted MiB", "predicted / measured", "of which activations MiB"]]
    for mode, ckpt in MODES.items():
        flags = ["--tokens", str(args.tokens), "--docs", str(args.docs), "--layers", str(args.layers), "--probe", mode]
        measured = run_probe(os.path.abspath(__file__), flags, env={"MALLOC_MMAP_THRESHOLD_": "65536"})["peak_mib"]
        parts = step_peak_bytes(shape, seq=args.tokens, r=8, targets=TARGETS, checkpointing=ckpt, act_bytes=4,
                                answer_tokens=args.tokens - args.docs)
        predicted = sum(parts.values()) / 2**20  # on a CPU the offloaded inputs are in the same memory
        rows.append([mode, f"{measured:,.0f}", f"{predicted:,.0f}", f"{predicted / measured:.3f}",
                     f"{parts['activations'] / 2**20:,.0f}"])
        print(f"{mode}: measured {measured:,.0f} MiB, predicted {predicted:,.0f} MiB  {parts}", file=sys.stderr, flush=True)
    print("\n".join([header("Memory model against a packed long row's measured peak", "cpu",
                            sys.argv if argv is None else [sys.argv[0], *argv]),
                     f"SmolLM2-shaped, {args.layers} layers, 49,152-token head; NF4 fp32 compute, LoRA r 8 on q, k, v, o; "
                     f"a row of {args.tokens:,} tokens in {args.docs} documents, every token labelled; forward, loss, "
                     "backward, AdamW step; peak RSS above the RSS before the step (MALLOC_MMAP_THRESHOLD_=65536).",
                     "", table(rows)]))


if __name__ == "__main__":
    main()
