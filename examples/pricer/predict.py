"""Asking the model for prices: batched greedy generation, and the course's top-k average; a chat
model's replies through its own chat template.

Greedy: the prompts go through the model in left-padded batches; with the KV cache each new
token costs one position, and a price needs only a handful of tokens (`max_new_tokens`).

Top-k average (the course's improved predictor): instead of trusting the single most likely
continuation, take the K most likely next tokens, read each as a number, and average them weighted
by their probabilities. Llama 3's tokenizer holds numbers up to 999 as single tokens; tokenizers
that split digits (SmolLM2's) need each candidate's number finished, which is done greedily. The
K candidates of a prompt share its keys and values: the prompt runs through the model once. The
most likely first token finished greedily is greedy decoding's answer, so one pass gives both.

Every pricer prompt opens with the same question (`How much does this cost to the nearest dollar?`
and `Diamond: `, 17 of about 38 tokens): a batch runs those once and copies their keys and values to
every row (`model.shared_prefix_batch`), which takes nearly half the prompt work off each batch.
"""
from __future__ import annotations

from typing import Sequence

import torch

from model import KVCache, end_of_turn_ids, shared_prefix_batch

from .metrics import parse_price


def _batches(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def _prompt_ids(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    # BOS first, as train.build_examples encodes the prompts the model learns from
    return [tokenizer.encode(p, bos=True) for p in prompts]


@torch.no_grad()
def continue_prompts(model, tokenizer, ids: list[list[int]], max_new_tokens: int, batch_size: int,
                     stop_ids: Sequence[int] | None = None, share_prefix: bool = True) -> list[str]:
    """Greedy continuations (text of the new tokens only, up to the first stop token) of tokenized
    prompts; `stop_ids` defaults to EOS. `share_prefix`: the batch's common first tokens run once."""
    stop = list(stop_ids) if stop_ids is not None else [t for t in (tokenizer.eos_id,) if t is not None]
    device = next(model.parameters()).device
    texts: list[str] = []
    for rows in _batches(len(ids), batch_size):
        input_ids, mask, cache, cached = shared_prefix_batch(model, ids[rows], tokenizer.pad_id, max_new_tokens,
                                                             share_prefix)   # (B, T), the first `cached` columns cached
        out = model.generate(input_ids.to(device), max_new_tokens=max_new_tokens, attention_mask=mask.to(device),
                             temperature=0.0, eos_id=stop or None, cache=cache, cached=cached)
        new = out[:, input_ids.shape[1]:].tolist()                                # (B, n <= max_new_tokens)
        texts += [tokenizer.decode(_until(row, stop)) for row in new]
    return texts


def chat_replies(model, tokenizer, conversations: Sequence[Sequence[dict]], max_new_tokens: int,
                 batch_size: int = 64) -> list[str]:
    """The model's reply to each conversation, as a chat user gets it: the conversation written by the
    model's chat template with the assistant's header after it (`add_generation_prompt=True`),
    continued greedily up to the end of the assistant's turn (`end_of_turn_ids`)."""
    model.eval()
    ids = [tokenizer.apply_chat_template(list(c), add_generation_prompt=True) for c in conversations]
    return continue_prompts(model, tokenizer, ids, max_new_tokens, batch_size, end_of_turn_ids(tokenizer))


def greedy_prices(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 6,
                  batch_size: int = 64, share_prefix: bool = True) -> tuple[list[float], list[str]]:
    """(prices, raw answers): the first number the model writes after each `Price is $`."""
    model.eval()
    texts = continue_prompts(model, tokenizer, _prompt_ids(tokenizer, prompts), max_new_tokens, batch_size,
                             share_prefix=share_prefix)
    return [parse_price(t) for t in texts], texts


def top_k_average_prices(model, tokenizer, prompts: Sequence[str], k: int = 3, max_new_tokens: int = 6,
                         batch_size: int = 64) -> list[float]:
    """For each prompt: sum_i p_i · number_i / sum_i p_i over the K most likely next tokens whose
    number (the token, finished greedily) is positive; 0 when none is."""
    return greedy_and_top_k_prices(model, tokenizer, prompts, k, max_new_tokens, batch_size)[1]


@torch.no_grad()
def greedy_and_top_k_prices(model, tokenizer, prompts: Sequence[str], k: int = 3, max_new_tokens: int = 6,
                            batch_size: int = 64, share_prefix: bool = True) -> tuple[list[float], list[float]]:
    """(greedy prices, top-k averages) in one pass: the first candidate (the most likely first token,
    finished greedily) is what `greedy_prices` answers; the K candidates give the top-k average.
    `share_prefix`: the question every prompt opens with runs once a batch (`shared_prefix_batch`)."""
    if k < 1:
        raise ValueError(f"top-k average needs k >= 1, got {k}")
    model.eval()
    device = next(model.parameters()).device
    ids = _prompt_ids(tokenizer, prompts)
    greedy: list[float] = []
    prices: list[float] = []
    stop = [t for t in (tokenizer.eos_id,) if t is not None]
    for rows in _batches(len(ids), batch_size):
        input_ids, mask, cache, cached = shared_prefix_batch(model, ids[rows], tokenizer.pad_id, max_new_tokens,
                                                             share_prefix)   # (B, T), the first `cached` columns cached
        input_ids, mask = input_ids.to(device), mask.to(device)
        B, T = input_ids.shape
        hidden = model.model(input_ids[:, cached:], attention_mask=mask, cache=cache,
                             cache_start=cached)[:, -1]                          # (B, D), the prompts cached
        probs = torch.softmax(model.lm_head(hidden).float(), dim=-1)             # (B, V)
        top_p, top_id = probs.topk(k, dim=-1)                                    # (B, K)
        rest, tokens = [""] * (B * k), [[] for _ in range(B * k)]
        if max_new_tokens > 1:  # each candidate: its prompt (cached, K copies) and first token, finished greedily
            shared = [KVCache(c.k.repeat_interleave(k, 0), c.v.repeat_interleave(k, 0)) for c in cache]
            candidates = torch.cat([input_ids.repeat_interleave(k, 0), top_id.reshape(-1, 1)], 1)   # (B*K, T+1)
            mask = torch.nn.functional.pad(mask.repeat_interleave(k, 0), (0, 1), value=1)            # (B*K, T+1)
            tokens = model.generate(candidates, max_new_tokens=max_new_tokens - 1, attention_mask=mask,
                                    eos_id=stop or None, cache=shared, cached=T)[:, T + 1:].tolist()
            rest = [tokenizer.decode(_until(row, stop)) for row in tokens]
        numbers = [parse_price(tokenizer.decode([int(t)]) + r)
                   for t, r in zip(top_id.flatten().tolist(), rest)]
        # greedy: the first candidate's tokens, read as `greedy_prices` reads a continuation
        greedy += [parse_price(tokenizer.decode(_until([int(top_id[b, 0])] + tokens[b * k], stop))) for b in range(B)]
        for b in range(B):
            pairs = [(numbers[b * k + j], top_p[b, j].item()) for j in range(k) if numbers[b * k + j] > 0]
            weight = sum(p for _, p in pairs)
            prices.append(sum(n * p for n, p in pairs) / weight if pairs else 0.0)
    return greedy, prices


def _until(ids: list[int], stop: Sequence[int]) -> list[int]:
    """`ids` up to (not including) the first stop token."""
    return ids[:next((i for i, t in enumerate(ids) if t in stop), len(ids))]
