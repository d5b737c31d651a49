"""Long-document conversations for `examples/finetune.py --max-len 32768`: price lists of the embedded diamonds.

Each line of the JSON Lines file is one conversation in the messages shape: the user gives a price list
of many diamonds (the four Cs and the price of each, one a line) and asks which is the most expensive;
the assistant names it and its price. The answer is somewhere in the list, so it takes the whole
document to give: long-context retrieval, with labels on the short answer only.

    python bench/long_documents.py --out long.jsonl                       # 12 lists of 2,000 to 12,000 tokens
    python bench/long_documents.py --out long.jsonl --n 4 --min-tokens 8000 --max-tokens 8000
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import random
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "examples")]

from pricer import describe_four_cs, diamonds_csv  # noqa: E402

TOKENS_PER_LINE = 30  # "12. Diamond: 0.3 carat, Ideal cut, color E, clarity SI2: $1,234" in SmolLM2's tokenizer


def price_list(rows: list[dict], rng: random.Random, tokens: int) -> dict:
    """One conversation of about `tokens` tokens: a numbered price list and the question of its maximum."""
    chosen = rng.sample(rows, max(2, tokens // TOKENS_PER_LINE))
    lines = [f"{i + 1}. {describe_four_cs(r)}: ${float(r['price']):,.0f}" for i, r in enumerate(chosen)]
    top = max(range(len(chosen)), key=lambda i: float(chosen[i]["price"]))
    question = (f"Here is a price list of {len(chosen)} diamonds.\n" + "\n".join(lines)
                + "\nWhich diamond on the list is the most expensive, and what does it cost?")
    answer = f"Number {top + 1}, {describe_four_cs(chosen[top])[9:]}: ${float(chosen[top]['price']):,.0f}."
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def write_long_documents(path: str, n: int = 12, min_tokens: int = 2000, max_tokens: int = 12000, seed: int = 0) -> str:
    """Write n conversations of min_tokens to max_tokens tokens (uniform) to `path`; returns the path."""
    rng = random.Random(seed)
    with open(diamonds_csv(), newline="") as f:
        rows = list(csv.DictReader(f))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps(price_list(rows, rng, rng.randint(min_tokens, max_tokens))) + "\n")
    return path


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="the .jsonl file to write")
    ap.add_argument("--n", type=int, default=12, help="conversations (12)")
    ap.add_argument("--min-tokens", type=int, default=2000, help="shortest conversation, about (2000)")
    ap.add_argument("--max-tokens", type=int, default=12000, help="longest conversation, about (12000)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    print(f"wrote {write_long_documents(args.out, args.n, args.min_tokens, args.max_tokens, args.seed)}")


if __name__ == "__main__":
    main()
