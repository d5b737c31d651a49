"""Generation: continue prompts one token at a time, greedy or by temperature + top-p sampling.

With the KV cache the prompt runs through the model once, and each later step feeds only the newest
token: its keys and values join those cached for the positions before it. Without the cache every
step reruns the whole sequence; both give the same tokens, the cache just skips the repeated work.

Batched prompts are left-padded (see `pad_batch`), so every row's next token lands in the same column.
Prompts that open alike (one question asked of many items) can run their common first tokens once
(`shared_prefix_batch`).

Imports run one way: `model/llama.py` uses this file (the `KVCache` its attention fills, and
`Llama.generate`); this file needs only what a Llama has (`.model`, `.lm_head`, `.config`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .config import LlamaConfig


@dataclass
class KVCache:
    """Keys and values of the tokens seen so far, preallocated to `max_len` positions.

    k, v: (B, nkv, max_len, hs). `update` writes the new positions and returns the filled prefix.
    """

    k: torch.Tensor
    v: torch.Tensor

    @classmethod
    def empty(cls, batch: int, config: LlamaConfig, max_len: int, dtype: torch.dtype, device) -> "KVCache":
        shape = (batch, config.num_key_value_heads, max_len, config.head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))

    @classmethod
    def for_model(cls, model: nn.Module, batch: int, max_len: int) -> list["KVCache"]:
        """One empty cache per decoder layer of `model` (a `Llama`), in its weights' dtype and device."""
        w = model.model.embed_tokens.weight
        return [cls.empty(batch, model.config, max_len, w.dtype, w.device) for _ in model.model.layers]

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


