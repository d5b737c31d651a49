"""Training tokens per second with packing against padded batches, on chat conversations of mixed lengths.

The same examples train on three sides, in one process, alternating in rounds: padded batches in
random order (the default), padded batches grouped by length (`group_by_length`), and packed rows
(`TrainConfig(packing=True)`: whole examples filling rows of max_len tokens, train/packing.py). One
epoch of each side is the four steps over every example once, so each side trains the same number of
real tokens in the same number of micro-batches (packed micro-batches take as many rows as that needs);
what differs is the padding the model runs over, and the length of the rows attention spans (a packed
row spans max_len positions, its mask block-diagonal). Tokens/s counts real
tokens only; CPU seconds are the process's user + system time, with one torch thread (two would spin).

The model and adapter are the demo's (examples/pricer/recipe.py PRESETS["demo"]): SmolLM2-135M-Instruct
from the embedded GGUF, NF4 base, LoRA r 8 on all seven projections of layers 20 to 29.

The data: a customer asks the price of 1 to 12 diamonds at once (log-uniform: mostly one or two, some
long lists), and the answer prices each: mixed lengths, each a conversation through SmolLM2's own chat
template, labels on the assistant's answer.

    python bench/packing.py --threads 1         # 48 conversations, max_len 512, 2 rounds
    python bench/packing.py --n 32 --rounds 1   # a quick look
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import random
import sys
import time
from contextlib import nullcontext

import common  # noqa: F401  (puts the repository root on sys.path)
from common import ROOT, header, set_threads, smollm2_gguf, table

sys.path.insert(0, os.path.join(ROOT, "examples"))  # the pricer package: the diamonds and the demo's recipe

import torch  # noqa: E402

from lora import apply_lora  # noqa: E402
from model import load_pretrained  # noqa: E402
from pricer import PRESETS, describe_four_cs, diamonds_csv, lora_config  # noqa: E402
from train import TrainConfig, chat_example, training_step  # noqa: E402
from train.distributed import DistContext  # noqa: E402
from train.loss import AnswerLossModule  # noqa: E402
from train.packing import epoch_rows, fill  # noqa: E402
from train.plan import DataPlan  # noqa: E402


def conversations(n: int, seed: int) -> list[tuple[str, str]]:
    """n (question, answer) pairs: a customer lists 1 to 12 diamonds (log-uniform), the answer prices each."""
    rng = random.Random(seed)
    with open(diamonds_csv(), newline="") as f:
        rows = [row for _, row in zip(range(5000), csv.DictReader(f))]
    pairs = []
    for _ in range(n):
        k = min(12, int(math.exp(rng.uniform(0, math.log(13)))))
        chosen = rng.sample(rows, k)
        what = "this diamond" if k == 1 else f"these {k} diamonds"
        question = (f"I am pricing {what} for a customer. What is each worth, to the nearest dollar?\n"
                    + "\n".join(f"{i + 1}. {describe_four_cs(r)}" for i, r in enumerate(chosen)))
        answer = "\n".join(f"{i + 1}. ${float(r['price']):,.0f}" for i, r in enumerate(chosen))
        pairs.append((question, answer))
    return pairs


def to_examples(tok, pairs: list[tuple[str, str]], max_len: int):
    """Each (question, answer) as a conversation written by the model's chat template (`train.chat_example`:
    SmolLM2's system prompt, the question, the answer), labels on the answer and its <|im_end|> only."""
    return [chat_example(tok, [{"role": "user", "content": q}, {"role": "assistant", "content": a}], max_len)
            for q, a in pairs]


def padded_tokens(plan: DataPlan) -> int:
    """Tokens the model runs over in one epoch: every micro-batch is rows x its longest row."""
    total = 0
    for step in range(plan.steps_per_epoch):
        for mb in plan.step_batches(step):
            total += plan.collate(mb)["input_ids"].numel()
    return total


