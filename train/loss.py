"""The loss on answer tokens only: how wrong was the model's guess of each next answer token.

Positions whose label is -100 (the prompt, the padding) need no logits at all, so the head runs
only where a label is kept: for a short answer after a long prompt this skips most of the
(positions x vocabulary) matrix product, the largest free speed-up of fine-tuning.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .data import IGNORE_INDEX


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel (or any `.module`-holding) wrapper."""
    while isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    return model


def _head_cross_entropy_sum(head: nn.Module, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = head(h).float()                                   # (n, vocab), fp32 for a stable softmax
    return F.cross_entropy(logits, y, reduction="sum")


def answer_loss(
    model: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    reduction: str = "mean",
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Cross-entropy of the next token over the positions whose shifted label is not -100.

    input_ids, labels: (B, T), labels aligned with input_ids (the HF convention): position t's
    hidden state predicts labels[t + 1]. `reduction="sum"` returns the summed loss so a caller can
    divide by the answer tokens of a whole optimizer step; "mean" divides by this batch's.

    The head and the fp32 softmax run in chunks of `chunk_size` positions; when gradients are on
    and there is more than one chunk, each chunk is recomputed in the backward pass, so the full
    (positions x vocabulary) fp32 logits are never held at once.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if input_ids.shape != labels.shape:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and labels {tuple(labels.shape)} must have the same shape (B, T)")
    model = unwrap(model)
    hidden = model.model(input_ids, attention_mask)            # (B, T, D)
    targets = labels[:, 1:]                                    # (B, T-1): the next token of each position
    keep = targets != IGNORE_INDEX                             # (B, T-1)
    h = hidden[:, :-1][keep]                                   # (N, D): only the positions with a label
    y = targets[keep]                                          # (N,)
    n = y.numel()
    if n == 0:  # nothing to learn here; still a graph so a backward pass (and DDP) stays valid
        return hidden.sum() * 0.0

    recompute = torch.is_grad_enabled() and n > chunk_size
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, n, chunk_size):
        h_c, y_c = h[start:start + chunk_size], y[start:start + chunk_size]
        if recompute:
            total = total + checkpoint(_head_cross_entropy_sum, model.lm_head, h_c, y_c, use_reentrant=False)
        else:
            total = total + _head_cross_entropy_sum(model.lm_head, h_c, y_c)
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

    def forward(self, input_ids, labels, attention_mask=None):
        return answer_loss(self.model, input_ids, labels, attention_mask, reduction="sum")
