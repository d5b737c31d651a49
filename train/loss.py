"""The loss on answer tokens only: how wrong was the model's guess of each next answer token.

Positions whose label is -100 (the prompt, the padding) need no logits at all, so the head runs
only where a label is kept: for a short answer after a long prompt this skips most of the
(positions x vocabulary) matrix product, the largest free speed-up of fine-tuning.

Packed rows (train/packing.py) hold several examples end to end; their position ids restart at 0
at each one. A target whose position id is 0 is the first token of the next example: it is never
predicted from the last token of the one before (`answer_positions`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lora.inject import unwrap

from .data import IGNORE_INDEX


def _head_cross_entropy_sum(head: nn.Module, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = head(h).float()                                   # (n, vocab), fp32 for a stable softmax
    return F.cross_entropy(logits, y, reduction="sum")


class LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(h_i W^T + b, y_i), the head and the loss in one step, chunk by chunk.

    The gradient of cross-entropy with respect to the logits is known in closed form,
    d loss / d logits = softmax(logits) - onehot(y), so each chunk of logits gives its loss and its
    gradient at once and is freed: no (positions x vocabulary) tensor outlives its chunk, and the
    backward pass only scales the gradients already made. Autograd would keep the fp32 logits and
    their log-softmax until the backward pass, then fill a zero tensor of the same size for the
    gradient of the gather and pass over it twice more.

    A worked example, 3 rows and a vocabulary of 4 (logits z = h Wᵀ + b, targets y = 0, 2, 1):

        z                     softmax(z)                   − onehot(y)  = d loss / d z      loss_i
        [2, 1, 0, -1]   →   [0.644, 0.237, 0.087, 0.032]   [1, 0, 0, 0]   [-0.356, 0.237, 0.087, 0.032]   0.440
        [0, 0, 0,  0]   →   [0.250, 0.250, 0.250, 0.250]   [0, 0, 1, 0]   [0.250, 0.250, -0.750, 0.250]   1.386
        [1, 3, 0,  1]   →   [0.102, 0.757, 0.038, 0.102]   [0, 1, 0, 0]   [0.102, -0.243, 0.038, 0.102]   0.278

    loss_i = −log softmax(z_i)[y_i], summed: 2.104 (0.44019 + 1.38629 + 0.27798 = 2.10446). Each row
    of the gradient sums to 0: the target's logit is pushed up by 1 − p, every other one down by its
    own probability. Then
    d loss / d h = (d loss / d z) W, d loss / d W = (d loss / d z)ᵀ h, d loss / d b = Σ_rows d loss / d z,
    all made here, in the forward pass: the training loop's step 3 (backward) finds the head's
    gradient already there and only multiplies it by the incoming scale.

    Shapes: h (n, D), weight (V, D), bias (V,) or None, y (n,) -> a scalar, fp32.
    The gradients are made whenever an input requires them, even under `torch.no_grad()` (a
    Function's forward cannot see the caller's grad mode): for evaluation, use F.cross_entropy.
    """

    @staticmethod
    def forward(ctx, h, weight, bias, y, chunk_size):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for start in range(0, h.shape[0], chunk_size):
            h_c, y_c = h[start:start + chunk_size], y[start:start + chunk_size]
            logp = torch.log_softmax(F.linear(h_c, weight, bias).float(), dim=-1)    # (c, V)
            total += -logp.gather(1, y_c[:, None]).sum()
            if need_h or need_w or need_b:
                d_logits = logp.exp_()                                               # softmax, in place
                d_logits[torch.arange(len(y_c), device=y_c.device), y_c] -= 1.0      # - onehot(y)
                if need_b:
                    grad_b += d_logits.sum(0)
                if need_w:
                    grad_w += d_logits.t() @ h_c.float()                             # (V, c) @ (c, D)
                if need_h:
                    grad_h[start:start + chunk_size] = d_logits.to(h.dtype) @ weight # (c, V) @ (V, D)
            logp = d_logits = None  # free this chunk before the next one's logits: two (c, V) fp32 tensors at most
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (h.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grads = [None if g is None else (g * grad_total).to(like) for g, like in zip(ctx.saved_tensors, ctx.dtypes)]
        return (*grads, None, None)


def answer_positions(labels: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T) labels [and position ids] -> (B, T-1) bool: position t predicts labels[t + 1] there.

    A label of -100 is never predicted; nor, in a packed row, a label whose position id is 0: it
    starts another document, which the token before it cannot see.
    """
    keep = labels[:, 1:] != IGNORE_INDEX                       # (B, T-1)
    if position_ids is not None:
        keep = keep & (position_ids[:, 1:] != 0)
    return keep


def answer_loss(
    model: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    reduction: str = "mean",
    chunk_size: int = 1024,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy of the next token over the positions whose shifted label is not -100.

    input_ids, labels: (B, T), labels aligned with input_ids (the HF convention): position t's
    hidden state predicts labels[t + 1]. `reduction="sum"` returns the summed loss so a caller can
    divide by the answer tokens of a whole optimizer step; "mean" divides by this batch's.
    position_ids (B, T): packed rows, each example's positions from 0; the model attends within an
    example only, and no example's first token is a target (`answer_positions`).

    The head and the fp32 softmax run in chunks of `chunk_size` positions, so the full
    (positions x vocabulary) fp32 logits are never held at once. A plain `nn.Linear` head goes
    through `LinearCrossEntropy`, which makes each chunk's gradient as it goes; any other head (a
    LoRA on lm_head, a quantized head) goes through autograd, each chunk recomputed in the backward
    pass when there is more than one.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if input_ids.shape != labels.shape:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and labels {tuple(labels.shape)} must have the same shape (B, T)")
    if position_ids is not None and position_ids.shape != input_ids.shape:
        raise ValueError(f"position_ids {tuple(position_ids.shape)} must have the shape of input_ids {tuple(input_ids.shape)}")
    model = unwrap(model)
    hidden = model.model(input_ids, attention_mask, position_ids)   # (B, T, D)
    targets = labels[:, 1:]                                    # (B, T-1): the next token of each position
    keep = answer_positions(labels, position_ids)              # (B, T-1)
    h = hidden[:, :-1][keep]                                   # (N, D): only the positions with a label
    y = targets[keep]                                          # (N,)
    n = y.numel()
    if n == 0:  # nothing to learn here; still a graph so a backward pass (and DDP) stays valid
        return hidden.sum() * 0.0

    head = model.lm_head
    if type(head) is nn.Linear and torch.is_grad_enabled():  # loss and gradient in one pass
        total = LinearCrossEntropy.apply(h, head.weight, head.bias, y, chunk_size)
    else:  # evaluation, or a head with an adapter or quantized: autograd, chunks recomputed in backward
        recompute = torch.is_grad_enabled() and n > chunk_size
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, n, chunk_size):
            h_c, y_c = h[start:start + chunk_size], y[start:start + chunk_size]
            if recompute:
                total = total + checkpoint(_head_cross_entropy_sum, head, h_c, y_c, use_reentrant=False)
            else:
                total = total + _head_cross_entropy_sum(head, h_c, y_c)
    return total / n if reduction == "mean" else total


class AnswerLossModule(nn.Module):
    """The model with `answer_loss` as its forward, so DistributedDataParallel can wrap the pair.

    DDP synchronises gradients only for work done inside its own forward call; putting the head and
    the loss inside one module's forward keeps every trainable parameter (a LoRA on lm_head too)
    in that call.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, labels, attention_mask=None, position_ids=None):
        return answer_loss(self.model, input_ids, labels, attention_mask, reduction="sum", position_ids=position_ids)