def run_epoch(side: dict) -> None:
    plan, examples = side["plan"], side["plan"].examples
    for step in range(plan.steps_per_epoch):
        micro_rows = plan.step_batches(step)
        n_answer = sum(examples[i].n_answer_tokens for mb in micro_rows for row in mb for i in row)
        batches = [plan.collate(mb) for mb in micro_rows]
        training_step(side["loss"], batches, side["opt"], side["sched"], side["params"], n_answer, DistContext(), 1.0,
                      nullcontext, step + 1)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=48, help="conversations (default 48)")
    ap.add_argument("--max-len", type=int, default=512, help="tokens per packed row (default 512)")
    ap.add_argument("--batch-size", type=int, default=8, help="examples per padded micro-batch (default 8); packed "
                    "micro-batches take as many rows as make the same number of micro-batches (optimizer steps) an epoch")
    ap.add_argument("--rounds", type=int, default=2, help="epochs per side, alternating (default 2)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: every core)")
    args = ap.parse_args(argv)
    threads = set_threads(args.threads)
    recipe = PRESETS["demo"]
    model, tok = load_pretrained(smollm2_gguf(), quant=recipe["quant"])
    lora = lora_config(recipe, model, seed=42)
    apply_lora(model, lora)
    model.train()
    examples = to_examples(tok, conversations(args.n, seed=0), args.max_len)
    lengths = [len(e.input_ids) for e in examples]
    mean = sum(lengths) / len(lengths)
    n_rows = len(epoch_rows(lengths, args.max_len, 42, 0))
    rows_per_batch = math.ceil(n_rows / math.ceil(len(examples) / args.batch_size))  # as many steps as padded
    configs = {
        "padded": TrainConfig(batch_size=args.batch_size, max_len=args.max_len),
        "padded, grouped by length": TrainConfig(batch_size=args.batch_size, max_len=args.max_len, group_by_length=True),
        "packed": TrainConfig(packing=True, batch_size=rows_per_batch, max_len=args.max_len),
    }
    loss = AnswerLossModule(model)
    params = [p for p in model.parameters() if p.requires_grad]
    sides = {}
    for name, config in configs.items():
        opt = torch.optim.AdamW(params, lr=recipe["lr"])  # speed alone: each side its own optimizer, one model
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        sides[name] = dict(plan=DataPlan(examples, config), loss=loss, opt=opt, sched=sched, params=params)
    real = sum(lengths)
    for side in sides.values():  # warm-up: one micro-batch each, not timed
        mb = side["plan"].step_batches(0)[:1]
        training_step(loss, [side["plan"].collate(b) for b in mb], side["opt"], side["sched"], params, 1, DistContext(),
                      1.0, nullcontext, 0)
    wall = {n: 0.0 for n in sides}
    cpu = {n: 0.0 for n in sides}
    names = list(sides)
    for r in range(args.rounds):  # alternate who goes first, so a neighbour's burst lands on every side
        for name in (names if r % 2 == 0 else names[::-1]):
            t0, c0 = time.perf_counter(), time.process_time()
            run_epoch(sides[name])
            wall[name] += time.perf_counter() - t0
            cpu[name] += time.process_time() - c0
    packed_plan = sides["packed"]["plan"]
    rows = [row for s in range(packed_plan.steps_per_epoch) for mb in packed_plan.step_batches(s) for row in mb]
    lines = [header("Packing: training tokens/s, packed rows against padded batches", "cpu", sys.argv if argv is None
                    else [sys.argv[0], *argv]),
             f"{len(examples)} conversations, {real:,} real tokens an epoch ({min(lengths)} to {max(lengths)} tokens, "
             f"mean {mean:.0f}); SmolLM2-135M-Instruct NF4, LoRA r {recipe['r']} on all projections of layers "
             f"{lora.layers[0]} to {lora.layers[-1]}, torch threads {threads}; epochs per side {args.rounds}, alternating. Packed rows "
             f"{fill(rows, lengths, args.max_len):.1%} full ({len(rows)} rows of {args.max_len}, "
             f"{rows_per_batch} a micro-batch).", ""]
    tab = [["side", "micro-batch", "tokens run over / real", "real tokens/s (wall)", "real tokens/CPU s",
            "packed / this (CPU s)"]]
    for name, side in sides.items():
        plan = side["plan"]
        shape = f"{plan.config.batch_size} {'rows' if plan.config.packing else 'examples'}"
        tab.append([name, shape, f"{padded_tokens(plan) / real:.2f}", f"{args.rounds * real / wall[name]:,.0f}",
                    f"{args.rounds * real / cpu[name]:,.0f}", f"{cpu[name] / cpu['packed']:.2f}x"])
    lines.append(table(tab))
    print("\n".join(lines))
    print(f"\npacked / padded: {cpu['padded'] / cpu['packed']:.2f}x the training tokens per CPU second "
          f"({wall['padded'] / wall['packed']:.2f}x per wall second)")


if __name__ == "__main__":
    main()