def pad_batch(seqs: list[list[int]], pad_id: int, side: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
    """Lists of ids -> (input_ids, attention_mask), both (B, T_max) LongTensors; mask 1 on real tokens.

    Left padding (the default) is what generation needs; right padding suits training batches.
    """
    if side not in ("left", "right"):
        raise ValueError(f"side={side!r}: expected 'left' or 'right'")
    if not seqs:
        raise ValueError("pad_batch needs at least one sequence")
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        if not s:
            continue
        cols = slice(T - len(s), T) if side == "left" else slice(0, len(s))
        ids[i, cols] = torch.tensor(s, dtype=torch.long)
        mask[i, cols] = 1
    return ids, mask


@torch.no_grad()
def shared_prefix_batch(
    model: nn.Module, seqs: list[list[int]], pad_id: int, max_new_tokens: int, share: bool = True
) -> tuple[torch.Tensor, torch.Tensor, list[KVCache], int]:
    """A batch of prompts whose first tokens are the same for all (a question asked of many items),
    with those tokens run once: -> (input_ids, attention_mask, cache, cached).

    The common first P tokens go through the model as one row; their keys and values are copied into
    every row's cache. Each row holds [the P shared tokens | left padding | its own tokens]: the mask
    hides the padding and positions count real tokens only (`default_positions`), so every token sees
    what it sees in a plain left-padded batch, and its logits agree to float rounding. Continue with
    `generate(input_ids, attention_mask=..., cache=cache, cached=cached)`, or run the rest yourself:
    `model.model(input_ids[:, cached:], attention_mask, cache=cache, cache_start=cached)`.

    input_ids, attention_mask: (B, P + S), S the longest row after its shared tokens; the cache has
    room for max_new_tokens more positions; cached = P. Every row keeps at least its last token
    unshared. A sliding-window model (whose window counts cache slots, padding too), prompts with
    fewer than 2 tokens in common and `share=False` get the plain left-padded batch, an empty cache and
    cached = 0: every prompt from its first token.
    """
    if not seqs or not all(seqs):
        raise ValueError("shared_prefix_batch needs at least one prompt, none of them empty")
    P = 0
    shortest = min(len(s) for s in seqs)
    while P < shortest - 1 and all(s[P] == seqs[0][P] for s in seqs):
        P += 1
    if not share or P < 2 or any(model.config.is_sliding(i) for i in range(model.config.num_hidden_layers)):
        input_ids, mask = pad_batch(seqs, pad_id, side="left")
        return input_ids, mask, KVCache.for_model(model, len(seqs), input_ids.shape[1] + max_new_tokens), 0
    rest, rest_mask = pad_batch([s[P:] for s in seqs], pad_id, side="left")      # (B, S)
    B, S = rest.shape
    prefix = torch.tensor(seqs[0][:P], dtype=torch.long)
    input_ids = torch.cat([prefix.expand(B, P), rest], dim=1)                     # (B, P + S)
    mask = torch.cat([torch.ones(B, P, dtype=torch.long), rest_mask], dim=1)     # (B, P + S)
    device = model.model.embed_tokens.weight.device
    once = KVCache.for_model(model, 1, P)
    model.model(prefix[None].to(device), cache=once)                              # the shared tokens, one row
    cache = KVCache.for_model(model, B, P + S + max_new_tokens)
    for c, o in zip(cache, once):
        c.update(0, o.k.expand(B, -1, -1, -1), o.v.expand(B, -1, -1, -1))        # (B, nkv, P, hs) each
    return input_ids, mask, cache, P


def sample_next(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(B, vocab) logits of the last position -> (B,) next token ids.

    temperature == 0: the most likely token. Otherwise softmax(logits / temperature), keeping only
    the smallest set of most likely tokens whose probabilities reach `top_p` (nucleus sampling).
    """
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p          # mass of the tokens ranked above each one
        sorted_p = sorted_p.masked_fill(before >= top_p, 0.0)  # the top token always survives
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _eos_ids(eos_id, model: nn.Module) -> list[int]:
    eos = eos_id if eos_id is not None else model.config.eos_token_id
    if eos is None:
        return []
    return [int(e) for e in eos] if isinstance(eos, (list, tuple)) else [int(eos)]


@torch.no_grad()
def generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int = 32,
    attention_mask: torch.Tensor | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    eos_id: int | list[int] | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    cache: list[KVCache] | None = None,
    cached: int = 0,
) -> torch.Tensor:
    """Continue (B, T) prompts of `model` (a `Llama`); returns (B, T + n) ids, n <= max_new_tokens.

    attention_mask: (B, T), 1 on real tokens, 0 on left padding. eos_id: defaults to the config's;
    a row that produced it is filled afterwards with the config's pad id (else the first EOS id),
    and generation stops once every row has. temperature == 0 is greedy; otherwise temperature +
    top-p sampling, drawn from `generator`.

    cache, cached: a KV cache per layer (room for T + max_new_tokens positions) whose first `cached`
    positions already hold the keys and values of input_ids[:, :cached]: those are not run again
    (prompts that share a prefix, as the top-k average's candidates share their prompt).
    """
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"temperature={temperature}, top_p={top_p}: expected temperature >= 0 and 0 < top_p <= 1")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
    B, T = input_ids.shape
    device = input_ids.device
    eos = torch.tensor(_eos_ids(eos_id, model), dtype=torch.long, device=device)
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else (int(eos[0]) if len(eos) else 0)

    if cache is not None and (not use_cache or not 0 <= cached < T or cache[0].k.shape[2] < T + max_new_tokens):
        raise ValueError(f"a cache of {cache[0].k.shape[2]} positions, {cached} filled: expected use_cache, "
                         f"0 <= cached < T = {T} and room for T + max_new_tokens = {T + max_new_tokens}")
    if use_cache and cache is None:
        cache = KVCache.for_model(model, B, T + max_new_tokens)

    out = input_ids
    mask = attention_mask
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        if cache is not None:
            # step 0 feeds the prompt (past what is cached); later steps the last token, at position T + step - 1
            start = cached if step == 0 else T + step - 1
            hidden = model.model(out[:, start:], attention_mask=mask, cache=cache, cache_start=start)
        else:
            hidden = model.model(out, attention_mask=mask)                 # (B, t, D)
        # Only the last position picks the next token: the head (D x vocab) runs there alone, not over
        # the whole prompt.
        logits = model.lm_head(hidden[:, -1])                             # (B, vocab)
        nxt = sample_next(logits, temperature, top_p, generator)           # (B,)
        nxt = torch.where(finished, torch.full_like(nxt, pad), nxt)
        out = torch.cat([out, nxt[:, None]], dim=1)                        # (B, T + step + 1)
        if mask is not None:
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        finished |= torch.isin(nxt, eos)
        if finished.all():
            break
    return out
