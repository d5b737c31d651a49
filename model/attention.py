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

Such a mask is T x T per row: at 8,192 tokens 64 MiB a layer in bool, kept for the backward pass,
and SDPA computes every block of it that it masks away. So a packed row without padding never
builds one: `packed_documents` reads the documents' lengths once per forward pass, and `attend`, the
one place that picks the kernel, runs each document as if it were alone:

    the CPU, no soft-cap            `DocumentAttention`: SDPA's own CPU flash kernel, document by document,
                                    into one output; it saves what SDPA saves for one document of T tokens
    CUDA, bf16 or fp16, no soft-cap  `attend_varlen`: flash attention's variable-length kernel, one call over
                                    the rows laid end to end, cut where each document ends
    a soft-cap (Gemma 2), or CUDA    `attend_each_document`: each document through the path above with
    in fp32                         autograd; a window or a soft-cap makes that document's own L x L band
                                    or scores, never T x T (one copy of the output more is kept)
A sliding window applies inside each document, as in a row of its own.

A packed row that also has padding (an attention mask) keeps the block-diagonal mask below.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

try:  # flash attention over variable-length documents, CUDA only (recent torch)
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # pragma: no cover
    varlen_attn = None


def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """cap · tanh(x / cap)."""
    return torch.tanh(x / cap) * cap


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: "torch.Tensor | Documents | None",
    scale: float | None = None, cap: float | None = None,
) -> torch.Tensor:
    """q (B, nh, T, hs), k and v (B, nkv, S, hs), mask boolean (B, 1, T, S), None for causal, or the
    `Documents` of packed rows (S = T) -> (B, nh, T, hs). scale: on the scores (default hs^-½); cap:
    the scores' soft-cap. The one place that chooses the kernel (the module docstring's table)."""
    if isinstance(mask, Documents):
        return attend_documents(q, k, v, mask, scale, cap)
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


@dataclass(frozen=True)
class Documents:
    """The documents of packed rows, in place of their T x T mask: `lengths[b]` are row b's documents'
    lengths in order (each row's sum to T); `window` a sliding window inside each (q - window < k <= q)."""

    lengths: tuple[tuple[int, ...], ...]
    window: int | None = None

    def windowed(self, window: int | None) -> "Documents":
        return replace(self, window=window)

    @property
    def max_len(self) -> int:
        return max(max(row) for row in self.lengths)

    def cu_seqlens(self, device: torch.device | str) -> torch.Tensor:
        """(N + 1,) int32: 0, then where each of the N documents ends, the rows laid end to end."""
        flat = [n for row in self.lengths for n in row]
        return F.pad(torch.tensor(flat, dtype=torch.int32).cumsum(0, dtype=torch.int32), (1, 0)).to(device)

    def ids(self, device: torch.device | str) -> torch.Tensor:
        """(B, T) the document of each token, [3, 2, 3] -> [0 0 0 1 1 2 2 2]: for the masked path."""
        rows = [torch.repeat_interleave(torch.arange(len(row)), torch.tensor(row)) for row in self.lengths]
        return torch.stack(rows).to(device)


def packed_documents(position_ids: torch.Tensor) -> Documents | None:
    """(B, T) position ids -> their `Documents`, or None when no row restarts (a plain arange: one
    document a row, the fused causal path stays).

    A position id of 0 after the first column starts a new document: [0 1 2 0 1 0 1 2] -> lengths
    (3, 2, 3). Reads the starts back from the device once. Left padding's zeros make each pad a
    document of its own, which changes nothing: the padding mask hides them already.
    """
    B, T = position_ids.shape
    starts = position_ids == 0
    starts[:, 0] = True                                                      # every row starts one
    at = starts.nonzero().tolist()                                           # [[row, column], ...]
    if len(at) == B:
        return None
    cols: list[list[int]] = [[] for _ in range(B)]
    for b, t in at:
        cols[b].append(t)
    return Documents(tuple(tuple(e - s for s, e in zip(c, c[1:] + [T])) for c in cols))


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


# ------------------------------------------------------------------------------ packed rows, no mask
@torch.compiler.disable  # a loop over documents whose lengths change from batch to batch: eager in a compiled layer
def attend_documents(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, documents: Documents,
                     scale: float | None = None, cap: float | None = None) -> torch.Tensor:
    """The kernel of packed rows: q (B, nh, T, hs), k, v (B, nkv, T, hs) -> (B, nh, T, hs), each document alone."""
    if cap is None and q.device.type == "cpu":
        return DocumentAttention.apply(q, k, v, documents, scale)
    if use_varlen(q, cap):
        return attend_varlen(q, k, v, documents, scale)
    return attend_each_document(q, k, v, documents, scale, cap)  # a soft-cap (Gemma 2), or CUDA in fp32


def band(L: int, window: int | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A document's sliding window as an additive (1, 1, L, L) mask (0 or -inf), None when it cuts nothing."""
    if window is None or window >= L:
        return None
    allowed = attention_mask_4d(None, L, 0, "cpu", window)
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, float("-inf"))


