"""Preference data for DPO: a prompt, the completion preferred (chosen) and the one not (rejected).

The rows are TRL's preference formats, as Python dicts or JSON Lines:

    {"prompt": "...", "chosen": "...", "rejected": "..."}                    text
    {"prompt": [messages], "chosen": [messages], "rejected": [messages]}    conversations, in the chat template
    {"chosen": ..., "rejected": ...}                                         the prompt implicit: their common start

Text: the prompt starts with BOS, each completion ends with EOS, each tokenized on its own (as
`build_examples` does: the prompt's tokens are those the model sees when it continues the prompt).
Conversations: the prompt is the template's rendering with the generation prompt; a completion is what
the whole conversation adds after it. Only the completions are labelled: the prompt never is.

A bad row stops the reading with ValueError naming it (`path:line` or `train_items[i]`): not an
object, a missing key, the chosen completion equal to the rejected one (nothing to prefer), or a
prompt that leaves no room for a completion within max_len.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch

from .chat import check_conversation
from .data import IGNORE_INDEX, Example, collate
from .jsonl import read_jsonl_records


@dataclass
class PreferencePair:
    """One tokenized pair: prompt_ids + chosen_ids and prompt_ids + rejected_ids are the two rows."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    source: str = ""                      # where it was read: named in errors

    @property
    def input_ids(self) -> list[int]:
        """The longer row (the data plan orders and buckets by its length)."""
        longer = max(self.chosen_ids, self.rejected_ids, key=len)
        return self.prompt_ids + longer


def jsonl_rows(path: str) -> Iterator[tuple[str, object]]:
    """('path:line', value) for each non-blank line of a JSON Lines file."""
    return ((f"{path}:{n}", record) for n, record in read_jsonl_records(path))


def named_rows(items: Sequence, name: str) -> Iterator[tuple[str, object]]:
    """(where it came from, item): a row's own `source` when it has one, else `name[i]`."""
    return ((getattr(item, "source", "") or f"{name}[{i}]", item) for i, item in enumerate(items))


def build_rows(rows: Iterable[tuple[str, object]], make: Callable[[object], Any]) -> list:
    """make(item) for each (source, item), its ValueError prefixed by the source, the source kept on the row."""
    out = []
    for source, item in rows:
        try:
            row = make(item)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None
        row.source = source
        out.append(row)
    return out


def split_implicit_prompt(chosen, rejected) -> tuple:
    """(prompt, chosen, rejected) from two completions that share their start: the common messages of
    two conversations, or the common characters of two texts (a space before the split goes with the
    completions)."""
    n = _common_prefix(chosen, rejected)
    if isinstance(chosen, str) and 0 < n < min(len(chosen), len(rejected)) and chosen[n - 1] == " ":
        n -= 1
    return chosen[:n], chosen[n:], rejected[n:]


def _common_prefix(a: Sequence, b: Sequence) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _check_parts(record: dict) -> bool:
    """True for conversations (every part a list of messages), False for text; ValueError otherwise."""
    kinds = {key: type(record[key]).__name__ for key in ("prompt", "chosen", "rejected")}
    if set(kinds.values()) not in ({"str"}, {"list"}):
        raise ValueError("prompt, chosen and rejected must all be strings or all lists of messages; here "
                         + ", ".join(f"{k} is a {v}" for k, v in kinds.items()))
    if kinds["chosen"] == "list":
        for key in ("chosen", "rejected"):
            check_conversation(record["prompt"] + record[key])
    return kinds["chosen"] == "list"


