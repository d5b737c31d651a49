"""The course's Tester, batched: price every test item, score it, print it, chart it."""
from __future__ import annotations

import os
import time
from typing import Sequence

import torch

from model import default_checkpoint, load_pretrained

from .data import Item
from .metrics import PriceReport, score
from .predict import greedy_and_top_k_prices, greedy_prices, top_k_average_prices


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when a GPU is there, else 'cpu'; 'cuda' without one is an error."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch sees no CUDA GPU; use --device cpu or auto")
    return device


def load_model(path: str | None, quant: str, device: str, dtype: torch.dtype | None = None,
               double_quant: bool = True):
    """(model, tokenizer, path): the checkpoint (default: the embedded SmolLM2) with an NF4/FP4 base or none.

    On CUDA the weights and the 4-bit matmuls run in bf16; on the CPU in fp32 unless `dtype` says
    otherwise. `double_quant=False` keeps the 4-bit layers' block scales in fp32.
    """
    path = path or default_checkpoint()
    dtype = dtype or (torch.bfloat16 if device == "cuda" else torch.float32)
    t0 = time.perf_counter()
    model, tokenizer = load_pretrained(path, dtype=dtype, device=device, quant=None if quant == "none" else quant,
                                       compute_dtype=dtype, double_quant=double_quant)
    base = "no quantization" if quant == "none" else quant.upper() + " base" + ("" if double_quant else
                                                                               ", no double quantization")
    print(f"loaded {path} ({base}, {dtype}, {device}) in {time.perf_counter() - t0:.1f}s", flush=True)
    return model, tokenizer, path


def answer_tokens(tokenizer, prices: Sequence[float]) -> int:
    """Tokens of the longest whole-dollar number among `prices`: enough new tokens to read a guess."""
    return max(len(tokenizer.encode(f"{p:.0f}")) for p in prices)


def evaluate_prices(model, tokenizer, items: Sequence[Item], max_new_tokens: int, batch_size: int = 64,
                    top_k: int | None = None) -> PriceReport:
    """Price each item (greedy, or the top-k average when `top_k`), then score against the truth."""
    prompts = [item.prompt for item in items]
    if top_k:
        guesses = top_k_average_prices(model, tokenizer, prompts, top_k, max_new_tokens, batch_size)
    else:
        guesses, _ = greedy_prices(model, tokenizer, prompts, max_new_tokens, batch_size)
    titles = [_title(item.prompt) for item in items]
    return score(guesses, [item.price for item in items], titles)


def evaluate_greedy_and_top_k(model, tokenizer, items: Sequence[Item], max_new_tokens: int, top_k: int | None,
                              batch_size: int = 64) -> tuple[PriceReport, PriceReport | None]:
    """(greedy report, top-k average report) from one pass over the items (`greedy_and_top_k_prices`: the
    top-1 candidate finished greedily is the greedy answer); (greedy report, None) when `top_k` is 0 or None."""
    if not top_k:
        return evaluate_prices(model, tokenizer, items, max_new_tokens, batch_size), None
    greedy, top = greedy_and_top_k_prices(model, tokenizer, [item.prompt for item in items], top_k, max_new_tokens,
                                          batch_size)
    truths, titles = [item.price for item in items], [_title(item.prompt) for item in items]
    return score(greedy, truths, titles), score(top, truths, titles)


def _title(prompt: str) -> str:
    """The description's first line, for the per-item lines."""
    body = prompt.split("\n\n")
    return body[1].split("\n")[0] if len(body) > 2 else prompt


def results_table(rows: list[tuple[str, PriceReport]]) -> str:
    """A Markdown table: one row per (name, report) with hit rate, mean error and RMSLE."""
    lines = ["| model | hit rate | mean error | RMSLE |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {name} | {r.hit_rate:.1f}% | ${r.mean_error:,.0f} | {r.rmsle:.2f} |" for name, r in rows]
    return "\n".join(lines)


def print_report(report: PriceReport, n_lines: int = 20) -> None:
    """The coloured line of the first items, then the summary title."""
    color = os.environ.get("NO_COLOR") is None
    for line in report.lines(n_lines, color=color):
        print(line)
    print(report.title(), flush=True)
