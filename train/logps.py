"""Log-probabilities of completion tokens through the fused head: what DPO and GRPO compare.

SFT's loss is the negative log-probability of each answer token, summed; preference and reward tuning
need the same numbers one by one: DPO sums them per sequence (how likely the policy finds the chosen
and the rejected completion), GRPO weighs each token by its completion's advantage. As in
`answer_loss`, the head runs only at labelled positions, in chunks, and a frozen plain head never
leaves a (positions x vocabulary) fp32 tensor behind: `LinearLogProbs` makes each chunk's gradient
in the forward pass and frees the chunk.

    logp, rows = token_logps(model, input_ids, labels)      # (N,) and the row of each, N labelled tokens
    seq = sequence_logps(model, input_ids, labels)         # (B,) the sum over each row's labelled tokens
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lora.inject import unwrap

from .data import IGNORE_INDEX


def _head_logps(head: nn.Module, h: torch.Tensor, y: torch.Tensor, temperature: float) -> torch.Tensor:
    logits = head(h).float() / temperature                       # (n, vocab), fp32 for a stable softmax
    return torch.log_softmax(logits, dim=-1).gather(1, y[:, None]).squeeze(1)


class LinearLogProbs(torch.autograd.Function):
    """logp_i = log softmax(z_i)[y_i] with z_i = (h_i Wᵀ + b) / T, for each row i, chunk by chunk.

    d logp_i / d z_i = onehot(y_i) − softmax(z_i), so, as in `LinearCrossEntropy`, each chunk's
    gradient with respect to h is made in the forward pass, unscaled: G_i = (onehot − softmax)(z_i) W / T
    (kept in h's dtype). The backward pass only scales each row by the gradient it receives,
    dh_i = g_i · G_i: no logits are recomputed and none outlive their chunk. The head is frozen here
    (its weight and bias need no gradient: LoRA training); a trainable head goes through autograd.

    Shapes: h (n, D), weight (V, D), bias (V,) or None, y (n,) -> logp (n,), fp32.
    """

    @staticmethod
    def forward(ctx, h, weight, bias, y, chunk_size, temperature):
        need_h = ctx.needs_input_grad[0]
        out = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if need_h else None
        for start in range(0, h.shape[0], chunk_size):
            h_c, y_c = h[start:start + chunk_size], y[start:start + chunk_size]
            logp = torch.log_softmax(F.linear(h_c, weight, bias).float() / temperature, dim=-1)   # (c, V)
            out[start:start + len(y_c)] = logp.gather(1, y_c[:, None]).squeeze(1)
            if need_h:
                d_z = logp.exp_().neg_()                                           # − softmax, in place
                d_z[torch.arange(len(y_c), device=y_c.device), y_c] += 1.0         # + onehot(y)
                grad_h[start:start + chunk_size] = (d_z / temperature).to(h.dtype) @ weight   # (c, V) @ (V, D)
        ctx.save_for_backward(grad_h)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, = ctx.saved_tensors
        dh = None if grad_h is None else (grad_out[:, None] * grad_h).to(grad_h.dtype)                  # (n, D)
        return dh, None, None, None, None, None


def _frozen_plain_head(head: nn.Module) -> bool:
    return type(head) is nn.Linear and not any(p.requires_grad for p in head.parameters())


def token_logps(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
                chunk_size: int = 1024, attention_mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(labels[t + 1] | tokens up to t) at every position whose next label is not -100.

    input_ids, labels: (B, T), labels aligned with input_ids (the HF convention, as `answer_loss`);
    the logits are divided by `temperature` first (GRPO scores its samples at the temperature they
    were drawn at). Returns (logp (N,) fp32, rows (N,) int64: the row of each), in row-major order.

    With a frozen plain head and a gradient wanted, `LinearLogProbs`; otherwise (no gradient, or a
    head with an adapter) autograd through the head chunk by chunk, each chunk recomputed in the
    backward pass when there is more than one.
    """
    if input_ids.shape != labels.shape:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and labels {tuple(labels.shape)} must have the same shape (B, T)")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    model = unwrap(model)
    hidden = model.model(input_ids, attention_mask)           # (B, T, D)
    keep = labels[:, 1:] != IGNORE_INDEX                       # (B, T-1): position t predicts labels[t + 1]
    h = hidden[:, :-1][keep]                                   # (N, D)
    y = labels[:, 1:][keep]                                    # (N,)
    rows = keep.nonzero()[:, 0]                                # (N,)
    head = model.lm_head
    if _frozen_plain_head(head) and torch.is_grad_enabled():
        return LinearLogProbs.apply(h, head.weight, head.bias, y, chunk_size, temperature), rows
    recompute = torch.is_grad_enabled() and y.numel() > chunk_size
    pieces = []
    for start in range(0, y.numel(), chunk_size):
        h_c, y_c = h[start:start + chunk_size], y[start:start + chunk_size]
        if recompute:
            pieces.append(checkpoint(_head_logps, head, h_c, y_c, temperature, use_reentrant=False))
        else:
            pieces.append(_head_logps(head, h_c, y_c, temperature))
    logp = torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)
    return logp, rows


def sequence_logps(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, chunk_size: int = 1024
                   ) -> torch.Tensor:
    """(B,) the sum of each row's labelled-token log-probabilities: log π(completion | prompt).

    Summed along each row of a (B, T-1) tensor holding the token log-probabilities at their positions
    and zeros elsewhere: the order TRL (and a plain `(logp * mask).sum(1)`) adds them in, so that fp32
    sums of many tokens agree to their last bits rather than to the rounding of another order."""
    logp, _ = token_logps(model, input_ids, labels, chunk_size=chunk_size)
    keep = labels[:, 1:] != IGNORE_INDEX                       # (B, T-1)
    return logp.new_zeros(keep.shape).masked_scatter(keep, logp).sum(dim=1)
