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
