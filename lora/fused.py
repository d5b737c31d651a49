"""LoRA projections with the backward pass written by hand: k adapted linears that share one input.

The attention's q, k and v projections all read the same normalised x (k = 3), the MLP's gate and
up projections another (k = 2), o and down one each (k = 1). With X the rows of x (N, in), for
each projection i (W0_i (out_i, in) frozen, b_i its frozen bias, A_i (r_i, in), B_i (out_i, r_i),
s_i = alpha / r_i (alpha / √r_i with rsLoRA), D_i the adapter's dropout of X, the identity when off):

    forward     XA_i = D_i(X) A_iᵀ                                  (N, r_i)
                Y_i  = X W0_iᵀ + b_i + s_i · XA_i B_iᵀ              (N, out_i)

    backward    G_i  = dY_i B_i                                     (N, r_i)
                dA_i = s_i · G_iᵀ D_i(X)                            (r_i, in)
                dB_i = s_i · dY_iᵀ XA_i                             (out_i, r_i)
                dX   = Σ_i  dY_i W0_i  +  s_i · D_i'(G_i A_i)       (N, in)

W0 is frozen, so no dW0 is ever formed: the backward pass computes dA, dB and dX only. dX is one
buffer that each term is added into with `addmm_`; without dropout (and with one scaling s) the
k adapter terms are one product, s · [G_1 … G_k] [A_1; …; A_k], and likewise all k dA at once,
s · [G_1 … G_k]ᵀ X. D_i' is the dropout's backward: the same mask, the same 1 / (1 - p).

Saved for the backward pass:
  * X once for all k projections; or, when x is the output of a hand-written RMSNorm or SwiGLU
    (`model/backward.py`), not X but the tensors that function keeps anyway and that remake X in
    one or two ops (`x.remake`: w and x̂ for a norm, g and u for SwiGLU): no storage of X's size;
  * the narrow XA_i (r_i columns each; one (N, Σr) tensor without dropout);
  * the A_i and B_i in the compute dtype: copies when the compute dtype is not fp32; the stacked
    [A_1; …; A_k] is a copy in any dtype (r_i x in each), the B_i in fp32 the parameters themselves;
  * with dropout, each adapter's mask as ATen's dropout leaves it: a boolean (N, in) on CUDA, the
    scaled noise m / (1 - p) in x's dtype, also (N, in), on the CPU.
Nothing is kept for the frozen base: a 4-bit W0 is dequantized again in the backward pass (one
bitsandbytes op, see `quant.Linear4bit`), as bitsandbytes' own `MatMul4Bit` does.

Without dropout the forward pass, too, makes one product for the k adapters, x·[A_1; …; A_k]ᵀ.
With dropout it makes the ops of `LoRALinear`'s plain path on the same inputs, in another order:
the k base products first, then each adapter's dropout and product, then the k additions. The
dropout masks are drawn in the plain path's order (q, k, v) from the same random stream, so they
are the same draws (a resumed run stays bit-identical) and the outputs are the plain path's to the
bit; so they are for k = 1. The one wider product may sum in another order than k narrow ones: its
fp32 outputs equal the plain path's within rounding (about 1e-7 of their size).

Precision. Every product runs in x's dtype, the compute dtype: the frozen bases compute in it, the
fp32 A and B (the optimizer's master copies) are cast to it, and dA, dB are cast back to fp32.
Under autocast this is autocast's own rule when autocast's dtype is x's (the course preset: a bf16
model under bf16 autocast): mm, addmm and linear are on its lower-precision list, so autocast would
cast the same fp32 A and B to bf16 and change nothing else; the function runs then, as
`torch.amp.custom_fwd(cast_inputs=bf16)` would run it. An autocast dtype other than x's (an fp32
model under bf16 autocast) takes the plain path, where autocast casts op by op.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from quant import Linear4bit


# ------------------------------------------------------------------------------ dropout, exactly
def _fused_dropout_device(x: torch.Tensor) -> bool:
    """Where ATen's dropout runs its fused kernel (`native_dropout`, a boolean mask) rather than
    drawing a noise tensor (`bernoulli_`, then `div_`, then `mul`), as `at::dropout` decides."""
    return x.device.type in ("cuda", "xpu", "privateuseone") and x.numel() > 0


def draw_dropout(x: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x with dropout p applied as `nn.Dropout` applies it in training (same ops, same random draws),
    and what the backward pass needs: the mask (fused kernel) or the noise m / (1 - p) (elsewhere)."""
    if _fused_dropout_device(x):
        return torch.native_dropout(x, p, True)
    noise = torch.empty_like(x).bernoulli_(1 - p)
    noise.div_(1 - p)
    return x * noise, noise


