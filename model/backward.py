"""The backward pass by hand: RMSNorm, RoPE and SwiGLU as `torch.autograd.Function`s.

The third of the four training steps, backpropagation, made explicit for the decoder's three
elementwise mechanisms. Autograd would record every small op of their forward passes and keep
what each one needs (the normalised copy, fp32 temporaries, silu(g)); written by hand, each
gradient is its closed form, computed from the fewest saved tensors:

    RMSNorm   y = w ⊙ x̂,  x̂ = x · r,  r = (mean(x²) + ε)^(-1/2)     saves x̂ (in x's dtype), r and w
    RoPE      y = x · cos + rotate(x) · sin                        saves cos and sin (shared by every layer)
    SwiGLU    h = silu(g) ⊙ u                                      saves g and u; silu(g) is recomputed

Their forward passes compute exactly what the plain modules compute, op for op, so the outputs are
bit-identical; `Llama.set_handwritten_backward(False)` restores the plain autograd path, the
reference the tests compare these gradients with.

Outputs made again, not kept. The norm's output y feeds the q, k, v projections (or gate and up),
SwiGLU's h the down projection; a projection with an adapter needs its input again in the backward
pass (a LoRA's dA = s · Gᵀ X), and keeping it would keep a second tensor of that size per layer.
So each output here carries a recipe, `y.remake = (fn, inputs, version)`: `fn(*inputs)` is y again,
bit for bit, from tensors its own function keeps anyway (y = w ⊙ x̂ from x̂ and w; h = silu(g) ⊙ u
from g and u), as long as y has not been changed in place since (`y._version == version`). A
consumer keeps the inputs (no new storage) and pays one or two elementwise ops in its backward
pass; `lora/fused.py` does. Under `torch.compile` no recipe is left: the compiler's
partitioner chooses what to keep and what to recompute itself.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch.autograd import Function


def leave_recipe(y: torch.Tensor, fn: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> torch.Tensor:
    """Note on y that fn(*inputs) makes it again (see the module docstring); returns y. Only where a
    graph was recorded (y needs a gradient, so its function keeps the inputs) and no compiler traces."""
    if y.requires_grad and not torch.compiler.is_compiling():
        y.remake = (fn, inputs, y._version)
    return y


class RMSNormFunction(Function):
    """Llama's RMSNorm with its backward pass by hand; r in fp32 whatever the input's dtype.

    forward:   r  = (mean(x²) + ε)^(-1/2)                 (..., 1), x squared and averaged in fp32
               x̂  = x · r                                 multiplied in fp32, rounded to x's dtype
               y  = w ⊙ x̂                                 in the dtypes of w and x̂ (bf16 · bf16 in bf16)
    backward:  with g = dL/dy and g·w taken in fp32,
               dx = r · (g·w − x̂ · mean(x̂ · g·w))         (the mean over the last dimension)
               dw = Σ g ⊙ x̂                               summed over every position

    dx is written with x̂ = x · r in place of x (x · r² · mean(x · g·w) = x̂ · mean(x̂ · g·w)), so x
    itself is not kept: x̂ serves the backward pass and, with w, remakes y (`y.remake`). In bf16, x̂
    carries the rounding the forward pass gave it, a relative 2^-9 in a term of dx that autograd
    computes from x; dx stays within one bf16 step of autograd's (tests/test_backward.py).
    Only Llama's form (no offset) runs here: a family whose norm scales by (1 + w) in fp32 takes
    the plain path of `model.llama.RMSNorm`. `weight` is any tensor of shape (D,).
    Saved: x̂ (x's shape and dtype), r (one fp32 number per position) and the weight.
    Returns y and x̂; x̂ has no gradient of its own (it is returned for `rms_norm`'s recipe).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float):
        xf = x.float()
        r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)        # (..., 1)
        x_hat = (xf * r).to(x.dtype)                                   # (..., D)
        ctx.save_for_backward(x_hat, r, weight)
        ctx.mark_non_differentiable(x_hat)
        ctx.set_materialize_grads(False)  # x̂'s gradient stays None, no zeros are made for it
        return weight * x_hat, x_hat                                   # (..., D) each

    @staticmethod
    def backward(ctx, g: torch.Tensor, _: None):
        x_hat, r, weight = ctx.saved_tensors
        dx = dw = None
        if ctx.needs_input_grad[0]:  # not for a first layer's norm of frozen embeddings
            gw = (g * weight).float()                                  # dL/dx̂, as autograd rounds it
            xh = x_hat.float()
            # dx = r·gw − x̂ · (r · mean(x̂·gw)): one scaled product subtracted from another
            c = (xh * gw).mean(-1, keepdim=True) * r                   # (..., 1)
            dx = torch.addcmul(gw * r, xh, c, value=-1).to(x_hat.dtype)
        if ctx.needs_input_grad[1]:  # a trainable norm; frozen under QLoRA
            dw = (g * x_hat).reshape(-1, x_hat.shape[-1]).sum(0).to(weight.dtype)
        return dx, dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x (..., D) normalised by its root mean square and scaled by weight (D,), hand-written backward;
    the output carries the recipe w ⊙ x̂."""
    y, x_hat = RMSNormFunction.apply(x, weight, eps)
    return leave_recipe(y, torch.mul, weight, x_hat)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (−x2, x1) over the two halves of the last dimension: a quarter turn of each pair."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RoPEFunction(Function):
    """Rotary position embedding of q and k in one pass, with its backward pass by hand.

    forward:   y = x · cos + rotate(x) · sin              for x = q and x = k, rotated together
    backward:  dx = dy · cos − rotate(dy) · sin           the same rotation with the sine negated:
               a rotation by −θ undoes a rotation by θ, and a rotation's transpose is its inverse.

    q (B, nh, T, hs) and k (B, nkv, T, hs) are joined along the heads, so one set of elementwise
    ops rotates both (forward and backward); the results come back as views of the joined tensor.
    cos, sin: (B, 1, T, hs), shared by every layer. Saved: cos and sin only.
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        ctx.save_for_backward(cos, sin)
        ctx.nh = q.shape[1]
        # joined in the (B, T, heads, hs) memory order that q and k come in, transposed back as views
        qk = torch.cat((q.transpose(1, 2), k.transpose(1, 2)), dim=2).transpose(1, 2)   # (B, nh + nkv, T, hs)
        y = qk * cos + rotate_half(qk) * sin
        return y[:, : ctx.nh], y[:, ctx.nh :]

    @staticmethod
    def backward(ctx, dq: torch.Tensor, dk: torch.Tensor):
        cos, sin = ctx.saved_tensors
        dy = torch.cat((dq.transpose(1, 2), dk.transpose(1, 2)), dim=2).transpose(1, 2)
        dx = dy * cos - rotate_half(dy) * sin
        return dx[:, : ctx.nh], dx[:, ctx.nh :], None, None


def apply_rope_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q (B, nh, T, hs), k (B, nkv, T, hs) rotated by the positions' angles, hand-written backward."""
    return RoPEFunction.apply(q, k, cos, sin)


def silu_times(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """silu(g) ⊙ u, the ops of SwiGLU's forward pass: its output made again from its saved g and u."""
    return F.silu(g) * u


class SwiGLUFunction(Function):
    """The gated linear unit of Llama's MLP, with its backward pass by hand.

    forward:   h = silu(g) ⊙ u,  silu(g) = g · σ(g)
    backward:  dg = dh ⊙ u ⊙ σ(g) · (1 + g · (1 − σ(g)))      (the derivative of silu)
               du = dh ⊙ silu(g)
    Saved: g and u (B, T, H); silu(g) is recomputed in the backward pass instead of kept.
    """

    @staticmethod
    def forward(ctx, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(g, u)
        return silu_times(g, u)

    @staticmethod
    def backward(ctx, dh: torch.Tensor):
        g, u = ctx.saved_tensors
        # silu_backward(v, g) = v · σ(g)(1 + g(1 − σ(g))) in one kernel, the formula above
        dg = torch.ops.aten.silu_backward(dh * u, g)
        du = dh * F.silu(g)
        return dg, du


def swiglu(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """silu(g) ⊙ u for g, u (B, T, H), hand-written backward; the output carries the recipe silu_times(g, u)."""
    return leave_recipe(SwiGLUFunction.apply(g, u), silu_times, g, u)
