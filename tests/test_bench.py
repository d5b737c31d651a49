"""The benchmark's matmul floor records exactly the products a step makes (closed-form FLOP counts)."""
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
from floor import RecordMatmuls, matmul_floor  # noqa: E402

from quant import quantize_model  # noqa: E402


def test_a_frozen_linear_records_its_forward_and_input_gradient_products():
    m, k, n = 5, 64, 48
    layer = nn.Linear(k, n, bias=True).requires_grad_(False)
    x = torch.randn(m, k, requires_grad=True)
    with RecordMatmuls() as rec:
        layer(x).sum().backward()          # forward x W^T + b, backward dL/dx = g W; no weight gradient
    shapes = [[spec[0] for spec in layout if isinstance(spec, tuple)] for _, layout, _ in rec.calls]
    assert shapes == [[(n,), (m, k), (k, n)], [(m, n), (n, k)]]
    seconds, count, gflop = matmul_floor(lambda: layer(x).sum().backward(), "cpu", repeats=1)
    assert count == 2 and abs(gflop * 1e9 - 2 * (2 * m * k * n)) < 1e-3 and seconds > 0


def test_bitsandbytes_4bit_product_is_recorded_as_the_dense_product_of_its_shape():
    m, k, n = 6, 128, 64
    model = nn.Sequential(nn.Linear(k, n, bias=False))
    quantize_model(model, quant_type="nf4", compute_dtype=torch.float32, skip=())
    x = torch.randn(2, 3, k)
    with torch.no_grad(), RecordMatmuls() as rec:
        model(x)
    assert [(func, [spec[:3] for spec in layout]) for func, layout, _ in rec.calls] == [
        (torch.ops.aten.mm.default, [((m, k), (k, 1), torch.float32), ((k, n), (1, k), torch.float32)])]


# ----------------------------------------------------------------------------------- bench/lean.py
from lean import CountOps, Counts, count_saved, count_step  # noqa: E402


def counted(fn, weights=()):
    counts = Counts()
    with CountOps(counts), count_saved(counts, None, {w.untyped_storage().data_ptr() for w in weights}):
        fn()
    return counts


def test_one_linear_forward_and_backward_dispatches_six_compute_ops_and_saves_its_input():
    m, k, n = 5, 16, 8
    layer = nn.Linear(k, n)
    x = torch.randn(m, k, requires_grad=True)
    # forward: x W^T + b (addmm), the sum; backward: the seed gradient (ones_like), dx = g W and
    # dW = g^T x (two mm), db = sum of g; transposes and the sum's expand are views, not counted
    c = counted(lambda: layer(x.t().t()).sum().backward(), weights=list(layer.parameters()))
    assert dict(c.by_name) == {"addmm": 1, "sum": 2, "ones_like": 1, "mm": 2}
    assert sum(c.ops.values()) == 6 and sum(c.dequant.values()) == 0
    assert c.saved["rest"] == m * k * 4           # x, for dW
    assert c.weights_saved == n * k * 4           # W, for dx: the model's own, counted apart


def test_a_storage_saved_twice_is_counted_once():
    x = torch.randn(7, 3, requires_grad=True)
    c = counted(lambda: (x * x).sum().backward())  # mul keeps both operands: the same x
    assert c.saved["rest"] == x.nbytes


def test_every_op_of_dequantizing_nf4_counts_as_dequantization_and_the_product_does_not():
    import bitsandbytes.functional as bnbF

    w = torch.randn(64, 128)
    packed, state = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    c = counted(lambda: bnbF.dequantize_4bit(packed, state))
    assert sum(c.dequant.values()) == sum(c.ops.values()) >= 1
    c = counted(lambda: torch.randn(3, 64) @ w)
    assert sum(c.dequant.values()) == 0 and sum(c.ops.values()) == 2  # randn, mm


def test_ops_and_saved_bytes_are_split_between_the_last_decoder_layer_the_others_and_the_rest():
    D, m = 8, 3

    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.pre, self.post = nn.Linear(D, D), nn.Linear(D, D)
            self.layers = nn.ModuleList(nn.Linear(D, D) for _ in range(2))

        def forward(self, x):
            x = self.pre(x)
            for layer in self.layers:
                x = layer(x)
            return self.post(x)

    model, x = Stack(), torch.randn(m, D)
    c = count_step(model, lambda ids, labels: model(ids).sum(), x, None)
    # each layer: addmm forward; dx, dW (mm) and db (sum) backward. The rest: pre and post forward,
    # the sum and its seed gradient, post's three backward ops, and pre's dW and db (x needs no dx)
    assert c.ops == {"last": 4, "layers": 4, "rest": 2 + 2 + 3 + 2}
    assert c.saved == {"last": m * D * 4, "layers": m * D * 4, "rest": 2 * m * D * 4}  # each linear keeps its input
