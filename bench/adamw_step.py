"""Time of one optimizer step: train/optim.py's written-out AdamW against torch.optim.AdamW.

    python bench/adamw_step.py [--steps 200] [--threads 1]

The parameters are the pricer's adapter: LoRA r 8 on the seven projections of SmolLM2's upper
15 layers, 1,221,120 numbers in 210 tensors. The two optimizers alternate step by step on the
same gradients, so a busy neighbour slows both alike; the median step time of each is reported.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from train.optim import AdamW  # noqa: E402


def pricer_lora_shapes(r: int = 8, layers: int = 15, hidden: int = 576, kv: int = 192, inter: int = 1536):
    """(A, B) shapes of each adapted projection: A is (r, in), B is (out, r)."""
    per_layer = [(hidden, hidden), (hidden, kv), (hidden, kv), (hidden, hidden),   # q, k, v, o: (in, out)
                 (hidden, inter), (hidden, inter), (inter, hidden)]              # gate, up, down
    return [s for _ in range(layers) for i, o in per_layer for s in ((r, i), (o, r))]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    shapes = pricer_lora_shapes()
    g = torch.Generator().manual_seed(0)
    start = [torch.randn(s, generator=g) * 0.02 for s in shapes]
    ours = [torch.nn.Parameter(w.clone()) for w in start]
    ref = [torch.nn.Parameter(w.clone()) for w in start]
    optimizers = {"ours": AdamW(ours, lr=2e-4, weight_decay=0.001),
                  "torch": torch.optim.AdamW(ref, lr=2e-4, weight_decay=0.001)}
    params = {"ours": ours, "torch": ref}
    times = {"ours": [], "torch": []}
    for step in range(args.steps + 10):
        grads = [torch.randn(s, generator=g) for s in shapes]
        for name in (("ours", "torch") if step % 2 else ("torch", "ours")):
            for p, gr in zip(params[name], grads):
                p.grad = gr
            t0 = time.perf_counter()
            optimizers[name].step()
            if step >= 10:  # the first steps allocate the moments
                times[name].append(time.perf_counter() - t0)
    n = sum(w.numel() for w in start)
    diff = max((a - b).abs().max().item() for a, b in zip(ours, ref))
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print(f"{n:,} parameters in {len(shapes)} tensors, {args.steps} steps, {args.threads} thread(s)")
    print(f"median step: ours {med['ours']:.3f} ms, torch {med['torch']:.3f} ms, ratio ours/torch {med['ours'] / med['torch']:.3f}")
    print(f"max |ours - torch| after {args.steps + 10} steps: {diff:.3g}")


if __name__ == "__main__":
    main()
