"""LoRALinear: a frozen linear layer plus a trainable low-rank update (Hu et al. 2021).

    h = W0 x + scaling · B A x          A: (r, in)  Kaiming-uniform(a=√5)
                                        B: (out, r) zeros, so training starts at the base model exactly
    scaling = alpha / r                 (alpha / √r with rsLoRA)

The base is an `nn.Linear` or a `quant.Linear4bit` (QLoRA: the frozen W0 is stored in NF4 and only
A and B, a few million parameters, are trained in full precision). Submodule names equal PEFT's
(`base_layer`, `lora_A`, `lora_B`, `lora_dropout`, DoRA's `lora_magnitude_vector`), so state-dict
keys line up with PEFT's files. With `use_dora` the layer is DoRA's (lora/dora.py).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from quant import Linear4bit

from . import dora
from .config import check_rank, lora_scaling
from .fused import can_fuse, lora_projections

ADAPTABLE = (nn.Linear, Linear4bit)  # the layers a LoRA can wrap


def device_of(base: nn.Module) -> torch.device:
    """Where the base's tensors live (the adapter is built beside them)."""
    for t in list(base.parameters()) + list(base.buffers()):
        return t.device
    return torch.device("cpu")


class LoRALinear(nn.Module):
    """`y = base(x) + scaling · B(A(dropout(x)))` with the base frozen; (..., in) -> (..., out).

    A and B are kept in fp32 (the optimizer's master copy); the LoRA path runs in the base's compute
    dtype, so a bf16 base does its low-rank matmuls in bf16 like the rest of the layer.

    `forward` below is the readable formula and the plain autograd path, the reference the tests
    hold the fused one to. Training (a gradient wanted, `handwritten_backward` on, the default) runs
    `lora/fused.py`'s `LoRAProjections` instead, whose backward pass is written by hand: o_proj and
    down_proj (and a q, k, v, gate or up whose siblings are not all adapted) from this forward
    (`can_fuse`, then `lora_projections`), while q, k, v (gate, up) adapted together never reach it:
    `apply_lora` points their module's `project_qkv` (`project_gate_up`) method at a
    `FusedProjection`, which projects all of them from their one input in a single function.
    """

    handwritten_backward = True
    disabled = False  # `lora.adapters_disabled`: the base alone answers (a reference for DPO and GRPO)

    def __init__(
        self,
        base: nn.Module,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        generator: torch.Generator | None = None,
        use_dora: bool = False,
    ):
        super().__init__()
        if not isinstance(base, ADAPTABLE):
            raise ValueError(f"LoRALinear wraps an nn.Linear or a quant.Linear4bit, got {type(base).__name__}")
        check_rank(r)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.scaling = lora_scaling(alpha, r, use_rslora)
        self.base_layer = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # Built on the meta device then materialised: nn.Linear's own init would draw from the global RNG.
        device = device_of(base)
        fp32 = dict(bias=False, device="meta", dtype=torch.float32)
        self.lora_A = nn.Linear(self.in_features, r, **fp32).to_empty(device=device)       # (r, in)
        self.lora_B = nn.Linear(r, self.out_features, **fp32).to_empty(device=device)      # (out, r)
        # A plain linear computes in its input's dtype; a 4-bit one in its own compute_dtype.
        self.base_is_4bit = isinstance(base, Linear4bit)
        self.merged = False
        self._quantized_base: nn.Module | None = None  # the Linear4bit set aside while merged
        self.use_dora = use_dora  # DoRA: a trained length per output feature (lora/dora.py)
        if use_dora:
            self.lora_magnitude_vector = nn.Parameter(torch.ones(self.out_features, device=device))  # (out,)
        self.reset_lora_parameters(generator)

    @torch.no_grad()
    def reset_lora_parameters(self, generator: torch.Generator | None = None) -> None:
        """A ~ Kaiming-uniform(a=√5) (nn.Linear's default), B = 0: the update B A starts at zero."""
        if self.lora_A.weight.device.type == "meta":
            return
        # Drawn on the CPU so one seed gives the same A on every device.
        A = torch.empty(self.r, self.in_features, dtype=torch.float32)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
        self.lora_A.weight.copy_(A)
        self.lora_B.weight.zero_()
        if self.use_dora:
            dora.init_magnitude(self)  # m = ‖W0‖: the fresh layer is the base exactly

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """y = base(x) + scaling · (dropout(x) Aᵀ) Bᵀ, (..., in) -> (..., out). The plain path, written
        as the formula; in training this layer's product goes through `lora/fused.py` (see the class)."""
        if can_fuse((self,), x):
            return lora_projections(x, (self,))[0]
        y = self.base_layer(x)
        if self.merged or self.disabled:
            return y
        A, B = self.lora_A.weight, self.lora_B.weight                    # (r, in), (out, r), fp32
        dtype = self.base_layer.compute_dtype if self.base_is_4bit else x.dtype
        if x.dtype != dtype:  # a 4-bit base computing in another dtype than its input
            x = x.to(dtype)
        if A.dtype != dtype:  # a low-precision base; autograd still reaches the fp32 A and B
            A, B = A.to(dtype), B.to(dtype)
        if self.use_dora:
            return dora.dora_forward(self, x, y, A, B)
        xa = F.linear(self.lora_dropout(x), A)                           # (..., r)
        if y.dtype != xa.dtype:  # the base returned another dtype than it computes in
            return torch.add(y, F.linear(xa, B), alpha=self.scaling)
        # y + scaling · xa B^T in one addmm: the product is scaled and added as it is made
        out = torch.addmm(y.reshape(-1, self.out_features), xa.reshape(-1, self.r), B.t(), alpha=self.scaling)
        return out.view(y.shape)                                         # (..., out)

    # ------------------------------------------------------------------ merge
    def delta_weight(self) -> torch.Tensor:
        """scaling · B A, (out, in), fp32."""
        return self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float())

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base: W = W0 + scaling · B A. A second call does nothing.

        An NF4 base is dequantized and replaced by a plain `nn.Linear` in its compute dtype holding
        the merged weight. It is not re-quantized: rounding W0 + B A to NF4 again would change the
        outputs. The 4-bit layer is kept aside so that `unmerge` restores it exactly.
        """
        if self.merged:
            return
        base = self.base_layer
        if isinstance(base, Linear4bit):
            W0 = base.dequantize()
            W = dora.merged_weight(self, W0)[0] if self.use_dora else W0.float() + self.delta_weight()  # (out, in)
            dtype = base.compute_dtype
            merged = nn.Linear(self.in_features, self.out_features, bias=base.bias is not None,
                               device="meta", dtype=dtype).to_empty(device=W.device)
            merged.weight.copy_(W)
            if base.bias is not None:
                merged.bias.copy_(base.bias)
            merged.requires_grad_(False)
            self._quantized_base = base
            self.base_layer = merged
        elif self.use_dora:  # the norm of the unmerged weight is kept: unmerge needs it
            W, self._dora_norm = dora.merged_weight(self, base.weight)
            base.weight.copy_(W.to(base.weight.dtype))
        else:
            W = base.weight
            W.copy_((W.float() + self.delta_weight()).to(W.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the update out again: W0 = W - scaling · B A.

        An NF4 base is restored exactly; a 16-bit plain base up to its rounding of W0 + scaling · B A.
        """
        if not self.merged:
            return
        if self._quantized_base is not None:
            self.base_layer = self._quantized_base.to(self.lora_A.weight.device)  # in place; a no-op if there
            self._quantized_base = None
        elif self.use_dora:
            W = self.base_layer.weight
            W.copy_(dora.unmerged_weight(self, W, self._dora_norm).to(W.dtype))
        else:
            W = self.base_layer.weight
            W.copy_((W.float() - self.delta_weight()).to(W.dtype))
        self.merged = False

    def __setattr__(self, name, value):
        # Keep the set-aside 4-bit layer out of the module tree: not in state_dict, not counted twice.
        if name == "_quantized_base":
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def extra_repr(self) -> str:
        dora_note = ", dora=True" if self.use_dora else ""
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:.4g}{dora_note}, merged={self.merged}"
