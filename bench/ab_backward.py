"""A/B of the hand-written backward passes on the CPU: ours on its default path against ours on the
plain autograd path (`Llama.set_handwritten_backward(False)`, main's code before the hand-written
functions), in one process, one thread, steps alternating; CPU time of the process per step, which
holds up on a shared machine where wall time does not.

    python bench/ab_backward.py --shape smollm2-b              # eager
    python bench/ab_backward.py --shape smollm2-b --compile    # Llama.compile_layers() on both
    python bench/ab_backward.py --shape smollm2-b --against main   # the hand-written path of git rev
                                                                   # `main` against this tree's

With `--against REV` the "before" side runs `model/backward.py` and `lora/fused.py` as they are at
REV (read with `git show`, loaded as modules of their own): during each of its steps the names the
library calls them by (`model.llama.rms_norm`, `swiglu`, `apply_rope_qk`; `lora.layer.can_fuse`,
`lora_projections`; `lora.fused.can_fuse`, `lora_projections`) point at REV's functions, so its
forward pass builds REV's graph and its backward pass runs REV's code; the other side runs this tree.
"""
import argparse
import contextlib
import os
import subprocess
import sys
import time
import types

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
p.add_argument("--against", metavar="REV", help="before: the hand-written path at git REV (e.g. main), not the plain path")
a = p.parse_args()
if a.against and a.compile:
    p.error("--against with --compile: the swapped functions would make the compiled layers recompile at every step")
set_threads(1)
shape = SHAPES[a.shape]
args = argparse.Namespace(quant=a.quant, compile=False, offload=False, lr=1e-4, layers=None, shrink=1)


def module_at(rev: str, path: str, name: str) -> types.ModuleType:
    """The file `path` as it is at git `rev`, loaded as a module called `name`."""
    source = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=common.ROOT, check=True, capture_output=True,
                            text=True).stdout
    module = types.ModuleType(name)
    module.__file__ = f"{rev}:{path}"
    sys.modules[name] = module  # dataclasses and annotations look their module up
    exec(compile(source, module.__file__, "exec"), module.__dict__)
    return module


@contextlib.contextmanager
def code_at(old_backward, old_fused):
    """Within the block, the library calls REV's hand-written functions (see the docstring)."""
    import lora.fused
    import lora.layer
    import model.llama

    swaps = [(model.llama, n, getattr(old_backward, n)) for n in ("rms_norm", "swiglu", "apply_rope_qk")]
    swaps += [(m, n, getattr(old_fused, n)) for m in (lora.layer, lora.fused) for n in ("can_fuse", "lora_projections")]
    kept = [(m, n, getattr(m, n)) for m, n, _ in swaps]
    for m, n, f in swaps:
        setattr(m, n, f)
    try:
        yield
    finally:
        for m, n, f in kept:
            setattr(m, n, f)


def with_code(step, context):
    def run(ids, labels):
        with context():
            return step(ids, labels)
    return run


sides = {}
if a.against:
    old = (module_at(a.against, "model/backward.py", "before_backward"),
           module_at(a.against, "lora/fused.py", "before_fused"))
    names = (f"before ({a.against}'s hand-written path)", "after (this tree's)")
else:
    names = ("before (plain autograd)", "after (hand-written)")
for name in names:
    model, loss = ours_loss(args, shape, "cpu", torch.float32, None)
    model.set_handwritten_backward(a.against is not None or name.startswith("after"))
    if a.compile:
        model.compile_layers()
    step = with_adamw(model, loss, 1e-4)
    if a.against and name.startswith("before"):
        step = with_code(step, lambda: code_at(*old))
    sides[name] = step
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
print(f"shape {a.shape} quant {a.quant} compile {a.compile} threads 1{f'; against {a.against}' if a.against else ''}; "
      f"first losses {losses}")
for n in names:
    print(f"  {n}: median wall {median(times[n])*1e3:.0f} ms/step, median CPU {median(cpu[n])*1e3:.0f} ms/step -> {tok/median(cpu[n]):,.0f} tokens per CPU-second"
          f"  (CPU ms: {', '.join(f'{x*1e3:.0f}' for x in cpu[n])})")
b_, a_ = names
print(f"  after/before tokens/s: wall medians {median(times[b_])/median(times[a_]):.3f}x, CPU-time medians {median(cpu[b_])/median(cpu[a_]):.3f}x, "
      f"median of paired CPU-time ratios {median([x / y for x, y in zip(cpu[b_], cpu[a_])]):.3f}x")
