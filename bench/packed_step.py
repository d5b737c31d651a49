"""Packed long rows on the course's 8B shape: tokens/s and peak memory, ours against transformers + PEFT's
padding-free path, in one short run (the GPU check of model/attention.py's per-document kernels).

Both sides hold the same seeded random Llama-3.1-8B-shaped weights in NF4 (bench/random_llama.py), LoRA
r 16 on all seven projections, AdamW, the course preset's precision on a GPU (bf16, the forward pass under
autocast). A batch is 2 rows of 8,192 tokens, each row 4 documents of 2,048 (position ids restarting at 0,
transformers' padding-free convention, no attention mask), every token labelled but each document's first
(which no token of the row may predict). Sides:

  * ours: `answer_loss(..., position_ids=...)`, gradient checkpointing; each document attends to itself
    through flash attention's variable-length kernel on a GPU (DocumentAttention on the CPU);
  * ours, offload: the same with each layer's input in host memory (`set_gradient_checkpointing("offload")`);
  * transformers + PEFT: `model(input_ids, labels, position_ids).loss` with its gradient checkpointing; its
    SDPA attention finds the documents from the position ids and builds their block-diagonal mask.

Steps alternate between the sides in rounds after a warm-up; tokens/s from the median step. Peak memory of a
step: torch.cuda.max_memory_allocated over the step (RSS on the CPU) above what was allocated before it.

    python bench/packed_step.py --device cuda                                     # the GPU check
    python bench/packed_step.py --device cpu --layers 1 --shrink 8 --tokens 1024  # the same code path, CPU-sized
"""
from __future__ import annotations

import argparse
import contextlib
import sys

import common  # noqa: F401  (puts the repository root on sys.path)
import torch
from common import alternate_rounds, header, median, now_mb, peak_mb, reset_peak, set_threads, table
from random_llama import build_random

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def packed_batch(rows: int, tokens: int, docs: int, vocab: int, device: str):
    """input_ids, labels and position_ids (rows, tokens): `docs` documents a row, labels -100 on each one's first."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(min(100, vocab // 2), vocab, (rows, tokens), generator=g)
    pos = torch.arange(tokens // docs).repeat(docs).expand(rows, tokens).contiguous()
    labels = ids.masked_fill(pos == 0, -100)
    return ids.to(device), labels.to(device), pos.to(device)


def sides(args, device: str, dtype: torch.dtype) -> dict:
    """{side: step(ids, labels, pos) -> loss}: forward, loss, backward, AdamW step, on one shared set of weights."""
    from peft import LoraConfig, get_peft_model

    from lora import LoRAConfig, apply_lora
    from train import answer_loss

    models = build_random(args, ["ours", "theirs"], device, dtype)
    ours = models["ours"]
    apply_lora(ours, LoRAConfig(r=16, alpha=32, dropout=0.0, target_modules=ALL))
    theirs = models["theirs"]
    theirs.config.use_cache = False
    theirs = get_peft_model(theirs, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=list(ALL),
                                               bias="none", task_type="CAUSAL_LM"))
    theirs.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    autocast = (lambda: torch.autocast(torch.device(device).type, dtype=dtype)) if dtype != torch.float32 \
        else contextlib.nullcontext

    def stepper(model, loss_of, checkpointing=None):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step(ids, labels, pos):
            if checkpointing is not None:
                model.set_gradient_checkpointing(checkpointing)
            with autocast():
                loss = loss_of(ids, labels, pos)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()
        model.train()
        return step

    return {"ours": stepper(ours, lambda i, l, p: answer_loss(ours, i, l, position_ids=p), True),
            "ours, offload": stepper(ours, lambda i, l, p: answer_loss(ours, i, l, position_ids=p), "offload"),
            "transformers + PEFT": stepper(theirs, lambda i, l, p: theirs(input_ids=i, labels=l, position_ids=p).loss)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda or cpu (cuda)")
    p.add_argument("--rows", type=int, default=2, help="rows a batch (2)")
    p.add_argument("--tokens", type=int, default=8192, help="tokens a row (8192)")
    p.add_argument("--docs", type=int, default=4, help="documents a row (4)")
    p.add_argument("--rounds", type=int, default=2, help="timed rounds, one step a side each (2)")
    p.add_argument("--layers", type=int, help="decoder layers instead of 32")
    p.add_argument("--shrink", type=int, default=1, help="divide hidden, heads, MLP and vocabulary by this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    set_threads(args.threads)
    device = args.device
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    steps = sides(args, device, dtype)
    from random_llama import llama_config

    vocab = llama_config(args)["vocab_size"]
    ids, labels, pos = packed_batch(args.rows, args.tokens, args.docs, vocab, device)
    first, memory = {}, {}
    for name, step in steps.items():  # warm-up step, measured for memory
        before = now_mb(device)
        reset_peak(device)
        first[name] = step(ids, labels, pos).item()
        memory[name] = peak_mb(device) - before
    times = alternate_rounds(steps, lambda s: s(ids, labels, pos), args.rounds, 1, device)
    n = args.rows * args.tokens
    rows = [["side", "ms/step (median)", "tokens/s", "peak memory of a step above the weights (MiB)", "first loss"]]
    for name in steps:
        ms = median(times[name]) * 1e3
        loss = f"{first[name]:.4f}" if name != "ours, offload" else "(after ours' step)"  # same weights as ours
        rows.append([name, f"{ms:,.0f}", f"{n / ms * 1e3:,.0f}", f"{memory[name]:,.0f}", loss])
    o, t = median(times["ours"]), median(times["transformers + PEFT"])
    print("\n".join([header("Packed long rows: ours against transformers + PEFT's padding-free path", device,
                            sys.argv if argv is None else [sys.argv[0], *argv]),
                     f"{args.rows} rows x {args.tokens:,} tokens, {args.docs} documents a row; Llama-3.1-8B shape"
                     f"{f', {args.layers} decoder layers' if args.layers else ''}{f', widths / {args.shrink}' if args.shrink > 1 else ''}, "
                     f"random weights in NF4, LoRA r 16 on all seven projections, {str(dtype)[6:]}", "", table(rows), "",
                     f"ours / theirs: tokens/s {t / o:.2f}x, peak memory of a step "
                     f"{memory['ours'] / memory['transformers + PEFT']:.2f}x (offload "
                     f"{memory['ours, offload'] / memory['transformers + PEFT']:.2f}x)"]))


if __name__ == "__main__":
    main()
