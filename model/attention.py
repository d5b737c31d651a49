"""The attention core, its masks and the tanh soft-cap, shared by every family.

    softcap(s) = cap · tanh(s / cap)       bounds scores (or logits) to (-cap, cap) smoothly (Gemma 2)
    y = softmax(softcap(q kᵀ · scale) + mask) v

Without a soft-cap, scaled_dot_product_attention runs the whole of it in one fused kernel; with
one, the scores must be materialised to be capped, as transformers' eager path does.

The mask says which keys each query may see: the causal triangle, cut by a sliding window, by
padding, and by document boundaries. Packed rows (several examples laid end to end, see
train/packing.py) follow transformers' padding-free convention: a position id of 0 starts a new
document, and no token attends across that boundary, so the mask is block-diagonal:

    position_ids 0 1 2 0 1 0 1 2   ->   documents 0 0 0 1 1 2 2 2

             key  0 1 2 3 4 5 6 7
        query 0   x
              1   x x
              2   x x x
              3         x               each example sees only itself,
              4         x x             as if it were alone in its row:
              5             x           its logits are those it has alone
              6             x x
              7             x x x
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """cap · tanh(x / cap)."""
    return torch.tanh(x / cap) * cap


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
    scale: float | None = None, cap: float | None = None,
) -> torch.Tensor:
    """q (B, nh, T, hs), k and v (B, nkv, S, hs), mask boolean (B, 1, T, S) or None for causal
    -> (B, nh, T, hs). scale: on the scores (default hs^-½); cap: the scores' soft-cap."""
    nh, nkv = q.shape[1], k.shape[1]
    gqa = nkv != nh
    if cap is None:
        # SDPA shares each key/value head with its group of query heads itself (enable_gqa), without
        # copying k and v nh/nkv times. CUDA's fused kernels do so only without a mask; with one the
        # copies are made here, or SDPA would fall back to its slow math kernel.
        if gqa and mask is not None and q.device.type != "cpu":
            k = k.repeat_interleave(nh // nkv, dim=1)                      # (B, nh, S, hs)
            v = v.repeat_interleave(nh // nkv, dim=1)
            gqa = False
        if mask is None:  # no padding, no cache, no window: the fused causal path
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    if gqa:
        k = k.repeat_interleave(nh // nkv, dim=1)                          # (B, nh, S, hs)
        v = v.repeat_interleave(nh // nkv, dim=1)
    scores = softcap(q @ k.transpose(-2, -1) * (scale if scale is not None else q.shape[-1] ** -0.5), cap)
    T, S = scores.shape[-2:]
    if mask is None:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    scores = scores.masked_fill(~mask, float("-inf"))                      # (B, nh, T, S)
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v


class SoftCappedHead(nn.Linear):
    """The language-model head with Gemma 2's final soft-cap: logits = cap · tanh(W h / cap).

    The cap lives in the head itself, so every caller of `lm_head` (generation, the chunked loss)
    gets capped logits; its weight keeps the name `lm_head.weight`.
    """

    def __init__(self, in_features: int, out_features: int, cap: float, **kwargs):
        super().__init__(in_features, out_features, bias=False, **kwargs)
        self.cap = cap

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return softcap(super().forward(x), self.cap)


def default_positions(attention_mask: torch.Tensor | None, B: int, T: int, start: int,
                      device: torch.device | str) -> torch.Tensor:
    """Positions 0, 1, 2, ... counted over real tokens only, so left padding does not shift RoPE."""
    if attention_mask is None:
        return torch.arange(start, start + T, device=device).expand(B, T)
    pos = attention_mask.long().cumsum(-1) - 1                               # (B, S)
    return pos.clamp(min=0)[:, -T:]


def document_ids(position_ids: torch.Tensor) -> torch.Tensor | None:
    """(B, T) position ids -> (B, T) the document of each token, or None when every row is one document.

    A position id of 0 after the first column starts a new document: [0 1 2 0 1 0 1 2] -> [0 0 0 1 1 2 2 2].
    None when no row restarts (a plain arange): the fused causal path stays. Deciding it reads one
    boolean back from the device. Left padding's zeros make each pad a document of its own, which
    changes nothing: the padding mask hides them already.
    """
    starts = position_ids[:, 1:] == 0                                        # (B, T-1)
    if not bool(starts.any()):
        return None
    return F.pad(starts.long().cumsum(-1), (1, 0))                           # (B, T)


def attention_mask_4d(attention_mask: torch.Tensor | None, T: int, start: int, device: torch.device | str,
                      window: int | None = None, documents: torch.Tensor | None = None) -> torch.Tensor | None:
    """(B, S) 1 = token, 0 = padding  ->  boolean (B, 1, T, S), True where a query may look.

    Each query sees the keys at or before its own position that are not padding, and with a sliding
    `window` only the last `window` of those columns (itself included: q - window < k <= q). With
    `documents` (B, T) from `document_ids` (no cache: S = T), only the keys of its own document. A
    padding query would see nothing at all (and SDPA would return NaN), so it is allowed to see
    itself: its output is never used, but it stays finite.
    """
    if attention_mask is None and start == 0 and window is None and documents is None:
        return None
    S = start + T
    q_pos = torch.arange(start, S, device=device)[:, None]
    k_pos = torch.arange(S, device=device)[None, :]
    allowed = (k_pos <= q_pos)[None, None]                                   # (1, 1, T, S)
    if window is not None:
        allowed = allowed & (k_pos > q_pos - window)[None, None]
    if documents is not None:  # block-diagonal: a query and a key of one document
        if documents.shape[-1] != S:
            raise ValueError(f"documents {tuple(documents.shape)} must cover all {S} key positions: packed rows take no cache")
        allowed = allowed & (documents[:, None, :, None] == documents[:, None, None, :])   # (B, 1, T, S)
    if attention_mask is not None:
        keys = attention_mask.bool()[:, None, None, :S]                      # (B, 1, 1, S)
        allowed = (allowed & keys) | (k_pos == q_pos)[None, None]
    return allowed