def redo_dropout(x: torch.Tensor, keep: torch.Tensor, p: float) -> torch.Tensor:
    """`draw_dropout(x, p)[0]` again, bit for bit, from its saved mask; also its backward (g ⊙ m/(1-p))."""
    if keep.dtype == torch.bool:
        return torch.ops.aten.native_dropout_backward(x, keep, 1.0 / (1.0 - p))
    return x * keep


def dropout_p(layer: nn.Module) -> float:
    """The dropout probability a LoRALinear applies now (0 when off or in eval mode)."""
    d = layer.lora_dropout
    return float(d.p) if isinstance(d, nn.Dropout) and d.training else 0.0


def frozen_weight(base: nn.Module) -> torch.Tensor:
    """W0 (out, in) in the compute dtype, for dY W0: an nn.Linear's own weight, a 4-bit weight dequantized."""
    return base.dequantize() if isinstance(base, Linear4bit) else base.weight


def recipe(x: torch.Tensor) -> tuple:
    """(fn, inputs) with fn(*inputs) == x, from the tensors x's maker keeps: `x.remake` as
    `model/backward.py` leaves it, if x was not changed in place since; else (None, (x,))."""
    remake = getattr(x, "remake", None)
    if remake is None or remake[2] != x._version:
        return None, (x,)
    return remake[0], remake[1]


