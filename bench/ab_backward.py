"""A/B of the hand-written backward passes on the CPU: ours on its default path against ours on the
plain autograd path (`Llama.set_handwritten_backward(False)`, main's code before the hand-written
functions), in one process, one thread, steps alternating; CPU time of the process per step, which
holds up on a shared machine where wall time does not.

    python bench/ab_backward.py --shape smollm2-b              # eager
    python bench/ab_backward.py --shape smollm2-b --compile    # Llama.compile_layers() on both
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402,F401  (puts the repository root on sys.path)
import torch  # noqa: E402
from common import median, set_threads  # noqa: E402
from train_step import SHAPES, make_batch, ours_loss, vocab_and_pad, with_adamw  # noqa: E402

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--shape", default="smollm2-a", choices=("smollm2-a", "smollm2-b"))
p.add_argument("--quant", default="none", choices=("none", "nf4"))
p.add_argument("--compile", action="store_true", help="Llama.compile_layers() on both sides")
p.add_argument("--rounds", type=int, default=4, help="rounds; who goes first alternates (default 4)")
p.add_argument("--steps", type=int, default=1, help="steps per side per round (default 1)")
p.add_argument("--warmup", type=int, default=2, help="untimed steps per side first (default 2)")
a = p.parse_args()
set_threads(1)
shape = SHAPES[a.shape]
args = argparse.Namespace(quant=a.quant, compile=False, offload=False, lr=1e-4, layers=None, shrink=1)
sides = {}
for name in ("before (plain autograd)", "after (hand-written)"):
    model, loss = ours_loss(args, shape, "cpu", torch.float32, None)
    model.set_handwritten_backward(name.startswith("after"))
    if a.compile:
        model.compile_layers()
    sides[name] = with_adamw(model, loss, 1e-4)
ids, labels = make_batch(shape, *vocab_and_pad(args, shape), 0)
losses = {n: s(ids, labels).item() for n, s in sides.items()}
for _ in range(a.warmup - 1):
    for s in sides.values(): s(ids, labels)
names = list(sides)
times = {n: [] for n in names}     # wall seconds
cpu = {n: [] for n in names}       # this process's CPU seconds (one thread: robust to waiting for a shared core)
for r in range(a.rounds):
    for n in (names if r % 2 == 0 else names[::-1]):
        for _ in range(a.steps):
            w0, c0 = time.perf_counter(), time.process_time()
            sides[n](ids, labels)
            times[n].append(time.perf_counter() - w0); cpu[n].append(time.process_time() - c0)
tok = ids.numel()
print(f"shape {a.shape} quant {a.quant} compile {a.compile} threads 1; first losses {losses}")
for n in names:
    print(f"  {n}: median wall {median(times[n])*1e3:.0f} ms/step, median CPU {median(cpu[n])*1e3:.0f} ms/step -> {tok/median(cpu[n]):,.0f} tokens per CPU-second"
          f"  (CPU ms: {', '.join(f'{x*1e3:.0f}' for x in cpu[n])})")
b_, a_ = names
print(f"  after/before tokens/s: wall medians {median(times[b_])/median(times[a_]):.3f}x, CPU-time medians {median(cpu[b_])/median(cpu[a_]):.3f}x, "
      f"median of paired CPU-time ratios {median([x / y for x, y in zip(cpu[b_], cpu[a_])]):.3f}x")
