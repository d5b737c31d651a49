"""How often each of the 16 NF4 codes is used: N(0, 1) blocks and SmolLM2's real weights.

    python bench/nf4_code_shares.py

Each block of 64 is divided by its own absmax before rounding to the nearest code, so the
values of a block are not N(0, 1) any more: its largest value always lands on ±1 and the rest
crowd towards 0. The codes near 0 are used about five times as often as the outermost ones.
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model import default_checkpoint, load_pretrained  # noqa: E402
from quant import quantize_nf4  # noqa: E402


def code_shares(w: torch.Tensor) -> torch.Tensor:
    """(16,) fraction of the weights of `w` stored as each NF4 code (blocks of 64, no double quant)."""
    packed, _ = quantize_nf4(w.float().flatten().contiguous(), blocksize=64, double_quant=False)
    idx = torch.stack([packed >> 4, packed & 15], -1).flatten().long()[:w.numel()]  # high nibble first
    counts = torch.bincount(idx, minlength=16).double()
    return counts / counts.sum()


def main() -> None:
    torch.set_num_threads(1)
    for name, w in (("N(0,1), 4,194,304 values", torch.randn(4096, 1024, generator=torch.Generator().manual_seed(0))),
                    ("SmolLM2-135M, every decoder linear weight", None)):
        if w is None:
            model, _ = load_pretrained(default_checkpoint())
            w = torch.cat([m.weight.detach().flatten() for n, m in model.named_modules()
                           if isinstance(m, torch.nn.Linear) and "layers." in n])
        s = code_shares(w)
        print(f"{name}: " + " ".join(f"{x:.1%}" for x in s) + f"  (min {s.min():.2%}, max {s.max():.2%})")


if __name__ == "__main__":
    main()
