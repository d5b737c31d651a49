"""The backward pass by hand: RMSNorm, RoPE and SwiGLU as `torch.autograd.Function`s.

The third of the four training steps, backpropagation, made explicit for the decoder's three
elementwise mechanisms. Autograd would record every small op of their forward passes and keep
what each one needs (the normalised copy, fp32 temporaries, silu(g)); written by hand, each
gradient is its closed form, computed from the fewest saved tensors:

    RMSNorm   y = x · r · w,  r = (mean(x²) + ε)^(-1/2)            saves x and r
    RoPE      y = x · cos + rotate(x) · sin                        saves cos and sin (shared by every layer)
    SwiGLU    h = silu(g) ⊙ u                                      saves g and u; silu(g) is recomputed

Their forward passes compute exactly what the plain modules compute, op for op, so the outputs are
bit-identical; `Llama.set_handwritten_backward(False)` restores the plain autograd path, the
reference the tests compare these gradients with.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd import Function


class RMSNormFunction(Function):
    """RMSNorm with its backward pass by hand, in fp32 whatever the input's dtype.

    forward:   r = (mean(x²) + ε)^(-1/2)                 (..., 1), fp32
               y = w · (x · r)                            x · r rounded to x's dtype first, as the plain module does
    backward:  with g = dL/dy and g·w taken in fp32,
               dx = r · (g·w − x · r² · mean(x · g·w))    (the mean over the last dimension)
               dw = Σ g · (x · r)                         summed over every position

    `weight` is any tensor of shape (D,): a family whose norm scales by (1 + w) passes 1 + w.
    Saved: x and r (one number per position), nothing of size D in fp32.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.float()
        r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)        # (..., 1)
        ctx.save_for_backward(x, r, weight)
        return weight * (xf * r).to(x.dtype)                           # (..., D)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, r, weight = ctx.saved_tensors
        xf = x.float()
        dx = dw = None
        if ctx.needs_input_grad[0]:  # not for a first layer's norm of frozen embeddings
            gw = (g * weight).float()                                  # dL/d(x·r), as autograd rounds it
            # dx = r·gw − x · (r³ · mean(x·gw)): one scaled product subtracted from another
            c = (xf * gw).mean(-1, keepdim=True) * r.pow(3)            # (..., 1)
            dx = torch.addcmul(gw * r, xf, c, value=-1).to(x.dtype)
        if ctx.needs_input_grad[1]:  # a trainable norm; frozen under QLoRA
            dw = (g * (xf * r).to(x.dtype)).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        return dx, dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x (..., D) normalised by its root mean square and scaled by weight (D,), hand-written backward."""
    return RMSNormFunction.apply(x, weight, eps)


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
        return F.silu(g) * u

    @staticmethod
    def backward(ctx, dh: torch.Tensor):
        g, u = ctx.saved_tensors
        # silu_backward(v, g) = v · σ(g)(1 + g(1 − σ(g))) in one kernel, the formula above
        dg = torch.ops.aten.silu_backward(dh * u, g)
        du = dh * F.silu(g)
        return dg, du


def swiglu(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """silu(g) ⊙ u for g, u (B, T, H), hand-written backward."""
    return SwiGLUFunction.apply(g, u)
