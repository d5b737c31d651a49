"""Scoring the pricer: greedy decoding and the top-3 average, in one pass or apart, with the question
the prompts share run once a batch or every prompt run whole.

The demo's 200 held-out diamonds (seed 0, the four Cs) on the embedded SmolLM2 with an NF4 base (and
a trained adapter, if given), batches of 100, CPU seconds of one thread for each way:

- greedy alone (`pricer.greedy_prices`);
- greedy and the top-3 average in one pass (`pricer.greedy_and_top_k_prices`: each prompt runs once,
  its three candidates share its cached keys and values, the first candidate is the greedy answer);
- the top-3 average by its definition, apart: each candidate (the prompt and one of the three likeliest
  first tokens) finished greedily as a new prompt, every prompt whole, as the scoring did at first.

The first two run both ways: `share_prefix=True` (the default: the 17 tokens every prompt opens with,
`How much does this cost to the nearest dollar?` and `Diamond: `, run once a batch and their keys and
values copied to each row, `model.shared_prefix_batch`) and `share_prefix=False` (every prompt from
its first token).

    python bench/price_scoring.py --adapter runs/pricer/adapter
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import common  # noqa: F401  (puts the repository root on sys.path)
import torch
from common import ROOT, header, table

sys.path.insert(0, os.path.join(ROOT, "examples"))
from pricer import (PRESETS, answer_tokens, greedy_and_top_k_prices, greedy_prices, load_model,  # noqa: E402
                    load_source, parse_price, split_items)
from pricer.predict import _prompt_ids, continue_prompts  # noqa: E402

from model import pad_batch  # noqa: E402


@torch.no_grad()
def top_k_apart(model, tok, prompts: list[str], k: int, max_new: int, batch: int) -> list[float]:
    """The top-k average by its definition: the prompts' last logits, then every candidate run again whole."""
    ids, prices = _prompt_ids(tok, prompts), []
    for start in range(0, len(ids), batch):
        rows = ids[start:start + batch]
        input_ids, mask = pad_batch(rows, tok.pad_id, side="left")                     # (B, T)
        hidden = model.model(input_ids, attention_mask=mask)[:, -1]                       # (B, D)
        p, top = torch.softmax(model.lm_head(hidden).float(), -1).topk(k)               # (B, K)
        candidates = [r + [t] for r, tops in zip(rows, top.tolist()) for t in tops]
        rest = continue_prompts(model, tok, candidates, max_new - 1, batch * k, share_prefix=False)
        for i in range(len(rows)):
            pairs = [(n, q) for j, (t, q) in enumerate(zip(top[i].tolist(), p[i].tolist()))
                     if (n := parse_price(tok.decode([t]) + rest[i * k + j])) > 0]
            prices.append(sum(n * q for n, q in pairs) / sum(q for _, q in pairs) if pairs else 0.0)
    return prices


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--adapter", help="a trained pricer adapter (PEFT folder); none: the base alone")
    ap.add_argument("--batch", type=int, default=100)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from lora import load_adapter

    recipe = PRESETS["demo"]
    model, tok, _ = load_model(None, recipe["quant"], "cpu")
    if args.adapter:
        load_adapter(model, args.adapter)
    split = split_items(load_source(None, tok, recipe["description"]).items, 0, recipe["test_size"],
                        recipe["val_size"], recipe["train_size"])
    prompts, max_new = [i.prompt for i in split.test], answer_tokens(tok, [i.price for i in split.train])

    def cpu(fn):
        t = time.process_time()
        out = fn()
        return time.process_time() - t, out

    t_whole, greedy_whole = cpu(lambda: greedy_prices(model, tok, prompts, max_new, args.batch, share_prefix=False)[0])
    t_greedy, greedy = cpu(lambda: greedy_prices(model, tok, prompts, max_new, args.batch)[0])
    t_one_whole, (_, top_whole) = cpu(lambda: greedy_and_top_k_prices(model, tok, prompts, 3, max_new, args.batch,
                                                                      share_prefix=False))
    t_one, (greedy1, top1) = cpu(lambda: greedy_and_top_k_prices(model, tok, prompts, 3, max_new, args.batch))
    t_apart, top_apart = cpu(lambda: top_k_apart(model, tok, prompts, 3, max_new, args.batch))
    print(header("Scoring the pricer: greedy and the top-3 average", "cpu", sys.argv))
    print(f"{len(prompts)} held-out diamonds (seed 0), batches of {args.batch}, {max_new} new tokens, one thread; "
          f"adapter: {args.adapter or 'none (the base)'}\n")
    print(table([["way", "every prompt whole: CPU s", "the question once a batch: CPU s", "ratio"],
                 ["greedy alone", f"{t_whole:.1f}", f"{t_greedy:.1f}", f"{t_greedy / t_whole:.2f}"],
                 ["greedy and top-3, one pass", f"{t_one_whole:.1f}", f"{t_one:.1f}", f"{t_one / t_one_whole:.2f}"],
                 ["top-3 apart (each candidate run again)", f"{t_apart:.1f}", "", ""],
                 ["greedy alone + top-3 apart", f"{t_whole + t_apart:.1f}", "", ""]]))
    print(f"\nwith the question once a batch, against every prompt whole: greedy prices equal: {greedy == greedy_whole}; "
          f"top-3 averages equal: {top1 == top_whole} (largest difference "
          f"{max(abs(a - b) for a, b in zip(top1, top_whole)):.2g} dollars)")
    print(f"the one pass's greedy prices equal greedy alone's: {greedy1 == greedy}; "
          f"its top-3 averages equal the definition's: {top1 == top_apart} (largest difference "
          f"{max(abs(a - b) for a, b in zip(top1, top_apart)):.2g} dollars)")

if __name__ == "__main__":
    main()
