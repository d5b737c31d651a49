"""Your own data: JSON Lines files of conversations, in the three shapes datasets come in.

One JSON object per line (blank lines are skipped); each becomes a conversation, a list of
{"role", "content"} messages:

    {"messages": [{"role": "system", "content": "..."}, {"role": "user", ...}, {"role": "assistant", ...}]}
        OpenAI's chat shape; other keys of the object are ignored, a message's other keys
        (`tool_calls`, `name`, ...) reach the template.
    {"prompt": "...", "completion": "..."}
        -> user: prompt, assistant: completion (each may also be a list of messages).
    {"instruction": "...", "input": "...", "output": "...", "system": "..."}
        Alpaca's: -> user: the instruction, then a blank line and the input when it is not empty;
        assistant: the output; a system message first when "system" is given.

    data = load_chat_jsonl("train.jsonl", tok, max_len=1024, overlong="truncate")
    train(model, tok, data.examples, None, config)      # labels on the assistant turns only

A bad line stops the reading with `path:line: what is wrong` (ValueError): not JSON, not an
object, no known shape or a missing key, an empty conversation, a message without a role or
content, no assistant turn, or a conversation the chat template refuses (its raise_exception).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Iterator

from .chat import check_conversation, chat_example
from .data import Example

OVERLONG = ("truncate", "skip")


@dataclass
class ChatData:
    """What `load_chat_jsonl` read: the examples, and how many conversations were cut or left out."""

    examples: list[Example] = field(default_factory=list)
    truncated: int = 0     # longer than max_len: cut to their first max_len tokens, still learnt from
    skipped: int = 0       # longer than max_len with overlong="skip", or cut before any assistant token


def to_conversation(record: object) -> list[dict]:
    """The conversation of one JSON record in any of the three shapes (ValueError naming what is wrong)."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
    elif "prompt" in record or "completion" in record:
        messages = _turn("prompt", record, "user") + _turn("completion", record, "assistant")
    elif "instruction" in record or "output" in record:
        user = _text("instruction", record)
        extra = record.get("input", "")
        if not isinstance(extra, str):
            raise ValueError(f"'input' must be a string, got {type(extra).__name__}")
        if extra.strip():
            user += "\n\n" + extra
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": _text("output", record)}]
        if record.get("system") is not None:
            messages.insert(0, {"role": "system", "content": _text("system", record)})
    else:
        raise ValueError("expected 'messages', 'prompt' and 'completion', or 'instruction' and 'output'; "
                         f"the object has keys {sorted(record)}")
    check_conversation(messages)
    return list(messages)


def _text(key: str, record: dict) -> str:
    if key not in record:
        raise ValueError(f"missing key '{key}'")
    if not isinstance(record[key], str):
        raise ValueError(f"'{key}' must be a string, got {type(record[key]).__name__}")
    return record[key]


def _turn(key: str, record: dict, role: str) -> list[dict]:
    """A prompt or completion: a string (one message of `role`) or a list of messages."""
    if isinstance(record.get(key), list):
        return record[key]
    return [{"role": role, "content": _text(key, record)}]


def read_jsonl_records(path: str) -> Iterator[tuple[int, object]]:
    """(line number, parsed JSON value) for each non-blank line of a JSON Lines file; a line that is not
    JSON raises ValueError `path:line: not valid JSON (...)`."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None


def read_jsonl_conversations(path: str) -> Iterator[tuple[int, list[dict]]]:
    """(line number, conversation) for each non-blank line of a JSON Lines file."""
    for n, record in read_jsonl_records(path):
        try:
            yield n, to_conversation(record)
        except ValueError as e:
            raise ValueError(f"{path}:{n}: {e}") from None


def load_chat_jsonl(path: str, tokenizer, max_len: int | None = None, overlong: str = "truncate",
                    **template_kwargs) -> ChatData:
    """A JSON Lines file as `Example`s for `tokenizer` (`train.chat_example`: its chat template,
    labels on the assistant turns), with the counts of conversations cut and left out.

    overlong: what to do with a conversation longer than `max_len` tokens: "truncate" keeps its first
    max_len tokens (counted in `truncated`; if no assistant token is left it is skipped instead),
    "skip" leaves it out (counted in `skipped`).
    """
    if overlong not in OVERLONG:
        raise ValueError(f"overlong must be one of {OVERLONG}, got {overlong!r}")
    if max_len is not None and max_len < 2:
        raise ValueError(f"max_len must be at least 2, got {max_len}")
    data = ChatData()
    for n, messages in read_jsonl_conversations(path):
        try:
            example = chat_example(tokenizer, messages, **template_kwargs)
        except ValueError as e:  # the template refused it (model.ChatTemplateError), or a content twice
            raise ValueError(f"{path}:{n}: {e}") from None
        if max_len is not None and len(example.input_ids) > max_len:
            if overlong == "skip":
                data.skipped += 1
                continue
            example = example.cut(max_len)
            if example.n_answer_tokens == 0:
                data.skipped += 1
                continue
            data.truncated += 1
        data.examples.append(example)
    return data