# ------------------------------------------------------------------------------ the Function
class LoRAProjections(torch.autograd.Function):
    """Y_1 … Y_k of k LoRALinears on one input x; the module docstring gives the formulas.

    apply(x, layers, A_1, B_1, …, A_k, B_k) -> (y_1, …, y_k); x (..., in), y_i (..., out_i).
    `layers` are the LoRALinears (their frozen bases, scalings and dropouts); A_i, B_i their fp32
    weights, passed in so that autograd hands their gradients to them.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, layers: tuple, *weights: torch.Tensor):
        dtype = x.dtype  # the compute dtype: `can_fuse` checked that the bases compute in it
        ps, ranks = [dropout_p(layer) for layer in layers], [layer.r for layer in layers]
        # Y_i = X W0_iᵀ + b_i: the frozen bases, which keep nothing for the backward pass
        ys = [layer.base_layer(x) for layer in layers]                        # (..., out_i) each
        Bs = [B.to(dtype) for B in weights[1::2]]                              # no-ops in fp32
        stacked = len(layers) > 1 and not any(ps)
        keeps = []
        if stacked:  # one input for all k adapters: [XA_1 … XA_k] = X [A_1; …; A_k]ᵀ, one product
            A_all = torch.cat(weights[0::2]).to(dtype)                         # (Σr, in)
            xa_all = F.linear(x, A_all).reshape(-1, sum(ranks))                # (N, Σr)
            As, xas = A_all.split(ranks), xa_all.split(ranks, dim=1)
            saved = [xa_all, A_all]
        else:        # the plain path's ops, dropout drawn for each adapter in turn
            As = [A.to(dtype) for A in weights[0::2]]
            xas = []
            for layer, p, A in zip(layers, ps, As):
                xd, keep = draw_dropout(x, p) if p else (x, None)
                xas.append(F.linear(xd, A).reshape(-1, layer.r))               # XA_i = D_i(X) A_iᵀ, (N, r_i)
                keeps.extend([keep] if p else [])
            saved = [*xas, *As]
        # Y_i += s_i · XA_i B_iᵀ, the product scaled and added as it is made
        outs = [torch.addmm(y.reshape(-1, layer.out_features), xa, B.t(), alpha=layer.scaling).view(y.shape)
                for y, xa, B, layer in zip(ys, xas, Bs, layers)]
        # X itself, or what remakes it: a norm's x̂ and w, SwiGLU's g and u, kept by their function anyway
        remake, inputs = recipe(x)
        ctx.layers, ctx.ps, ctx.stacked, ctx.remake, ctx.n_inputs = layers, ps, stacked, remake, len(inputs)
        ctx.save_for_backward(*inputs, *keeps, *Bs, *saved)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *dys: torch.Tensor):
        layers, ps, k = ctx.layers, ctx.ps, len(ctx.layers)
        ranks, scalings = [layer.r for layer in layers], [layer.scaling for layer in layers]
        saved = ctx.saved_tensors
        inputs, saved = saved[:ctx.n_inputs], saved[ctx.n_inputs:]
        x = ctx.remake(*inputs) if ctx.remake else inputs[0]                  # X, bit for bit the forward's
        n_keep = sum(1 for p in ps if p)
        keeps, Bs, saved = iter(saved[:n_keep]), saved[n_keep:n_keep + k], saved[n_keep + k:]
        if ctx.stacked:
            xa_all, A_all = saved
            xas, As = xa_all.split(ranks, dim=1), A_all.split(ranks)
        else:
            xas, As = saved[:k], saved[k:]
        X = x.reshape(-1, x.shape[-1])                                         # (N, in)
        dys = [dy.reshape(-1, layer.out_features) for dy, layer in zip(dys, layers)]   # (N, out_i)
        need_A, need_B = ctx.needs_input_grad[2::2], ctx.needs_input_grad[3::2]

        # G_iᵀ = (dY_i B_i)ᵀ = B_iᵀ dY_iᵀ (r_i, N), the scaling left to the products below; for k > 1 the
        # k of them are the slabs of one (Σr, N) buffer, [G_1 … G_k]ᵀ, so that the adapters' dX and dA
        # are one product each
        if k == 1:
            Gt = torch.mm(Bs[0].t(), dys[0].t())
            Gts = [Gt]
        else:
            Gt = X.new_empty(sum(ranks), X.shape[0])
            Gts = Gt.split(ranks)
            for g, dy, B in zip(Gts, dys, Bs):
                torch.mm(B.t(), dy.t(), out=g)

        # dB_i = s_i · dY_iᵀ XA_i; B (any tensor of dB's shape) stands in for addmm's ignored input
        dBs = [torch.addmm(B, dy.t(), xa, beta=0, alpha=s) if need else None
               for dy, xa, B, s, need in zip(dys, xas, Bs, scalings, need_B)]

        dX = None
        if ctx.needs_input_grad[0]:
            for dy, layer in zip(dys, layers):                                 # dX = Σ_i dY_i W0_i
                W0 = frozen_weight(layer.base_layer)                           # (out_i, in)
                dX = torch.mm(dy, W0) if dX is None else dX.addmm_(dy, W0)

        if not any(ps) and len(set(scalings)) == 1:
            # one product for the k adapters (one s):
            # dX += s · [G_1 … G_k] [A_1; …; A_k];  [dA_1; …; dA_k] = s · [G_1 … G_k]ᵀ X
            s = scalings[0]
            if not ctx.stacked:
                A_all = torch.cat(As) if k > 1 else As[0]                     # (Σr, in)
            if dX is not None:
                dX.addmm_(Gt.t(), A_all, alpha=s)
            dAs = [None] * k
            if any(need_A):
                dAs = torch.addmm(A_all, Gt, X, beta=0, alpha=s).to(layers[0].lora_A.weight.dtype).split(ranks)
        else:
            # dropout (a different D_i(X) for each) or different scalings: one adapter at a time
            dAs = []
            for g, A, p, s, need in zip(Gts, As, ps, scalings, need_A):
                keep = next(keeps) if p else None
                XD = redo_dropout(x, keep, p).reshape(X.shape) if p and need else X   # D_i(X), the same draw
                dA = torch.addmm(A, g, XD, beta=0, alpha=s) if need else None        # dA_i = s_i · G_iᵀ D_i(X)
                dAs.append(dA)
                if dX is not None and p:  # dX += s_i · D_i'(G_i A_i): the dropout's backward, the same mask
                    dX.add_(redo_dropout(torch.mm(g.t(), A), keep.reshape(X.shape), p), alpha=s)
                elif dX is not None:     # dX += s_i · G_i A_i
                    dX.addmm_(g.t(), A, alpha=s)

        grads: list[torch.Tensor | None] = [None if dX is None else dX.view(x.shape), None]
        for dA, dB, layer in zip(dAs, dBs, layers):
            grads.append(None if dA is None else dA.to(layer.lora_A.weight.dtype))
            grads.append(None if dB is None else dB.to(layer.lora_B.weight.dtype))
        return tuple(grads)


# ------------------------------------------------------------------------------ when to use it
def can_fuse(layers: Sequence[nn.Module], x: torch.Tensor) -> bool:
    """The fused path gives the plain path's numbers here: every layer is an unmerged LoRALinear with
    `handwritten_backward` on (and no DoRA magnitude, which these formulas leave out), the bases
    frozen and computing in x's dtype, autocast off or casting to x's dtype (the module docstring's
    "Precision"), and a gradient is wanted."""
    if not torch.is_grad_enabled():
        return False
    device = x.device.type
    if torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) != x.dtype:
        return False  # autocast would cast x and the bases op by op: the plain path follows it
    for layer in layers:
        if not getattr(layer, "handwritten_backward", False) or layer.merged or layer.disabled or getattr(
                layer, "use_dora", False):
            return False
        base = layer.base_layer
        dtype = base.compute_dtype if isinstance(base, Linear4bit) else base.weight.dtype
        if dtype != x.dtype or any(p.requires_grad for p in base.parameters()):
            return False
    return True


def lora_projections(x: torch.Tensor, layers: Sequence[nn.Module]) -> tuple[torch.Tensor, ...]:
    """(y_1, …, y_k) of the LoRALinears `layers` on one input x, through `LoRAProjections`."""
    weights = [w for layer in layers for w in (layer.lora_A.weight, layer.lora_B.weight)]
    return LoRAProjections.apply(x, tuple(layers), *weights)


class FusedProjection:
    """Stands in for a module's `project_qkv` / `project_gate_up` method: q, k, v (or gate, up) of
    one x in one `LoRAProjections` when they are all LoRALinears that `can_fuse`; otherwise the
    module's own method. It reads the projections from the module at each call, so it never goes
    stale, and holds no submodule of its own: module names and state-dict keys stay as they are."""

    def __init__(self, owner: nn.Module, method: str, names: tuple[str, ...]):
        self.owner, self.method, self.names = owner, method, names

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        layers = [getattr(self.owner, n) for n in self.names]
        if all(hasattr(m, "lora_A") for m in layers) and can_fuse(layers, x):
            return lora_projections(x, layers)
        return getattr(type(self.owner), self.method)(self.owner, x)


# the methods of model/ that project one input through several linears, and those linears
SHARED_INPUT_PROJECTIONS = {"project_qkv": ("q_proj", "k_proj", "v_proj"), "project_gate_up": ("gate_proj", "up_proj")}


def fuse_shared_projections(model: nn.Module) -> int:
    """Point each module's shared-input projection method at a `FusedProjection`; returns how many."""
    n = 0
    for module in model.modules():
        for method, names in SHARED_INPUT_PROJECTIONS.items():
            parts = [getattr(module, nm, None) for nm in names]
            if callable(getattr(type(module), method, None)) and all(hasattr(m, "lora_A") for m in parts):
                setattr(module, method, FusedProjection(module, method, names))
                n += 1
    return n
