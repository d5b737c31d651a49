"""After supervised fine-tuning: the SFT adapter trained further by DPO or GRPO on its own answers.

    result = tune_after(model, tokenizer, split, settings, "dpo", out_dir)   # the SFT adapter already loaded

DPO: the SFT model answers `tune_size` of its training diamonds greedily; each miss becomes a pair
(chosen: the true price; rejected: its answer), the SFT adapter frozen as the reference (its
log-probabilities computed once). GRPO: the same diamonds as prompts, `group_size` answers of each
sampled from the model as it trains, rewarded by `price_reward`. Both score the held-out diamonds
greedily before (the SFT adapter) and after, and count the CPU seconds of each stage (this process:
`time.process_time`).
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Mapping

from train import DPO, GRPO, train

from .split import Split
from .evaluate import answer_tokens, evaluate_prices
from .metrics import PriceReport
from .predict import greedy_prices
from .recipe import train_config
from .tuning import miss_pairs, price_reward, reward_rows


def _summary(report: PriceReport) -> dict[str, float]:
    return {"hits": report.hit_rate, "error": report.mean_error, "rmsle": report.rmsle}


def tune_after(model, tokenizer, split: Split, settings: Mapping[str, Any], objective: str, out: str | None,
               seed: int, device: str = "cpu", progress: bool = False, eval_batch_size: int = 100) -> dict[str, Any]:
    """Score the SFT adapter, build the objective's data, train, score again; returns what the table needs
    (and writes it to `out`/after.json when `out` is given)."""
    cpu = {}
    max_new = answer_tokens(tokenizer, [item.price for item in split.train])
    tune = split.train[:settings["tune_size"]]

    t0 = time.process_time()
    before = evaluate_prices(model, tokenizer, split.test, max_new, eval_batch_size)
    cpu["score SFT"] = time.process_time() - t0
    print(f"SFT adapter: {before.title()}", flush=True)

    t0 = time.process_time()
    if objective == "dpo":
        items = miss_pairs(tune, greedy_prices(model, tokenizer, [i.prompt for i in tune], max_new, eval_batch_size)[1])
        val = miss_pairs(split.val, greedy_prices(model, tokenizer, [i.prompt for i in split.val], max_new,
                                                  eval_batch_size)[1])
        method = DPO(beta=settings["beta"], reference="start", sft_weight=settings["sft_weight"])
        print(f"DPO: {len(items)} pairs from the misses among {len(tune)} training diamonds, {len(val)} validation")
    elif objective == "grpo":
        items, val = reward_rows(tune), None
        method = GRPO(rewards=price_reward, group_size=settings["group_size"], max_new_tokens=max_new + 4,
                      temperature=settings["temperature"], beta=settings["beta"])
    else:
        raise ValueError(f"objective {objective!r}: expected 'dpo' or 'grpo'")
    cpu["data"] = time.process_time() - t0

    t0 = time.process_time()
    config = train_config(settings, device, out, seed, progress=progress)
    result = train(model, tokenizer, items, val or None, config, objective=method)
    cpu["train"] = time.process_time() - t0

    t0 = time.process_time()
    after = evaluate_prices(model, tokenizer, split.test, max_new, eval_batch_size)
    cpu["score"] = time.process_time() - t0
    print(f"after {objective.upper()}: {after.title()}", flush=True)
    record = {"objective": objective, "seed": seed, "sft": _summary(before), "after": _summary(after), "cpu_s": cpu,
              "steps": result.step, "items": len(items), "losses": result.train_losses, "metrics": result.metrics,
              "val_metrics": result.val_metrics, "settings": {k: v for k, v in settings.items()}}
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "after.json"), "w") as f:
            json.dump(record, f, indent=1)
    return record
