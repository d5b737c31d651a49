"""4-bit base weights for QLoRA: NF4/FP4 in plain torch, and `Linear4bit` on bitsandbytes kernels.

    packed, state = quantize_nf4(w)          # the reference: bytes equal to bitsandbytes
    w_hat = dequantize_nf4(packed, state)
    layer = Linear4bit.from_weight(w, bias)  # frozen layer, bitsandbytes.matmul_4bit in forward
    report = quantize_model(model)           # every nn.Linear but lm_head, in place
"""
from .linear4bit import Linear4bit
from .model import QuantReport, quantize_model
from .nf4 import (
    DYNAMIC_CODE,
    FP4_CODE,
    NF4_CODE,
    QuantState,
    dequantize_4bit,
    dequantize_fp4,
    dequantize_nf4,
    quantize_4bit,
    quantize_fp4,
    quantize_nf4,
)

__all__ = [
    "NF4_CODE", "FP4_CODE", "DYNAMIC_CODE", "QuantState",
    "quantize_nf4", "dequantize_nf4", "quantize_fp4", "dequantize_fp4", "quantize_4bit", "dequantize_4bit",
    "Linear4bit", "quantize_model", "QuantReport",
]