class DocumentAttention(torch.autograd.Function):
    """Causal attention within each document of packed rows, through the CPU's flash kernel (SDPA's own).

    forward, per document d (rows s..s+L of a row of q, k, v; k and v shared by groups of query heads):
        y_d = softmax(q_d k_dᵀ · scale + M) v_d,    lse_d = log Σ_keys exp(q_d k_dᵀ · scale + M)
    M causal, or the document's window band. Every y_d is written into one output stored (B, T, nh, hs),
    SDPA's own layout, so o_proj reads it without a copy. Saved: q, k, v, y and lse (B, nh, T) fp32,
    exactly what SDPA saves for a single document of T tokens.
    backward, per document, SDPA's backward kernel on views of those: with P = exp(q kᵀ · scale + M - lse),
        dv = Pᵀ dy,   dP = dy vᵀ,   dS = P ⊙ (dP - rowsum(dy ⊙ y)),   dq = dS k · scale,   dk = dSᵀ q · scale
    (dk, dv summed over each key head's group of query heads).
    """

    @staticmethod
    def forward(ctx, q, k, v, documents: Documents, scale: float | None):
        B, nh, T, hs = q.shape
        y = q.new_empty(B, T, nh, hs).transpose(1, 2)                        # (B, nh, T, hs), stored (B, T, nh, hs)
        lse = q.new_empty(B, T, nh, dtype=torch.float32).transpose(1, 2)      # (B, nh, T), SDPA's layout
        for b, s, L in spans(documents):
            d = (slice(b, b + 1), slice(None), slice(s, s + L))
            mask = band(L, documents.window, q.dtype)
            y[d], lse[d] = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q[d], k[d], v[d], 0.0, mask is None, attn_mask=mask, scale=scale)
        ctx.save_for_backward(q, k, v, y, lse)
        ctx.documents, ctx.scale = documents, scale
        return y

    @staticmethod
    def backward(ctx, dy):
        q, k, v, y, lse = ctx.saved_tensors
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        for b, s, L in spans(ctx.documents):
            d = (slice(b, b + 1), slice(None), slice(s, s + L))
            mask = band(L, ctx.documents.window, q.dtype)
            dq[d], dk[d], dv[d] = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                dy[d], q[d], k[d], v[d], y[d], lse[d], 0.0, mask is None, attn_mask=mask, scale=ctx.scale)
        return dq, dk, dv, None, None


def spans(documents: Documents):
    """(row, start, length) of every document."""
    for b, lengths in enumerate(documents.lengths):
        start = 0
        for L in lengths:
            yield b, start, L
            start += L


def attend_each_document(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, documents: Documents,
                         scale: float | None = None, cap: float | None = None) -> torch.Tensor:
    """Each document of each row alone: q (B, nh, T, hs), k, v (B, nkv, T, hs) -> (B, nh, T, hs).

    A document of L tokens attends as a row of its own would: causal SDPA on its (1, nh, L, hs) slices;
    a sliding window shorter than L adds its own L x L band, a soft-cap computes its own L x L scores
    (the masked path of `attend`, on one document). The slices come from `unbind` and `split`, whose
    backward passes are one stack and one concatenation (slicing would zero-fill a whole row for each).
    Autograd keeps each document's output and then their concatenation: one copy of y more than
    `DocumentAttention` keeps.
    """
    rows = []
    for qb, kb, vb, lengths in zip(q.unbind(0), k.unbind(0), v.unbind(0), documents.lengths):   # (nh, T, hs)
        outs = []
        for qd, kd, vd in zip(qb.split(lengths, 1), kb.split(lengths, 1), vb.split(lengths, 1)):  # (nh, L, hs)
            L, w = qd.shape[1], documents.window
            mask = attention_mask_4d(None, L, 0, q.device, w) if w is not None and w < L else None  # (1, 1, L, L)
            outs.append(attend(qd[None], kd[None], vd[None], mask, scale, cap))                     # (1, nh, L, hs)
        rows.append(torch.cat(outs, dim=2) if len(outs) > 1 else outs[0])
    return torch.cat(rows) if len(rows) > 1 else rows[0]


def use_varlen(q: torch.Tensor, cap: float | None) -> bool:
    """Flash attention's variable-length entry point: CUDA, bf16 or fp16, head size <= 256, no soft-cap."""
    return (varlen_attn is not None and q.is_cuda and cap is None and q.dtype in (torch.float16, torch.bfloat16)
            and q.shape[-1] <= 256)


def attend_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, documents: Documents,
                  scale: float | None = None) -> torch.Tensor:
    """All documents in one flash-attention call: the rows flattened to (B·T, heads, hs), cut where each
    document ends (`cu_seqlens`); causal is window (-1, 0), a sliding window (window - 1, 0): keys
    in [q - (window - 1), q]. q (B, nh, T, hs), k, v (B, nkv, T, hs) -> (B, nh, T, hs)."""
    B, nh, T, hs = q.shape
    flat = lambda x: x.transpose(1, 2).reshape(B * T, x.shape[1], hs)       # noqa: E731  (B·T, heads, hs)
    cu, n = documents.cu_seqlens(q.device), documents.max_len
    window = (-1, 0) if documents.window is None else (documents.window - 1, 0)
    y = varlen_attn(flat(q), flat(k), flat(v), cu, cu, n, n, scale=scale, window_size=window,
                    enable_gqa=k.shape[1] != nh)                             # (B·T, nh, hs)
    return y.view(B, T, nh, hs).transpose(1, 2)