def tokenize_pair(tokenizer, record: dict, max_len: int | None = None, add_eos: bool = True) -> PreferencePair:
    """One row (any of the three formats) as token ids; ValueError says what is wrong with it."""
    for key in ("chosen", "rejected"):
        if key not in record:
            raise ValueError(f"missing key '{key}': a preference row holds 'chosen' and 'rejected' (and 'prompt'); "
                             f"it has keys {sorted(record)}")
    chosen, rejected = record["chosen"], record["rejected"]
    prompt = record["prompt"] if "prompt" in record else None
    if prompt is None:
        prompt, chosen, rejected = split_implicit_prompt(chosen, rejected)
        record = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    if _check_parts(record):
        prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True)
        full_c, full_r = (tokenizer.apply_chat_template(prompt + c) for c in (chosen, rejected))
        n = min(_common_prefix(prompt_ids, full_c), _common_prefix(prompt_ids, full_r))
        prompt_ids, chosen_ids, rejected_ids = prompt_ids[:n], full_c[n:], full_r[n:]
    else:
        prompt_ids = list(tokenizer.encode(prompt, bos=True))
        chosen_ids, rejected_ids = (list(tokenizer.encode(c, bos=False)) for c in (chosen, rejected))
        eos = tokenizer.eos_id
        if add_eos and eos is not None:
            chosen_ids, rejected_ids = (ids if ids[-1:] == [eos] else ids + [eos] for ids in (chosen_ids, rejected_ids))
    if max_len is not None:
        room = max_len - len(prompt_ids)
        chosen_ids, rejected_ids = chosen_ids[:max(room, 0)], rejected_ids[:max(room, 0)]  # their ends cut
    return _checked(PreferencePair(prompt_ids, chosen_ids, rejected_ids), max_len)


def _checked(pair: PreferencePair, max_len: int | None) -> PreferencePair:
    """The pair, or ValueError: a prompt with no room for a completion, an empty completion, or none to prefer."""
    if max_len is not None and len(pair.prompt_ids) >= max_len:
        raise ValueError(f"the prompt's {len(pair.prompt_ids)} tokens leave no room for a completion within "
                         f"max_len={max_len}: shorten the prompt or raise max_len")
    if not pair.chosen_ids or not pair.rejected_ids:
        raise ValueError("a completion is empty: there is nothing to compare")
    if pair.chosen_ids == pair.rejected_ids:
        raise ValueError(f"chosen and rejected are the same completion ({len(pair.chosen_ids)} tokens"
                         + (f" within max_len={max_len}" if max_len is not None else "")
                         + "): a pair must differ for DPO to prefer one")
    return pair


def preference_pairs(tokenizer, items: Sequence, max_len: int | None = None, add_eos: bool = True,
                     name: str = "train_items") -> list[PreferencePair]:
    """Rows (dicts in TRL's formats, or `PreferencePair`s already tokenized) as pairs; a bad row raises
    ValueError naming it (`name[i]`, or the `path:line` a pair was read from)."""
    return build_rows(named_rows(items, name), lambda item: _pair(tokenizer, item, max_len, add_eos))


def load_preference_jsonl(path: str, tokenizer, max_len: int | None = None, add_eos: bool = True
                          ) -> list[PreferencePair]:
    """A JSON Lines file of preference rows as pairs; a bad line raises ValueError `path:line: ...`."""
    return build_rows(jsonl_rows(path), lambda item: _pair(tokenizer, item, max_len, add_eos))


def _pair(tokenizer, item, max_len: int | None, add_eos: bool) -> PreferencePair:
    if isinstance(item, PreferencePair):
        return _checked(item, max_len)
    if not isinstance(item, dict):
        raise ValueError(f"expected an object with 'prompt', 'chosen' and 'rejected', got {type(item).__name__}")
    return tokenize_pair(tokenizer, item, max_len, add_eos)


def completion_batch(rows: Sequence[tuple[list[int], list[int]]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """(prompt ids, completion ids) rows, right-padded: input_ids and labels (R, T), labels -100 on the
    prompts and the padding: only the completions are scored, never the prompt."""
    batch = collate([Example(prompt + completion, [IGNORE_INDEX] * len(prompt) + completion)
                     for prompt, completion in rows], pad_id)
    return {"input_ids": batch["input_ids"], "labels": batch["labels"]}


def preference_batch(pairs: Sequence[PreferencePair], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """The B pairs as one batch of 2B rows, the chosen rows first, then the rejected (`completion_batch`),
    and lengths (2B,): the tokens of each completion (IPO's length normalisation)."""
    rows = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
    batch = completion_batch(rows, pad_id)
    batch["lengths"] = torch.tensor([len(c) for _, c in rows], dtype=torch.float32)
    return batch
