"""The matrix-product floor of a training step: its GEMMs alone, with nothing else around them.

A LoRA step on a frozen base spends most of its time multiplying by the frozen weights, forward and
backward to the inputs, and every library must do those same products. Recording each matrix
product of one step (its operands' shapes, strides and dtype) and replaying them back to back on
fresh tensors gives the time a step would take if everything else (norms, attention, softmax,
optimizer, Python) cost nothing. Another side's step time divided by this floor is the largest
speed-up any library could show over it while doing the same arithmetic on the same hardware.
"""
from __future__ import annotations

import statistics

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from common import timed

aten = torch.ops.aten
MATMULS = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default}


class RecordMatmuls(TorchDispatchMode):
    """Inside `with RecordMatmuls() as rec:`, every GEMM is run and its operands are noted in rec.calls
    (bitsandbytes' 4-bit GEMM as the dense product of the same shape).

    The mode is seen by the backward pass too: the autograd engine carries it to the thread that
    runs the backward, so the products of both passes are recorded.
    """

    def __init__(self):
        super().__init__()
        self.calls: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in MATMULS:
            layout = [(tuple(a.shape), a.stride(), a.dtype, a.device) if isinstance(a, torch.Tensor) else a for a in args]
            self.calls.append((func, layout, dict(kwargs or {})))
        elif str(func) == "bitsandbytes.gemm_4bit.default":
            # x @ W.T with W packed in 4 bits: noted as the same product with W in x's dtype, so the
            # floor leaves out the dequantization, a cost of the 4-bit format, not of the product
            x, (n, k) = args[0], args[2]
            m = x.numel() // k
            self.calls.append((aten.mm.default, [((m, k), (k, 1), x.dtype, x.device), ((k, n), (1, k), x.dtype, x.device)], {}))
        return func(*args, **(kwargs or {}))


def _materialise(layout, generator):
    def make(spec):
        if not isinstance(spec, tuple) or len(spec) != 4:
            return spec
        shape, stride, dtype, device = spec
        # random values (no zero or denormal fast paths) in the same layout, broadcast (stride 0) views included
        size = 1 + sum((d - 1) * st for d, st in zip(shape, stride)) if all(shape) else 0
        return torch.randn(size, generator=generator).to(dtype=dtype, device=device).as_strided(shape, stride)
    return [make(s) for s in layout]


def matmul_floor(step, device: str, repeats: int = 3) -> tuple[float, int, float]:
    """Run step() once while recording its GEMMs, then time them alone.

    Returns (median seconds of the GEMMs replayed back to back, how many there are, their GFLOP).
    """
    with RecordMatmuls() as rec:
        step()
    g = torch.Generator().manual_seed(0)
    calls = [(func, _materialise(layout, g), kwargs) for func, layout, kwargs in rec.calls]
    flop = 0
    for func, args, _ in calls:
        a, b = args[-2], args[-1]                  # (.., m, k) @ (.., k, n)
        flop += 2 * a.numel() * b.shape[-1]

    def replay():
        for func, args, kwargs in calls:
            func(*args, **kwargs)

    replay()  # warm-up: first-touch of the fresh operands, oneDNN's kernel choice
    seconds = statistics.median(timed(replay, device)[0] for _ in range(repeats))
    return seconds, len(calls), flop / 1e9
