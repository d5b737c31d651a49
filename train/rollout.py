"""GRPO's sampling step: G completions of each prompt from the current policy, and their rewards.

The prompts are rows of TRL's prompt-only format, Python dicts or JSON Lines: {"prompt": text or a
list of messages, ...any other fields}. Text starts with BOS; messages go through the chat template
with its generation prompt. A reward is a Python callable called once per completion as

    reward(prompt, completion, **fields) -> float

with the row's prompt as given, the completion's text (without its end-of-sequence token or any other
special token, as TRL decodes it), and the row's other fields as keywords (a price, a test case, a reference answer). Several functions are summed.
A function that raises, or returns anything but a finite number, stops the run with `RewardError`
naming the function and the row.

The completions are drawn by `model.generate` (the KV cache: the prompt runs once, each new token
alone), from the model itself in eval mode: the adapter the learner will update this step, no copy.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn

from model.generate import generate, shared_prefix_batch

from .preference import build_rows, jsonl_rows, named_rows
from .validation import evaluating

RESERVED = ("prompt", "completion")   # passed positionally: a row's other fields may not take these names


class RewardError(ValueError):
    """A reward function raised or returned something other than a finite number."""


@dataclass
class PromptRow:
    """One prompt: its tokens, the prompt as the row gave it, and the row's other fields."""

    input_ids: list[int]
    prompt: str | list[dict]
    fields: dict = field(default_factory=dict)
    source: str = ""                       # where it was read: named in errors


def prompt_row(tokenizer, record: dict, max_len: int | None = None, max_new_tokens: int = 0) -> PromptRow:
    """One row as a `PromptRow`; ValueError says what is wrong with it."""
    if not isinstance(record, dict) or "prompt" not in record:
        got = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise ValueError(f"a prompt row is an object with a 'prompt' (text or messages); got {got}")
    if "completion" in record:
        raise ValueError("'completion' is the reward's second argument: a prompt row may not hold a field of that name")
    prompt = record["prompt"]
    if isinstance(prompt, str):
        ids = list(tokenizer.encode(prompt, bos=True))
    elif isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
        ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True)
    else:
        raise ValueError(f"'prompt' must be a string or a non-empty list of messages, got {type(prompt).__name__}")
    return _with_room(PromptRow(ids, prompt, {k: v for k, v in record.items() if k not in RESERVED}), max_len,
                      max_new_tokens)


def _with_room(row: PromptRow, max_len: int | None, max_new_tokens: int) -> PromptRow:
    if max_len is not None and len(row.input_ids) + max_new_tokens > max_len:
        raise ValueError(f"the prompt's {len(row.input_ids)} tokens leave no room for {max_new_tokens} new tokens "
                         f"within max_len={max_len}: shorten the prompt, or raise max_len or lower max_new_tokens")
    return row


def prompt_rows(tokenizer, items: Sequence, max_len: int | None = None, max_new_tokens: int = 0,
                name: str = "train_items") -> list[PromptRow]:
    """Rows (dicts, or `PromptRow`s already made) as `PromptRow`s; a bad row raises ValueError naming it
    (`name[i]`, or the `path:line` it was read from)."""
    return build_rows(named_rows(items, name), lambda item: _row(tokenizer, item, max_len, max_new_tokens))


def load_prompt_jsonl(path: str, tokenizer, max_len: int | None = None, max_new_tokens: int = 0) -> list[PromptRow]:
    """A JSON Lines file of prompt rows; a bad line raises ValueError `path:line: ...`."""
    return build_rows(jsonl_rows(path), lambda item: _row(tokenizer, item, max_len, max_new_tokens))


def _row(tokenizer, item, max_len: int | None, max_new_tokens: int) -> PromptRow:
    if not isinstance(item, PromptRow):
        return prompt_row(tokenizer, item, max_len, max_new_tokens)
    return _with_room(item, max_len, max_new_tokens)


def reward_name(function: Callable) -> str:
    return getattr(function, "__qualname__", None) or getattr(function, "__name__", None) or repr(function)


def score(rewards: Sequence[Callable], row: PromptRow, completion: str) -> float:
    """The sum of the reward functions on one completion; RewardError names the function and the row."""
    total = 0.0
    for function in rewards:
        name = reward_name(function)
        try:
            value = function(row.prompt, completion, **row.fields)
        except Exception as e:
            raise RewardError(f"reward function {name} raised {type(e).__name__}: {e} (on {row.source}, completion "
                              f"{completion[:80]!r})") from e
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise RewardError(f"reward function {name} returned {value!r} on {row.source} (completion "
                              f"{completion[:80]!r}): expected a finite number")
        total += float(value)
    return total


@torch.no_grad()
def sample_completions(model: nn.Module, rows: Sequence[PromptRow], group_size: int, max_new_tokens: int,
                       eos_ids: list[int], pad_id: int, temperature: float = 1.0, top_p: float = 1.0,
                       generator: torch.Generator | None = None) -> list[list[int]]:
    """group_size completions of each prompt (row by row: the G of the first prompt, then the next),
    each up to and including its first end-of-sequence token, drawn with the KV cache."""
    seqs = [row.input_ids for row in rows for _ in range(group_size)]
    with evaluating(model):  # the policy itself: no dropout while it answers
        input_ids, mask, cache, cached = shared_prefix_batch(model, seqs, pad_id, max_new_tokens)
        device = model.model.embed_tokens.weight.device
        out = generate(model, input_ids.to(device), max_new_tokens, attention_mask=mask.to(device),
                       temperature=temperature, top_p=top_p, eos_id=eos_ids, generator=generator, cache=cache,
                       cached=cached)
    completions = []
    for new in out[:, input_ids.shape[1]:].tolist():
        end = next((i + 1 for i, t in enumerate(new) if t in eos_ids), len(new))
        completions.append(new[:end])
    return completions
