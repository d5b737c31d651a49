"""DoRA: weight-decomposed low-rank adaptation (Liu et al. 2024), on top of a LoRALinear.

The adapted weight is split into a direction and a trained length per output feature:

    W' = m ⊙ (W0 + s·BA) / ‖W0 + s·BA‖        ‖·‖ the L2 norm of each row (one per output feature)
    y  = W' x + b                              m: (out,) `lora_magnitude_vector`, starts at ‖W0‖

The norm is treated as a constant in the backward pass (detached, section 4.3 of the paper), so
gradients reach m, A and B as in PEFT. With dropout, PEFT keeps the frozen path on the undropped x
and applies the DoRA correction to the dropped one, and so do we:

    y = W0 x + b + (m/n - 1) ⊙ W0 dropout(x) + (m/n) ⊙ s·BA dropout(x)        n = ‖W0 + s·BA‖

For an NF4 base, W0 is the dequantized weight: the norm is that of the weight the layer computes with.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MAGNITUDE = "lora_magnitude_vector"  # PEFT's name: `base_model.model.<path>.lora_magnitude_vector` on disk


def base_weight(layer) -> torch.Tensor:
    """W0 (out, in) of the LoRALinear's base, dequantized when it is 4-bit."""
    base = layer.base_layer
    return base.dequantize() if layer.base_is_4bit else base.weight


def weight_norm(W0: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """‖W0 + delta‖ per row, (out,), fp32 and without gradient (DoRA's constant norm)."""
    with torch.no_grad():
        return torch.linalg.norm(W0.float() + delta.float(), dim=1)


@torch.no_grad()
def init_magnitude(layer) -> None:
    """m = ‖W0 + s·BA‖, so a fresh DoRA layer computes exactly the LoRA layer it was built from."""
    getattr(layer, MAGNITUDE).copy_(weight_norm(base_weight(layer), layer.delta_weight()))


def dora_forward(layer, x: torch.Tensor, y: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """y = base(x) (B..., out) plus the DoRA correction; x (..., in) and A, B in the compute dtype."""
    W0 = base_weight(layer).to(x.dtype)                                 # (out, in)
    n = weight_norm(W0, layer.scaling * (B.detach().float() @ A.detach().float()))
    scale = (getattr(layer, MAGNITUDE) / n).to(x.dtype)                 # (out,), gradient to m only
    dropout = layer.lora_dropout
    if isinstance(dropout, nn.Identity) or not layer.training:
        bias = layer.base_layer.bias
        frozen = y if bias is None else y - bias.to(y.dtype)             # W0 x
    else:  # PEFT: the frozen path keeps x, the correction sees dropout(x)
        x = dropout(x)
        frozen = F.linear(x, W0)
    lora = F.linear(F.linear(x, A), B)                                   # (..., out)
    return y + (scale - 1) * frozen + scale * layer.scaling * lora


def merged_weight(layer, W0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(m/n ⊙ (W0 + s·BA) in fp32, n): the weight that computes the adapted layer, and the norm that
    `unmerged_weight` needs to undo it."""
    A, B = layer.lora_A.weight.detach(), layer.lora_B.weight.detach()
    return merge_into(W0, A, B, layer.scaling, getattr(layer, MAGNITUDE).detach())


def unmerged_weight(layer, W: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """W0 = W / (m/n) - s·BA, fp32, for a weight merged with norm n."""
    factor = (getattr(layer, MAGNITUDE).detach().float() / n)[:, None]
    return W.float() / factor - layer.delta_weight()


def merge_into(W0: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float,
               m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(m/n ⊙ (W0 + s·BA), n) in fp32 with n = ‖W0 + s·BA‖ per row, from tensors alone (export_merged
    reads them from files)."""
    W = W0.float() + scaling * (B.float() @ A.float())                  # (out, in)
    n = torch.linalg.norm(W, dim=1)                                     # (out,)
    return (m.float() / n)[:, None] * W, n
