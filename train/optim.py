"""Step 4 of training, written out: AdamW, and the choice between it and its ready-made relatives.

The optimizer step nudges every weight a little against its gradient, by an amount set by the
learning rate. Plain gradient descent would move each weight by lr · g. AdamW (Loshchilov and
Hutter 2019, Adam of Kingma and Ba 2015 with decoupled weight decay) instead keeps two running
averages per weight, so that the step is steadier and about the same size for every weight:

    t   = t + 1                                   the step count, per parameter
    w   = w · (1 − lr · λ)                        decoupled weight decay: shrink the weight itself
    m   = β1 · m + (1 − β1) · g                   first moment: a running mean of the gradient
    v   = β2 · v + (1 − β2) · g²                  second moment: a running mean of its square
    m̂   = m / (1 − β1^t)                          bias correction: m and v start at 0, so early
    v̂   = v / (1 − β2^t)                            averages are too small by exactly that factor
    w   = w − lr · m̂ / (√v̂ + ε)                   the step: about lr in size, against the gradient

A worked first step (t = 1, β1 = 0.9, β2 = 0.999, λ = 0, g = 0.5): m = 0.05, v = 0.00025,
m̂ = 0.05 / 0.1 = 0.5, v̂ = 0.00025 / 0.001 = 0.25, so w moves by −lr · 0.5 / (0.5 + ε) ≈ −lr:
whatever the gradient's size, the first step is lr long. Weight decay is "decoupled" because it
shrinks w directly instead of being added to g, where Adam's division by √v̂ would rescale it.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn


class AdamW(torch.optim.Optimizer):
    """AdamW with the equations of the module docstring, one parameter at a time.

    Each operation is the one `torch.optim.AdamW` (its for-loop path, the default on the CPU) makes,
    in the same order, so the two give the same bits; its state (`step`, `exp_avg` = m,
    `exp_avg_sq` = v per parameter) has torch's names and types, so either loads the other's
    `state_dict()` and a checkpoint loads with `torch.load(weights_only=True)`.
    """

    def __init__(self, params: Iterable[nn.Parameter] | Iterable[dict], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2):
        if not lr >= 0.0:
            raise ValueError(f"AdamW: lr must be >= 0, got {lr!r}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"AdamW: betas must lie in [0, 1), got {betas!r}")
        if not eps >= 0.0 or not weight_decay >= 0.0:
            raise ValueError(f"AdamW: eps and weight_decay must be >= 0, got {eps!r}, {weight_decay!r}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), eps, decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for w in group["params"]:
                if w.grad is None:
                    continue  # no gradient this step (e.g. frozen by the caller): no update, no state
                g = w.grad
                state = self.state[w]
                if not state:
                    # a float32 tensor on the CPU, as torch keeps it, so the two state_dicts are interchangeable
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(w, memory_format=torch.preserve_format)     # m
                    state["exp_avg_sq"] = torch.zeros_like(w, memory_format=torch.preserve_format)  # v
                m, v = state["exp_avg"], state["exp_avg_sq"]
                state["step"] += 1
                t = state["step"].item()
                if decay != 0:
                    w.mul_(1 - lr * decay)                        # w = w · (1 − lr · λ)
                m.lerp_(g, 1 - beta1)                             # m = β1 m + (1 − β1) g, as m + (1 − β1)(g − m)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)     # v = β2 v + (1 − β2) g²
                step_size = lr / (1 - beta1 ** t)                 # lr · m̂ / ... = (lr / (1 − β1^t)) · m / ...
                denom = (v.sqrt() / (1 - beta2 ** t) ** 0.5).add_(eps)  # √v̂ + ε
                w.addcdiv_(m, denom, value=-step_size)            # w = w − lr · m̂ / (√v̂ + ε)
        return loss


def make_optimizer(params: list[nn.Parameter], config) -> torch.optim.Optimizer:
    """The optimizer `config.optimizer` names (`train.config.OPTIMIZERS`).

    "adamw": the AdamW above; "torch_adamw": torch's own (the reference it equals); "adamw8bit",
    "paged_adamw", "paged_adamw8bit": bitsandbytes' (paged falls back to plain memory on the CPU;
    the 8-bit ones keep 8-bit moments only for tensors of 4,096 elements or more).
    """
    kwargs = dict(lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        return AdamW(params, **kwargs)
    if config.optimizer == "torch_adamw":
        return torch.optim.AdamW(params, **kwargs)
    import bitsandbytes as bnb

    cls = {"adamw8bit": bnb.optim.AdamW8bit, "paged_adamw": bnb.optim.PagedAdamW,
           "paged_adamw8bit": bnb.optim.PagedAdamW8bit}[config.optimizer]
    return cls(params, **kwargs)
