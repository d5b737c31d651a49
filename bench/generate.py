"""Batched greedy generation with the KV cache: this library's `Llama.generate` against transformers'.

The shape is the pricer's evaluation: a batch of 25 prompts of about 60 tokens each ("How much does
this cost to the nearest dollar? ... Price is $"), left-padded, continued by 8 new tokens, greedy.
Both sides run the same SmolLM2-135M weights on the same token ids, alternating in rounds.

    python bench/generate.py                    # fp32 weights, 25 x ~60 tokens, 8 new tokens
    python bench/generate.py --quant nf4        # NF4 base weights on both sides
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys

import common  # noqa: F401  (puts the repository root on sys.path)
import torch
from common import alternate_rounds, header, hf_folder_for_nf4, load_theirs, median, set_threads, smollm2_gguf, table
from floor import matmul_floor

PROMPT = "How much does this cost to the nearest dollar?\n\n{}\n\nPrice is $"
TITLES = [
    "Stainless steel 12-cup programmable coffee maker", "Cordless 20V drill driver kit with two batteries",
    "Memory foam queen mattress topper, 3 inch", "Wireless noise cancelling over-ear headphones",
    "Cast iron skillet, 10 inch, pre-seasoned", "LED desk lamp with USB charging port",
    "Kids' waterproof hiking boots", "Replacement water filter cartridge for refrigerators",
    "Ceramic non-stick cookware set, 10 pieces", "Portable Bluetooth speaker with 20-hour battery",
    "Car floor mats, all-weather rubber, front and rear", "Digital kitchen scale with tare function",
    "Yoga mat, 6 mm, non-slip", "Smart thermostat with Wi-Fi and app control",
    "Electric toothbrush with three brushing modes", "Garden hose, 50 ft, expandable",
    "Office chair with lumbar support and adjustable arms", "Acrylic paint set, 24 colours",
    "Motorcycle helmet, full face, DOT approved", "Stand mixer, 5 quart, tilt-head",
    "Air purifier with true HEPA filter", "Backpacking tent for two people",
    "Mechanical gaming keyboard with RGB lighting", "Cordless handheld vacuum cleaner",
    "Replacement brake pads for mid-size sedans",
]
FEATURES = [
    "Built from durable materials for years of everyday use.", "Easy to clean and simple to store.",
    "Ships in recyclable packaging.", "Backed by a one-year limited warranty.",
    "Compact design that fits small spaces.", "Rated highly by customers for value.",
    "Includes a quick start guide.", "Available in several colours.",
]


def pricer_prompts(tok, batch: int, target: int) -> list[list[int]]:
    """`batch` pricer prompts whose token counts spread around `target` (target - 4 ... target + 4).

    Each description is a product title followed by feature words, one word at a time, until the
    prompt reaches its row's length.
    """
    words = " ".join(FEATURES).split()
    rows = []
    for i in range(batch):
        want = target - 4 + (7 * i) % 9
        text, k = TITLES[i % len(TITLES)] + ".", 0
        ids = tok.encode(PROMPT.format(text))
        while len(ids) < want:
            text += " " + words[k % len(words)]
            k += 1
            ids = tok.encode(PROMPT.format(text))
        rows.append(ids)
    return rows


def build_ours(quant: str, dtype: torch.dtype, device: str):
    from model import load_pretrained

    model, tok = load_pretrained(smollm2_gguf(), dtype=dtype, device=device, quant=None if quant == "none" else "nf4")
    return model.eval(), tok


def build_theirs(quant: str, dtype: torch.dtype, device: str, hf_dir: str | None):
    return load_theirs(quant, dtype, device, hf_dir).eval()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=25, help="prompts per batch (default 25)")
    p.add_argument("--prompt-tokens", type=int, default=60, help="about this many tokens per prompt (default 60)")
    p.add_argument("--new-tokens", type=int, default=8, help="tokens to generate per prompt (default 8)")
    p.add_argument("--quant", choices=("none", "nf4"), default="none", help="base weights in NF4 or not (default none)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), help="weights and compute (default: float32 on cpu, bfloat16 on cuda)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per side first (default 1)")
    p.add_argument("--rounds", type=int, default=4, help="timed rounds; the side that goes first alternates (default 4)")
    p.add_argument("--calls", type=int, default=2, help="timed generate calls per side per round (default 2)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's, one per core)")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no GPU here")
    set_threads(args.threads)
    device = args.device
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    print(header("Generation: ours vs transformers", device, [os.path.abspath(__file__)] + sys.argv[1:]), flush=True)

    from model import pad_batch

    hf_dir = hf_folder_for_nf4(dtype) if args.quant == "nf4" else None
    try:
        ours, tok = build_ours(args.quant, dtype, device)
        theirs = build_theirs(args.quant, dtype, device, hf_dir)
    finally:
        if hf_dir:
            shutil.rmtree(hf_dir, ignore_errors=True)
    rows = pricer_prompts(tok, args.batch, args.prompt_tokens)
    ids, mask = (t.to(device) for t in pad_batch(rows, tok.pad_id, side="left"))   # (B, T), left padding
    B, T = ids.shape

    def run(side: str) -> torch.Tensor:
        with torch.no_grad():
            if side == "ours":
                return ours.generate(ids, attention_mask=mask, max_new_tokens=args.new_tokens)
            return theirs.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.new_tokens, do_sample=False,
                                   temperature=None, top_p=None, top_k=None, use_cache=True, pad_token_id=tok.pad_id)

    outs = {s: run(s) for s in ("ours", "theirs")}
    for _ in range(args.warmup - 1):
        for s in outs:
            run(s)
    times = alternate_rounds({"ours": "ours", "theirs": "theirs"}, run, args.rounds, args.calls, device)
    floor_s, floor_n, floor_gflop = matmul_floor(lambda: run("ours"), device)

    new = {s: o[:, T:] for s, o in outs.items()}
    same_rows = sum(bool(torch.equal(a, b)) for a, b in zip(new["ours"], new["theirs"]))
    lengths = [len(r) for r in rows]
    print(f"\n### generation, quant {'NF4 (double quant)' if args.quant == 'nf4' else 'none'}, "
          f"{str(dtype).replace('torch.', '')}")
    print(f"batch {B} prompts of {min(lengths)}-{max(lengths)} tokens (mean {sum(lengths) / B:.1f}), left-padded to {T}; "
          f"{args.new_tokens} new tokens, greedy, KV cache; warm-up {args.warmup}, then {args.rounds} rounds x "
          f"{args.calls} calls per side, alternating\n")
    stats, table_rows = {}, [["side", "ms/call (median)", "new tokens/call", "new tokens/s"]]
    for s, label in (("ours", "ours (Llama.generate)"), ("theirs", "transformers generate")):
        ms = median(times[s]) * 1e3
        n = new[s].numel()
        stats[s] = n / (ms / 1e3)
        table_rows.append([label, f"{ms:.1f}", str(n), f"{stats[s]:,.0f}"])
    print(table(table_rows))
    print(f"\nratio ours/theirs: new tokens/s {stats['ours'] / stats['theirs']:.2f}x; "
          f"greedy continuations identical in {same_rows} of {B} rows")
    print(f"matmul floor: ours' {floor_n} matrix products ({floor_gflop:.0f} GFLOP) replayed alone take {floor_s * 1e3:.1f} ms; "
          f"theirs' call / floor = {median(times['theirs']) / floor_s:.2f}x, the most any library doing these products could gain")
    print("sample:", repr(tok.decode(new["ours"][0].tolist())), "|", repr(tok.decode(new["theirs"][0].tolist())))


if __name__ == "__main__":
    main()
