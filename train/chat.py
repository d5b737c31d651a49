"""Chat data: one conversation -> one Example that learns the assistant's turns and nothing else.

    messages = [{"role": "system", "content": "..."}, {"role": "user", "content": "..."},
                {"role": "assistant", "content": "..."}, ...]
    example = chat_example(tok, messages)

The conversation is written by the model's own chat template (`Tokenizer.render_chat`) and the text
is tokenized once, so every token, the boundaries included, is the one transformers'
`apply_chat_template` gives and the model sees when it is prompted. The labels are the input ids on

  - each assistant message's content, as the template writes it (trimmed, where the template trims);
  - its end-of-turn: the special tokens the template writes right after that content when the
    conversation ends with this turn (`<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`, `<|end|>`, `</s>`),
    up to the first thing that is not a special token. So the newline after `<|im_end|>` is not
    learnt, nor Phi-3's final `<|endoftext|>` after that newline, nor `<|start_header_id|>` of the
    turn that follows `<|eot_id|>`: the model learns to close its turn, not to open the next one;

and -100 everywhere else: system, user and tool turns, the role headers and generation prompts the
template writes, separators. A token that holds characters of the content and of a header (a
merge across the boundary) counts as content.

The spans come from the rendering itself, for any template (`model.assistant_spans`): the content of assistant message i is
replaced by a character found nowhere in the text (a sentinel) and the conversation rendered again;
the two renderings differ exactly where the template wrote that content. The end-of-turn is what
follows the sentinel when the conversation is cut after message i. A template that writes a
content twice, or not at all, is an error. Structured `tool_calls` are rendered but not learnt:
only contents are.
"""
from __future__ import annotations

from typing import Sequence

from model import assistant_spans
from model.chat_turns import ROLE_ASSISTANT

from .data import IGNORE_INDEX, Example


def check_conversation(messages: object) -> None:
    """ValueError unless `messages` is a non-empty list of {"role": str, "content": str} dicts with an
    assistant message (an assistant's content may be None or absent when it has `tool_calls`)."""
    if not isinstance(messages, (list, tuple)):
        raise ValueError(f"a conversation must be a list of messages, got {type(messages).__name__}")
    if not messages:
        raise ValueError("the conversation is empty (no messages)")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"message {i} is a {type(m).__name__}, not an object with 'role' and 'content'")
        if not isinstance(m.get("role"), str):
            raise ValueError(f"message {i} has no 'role' string" + (f" (role: {m['role']!r})" if "role" in m else ""))
        calls_tools = m["role"] == ROLE_ASSISTANT and m.get("content") is None and m.get("tool_calls")
        if not isinstance(m.get("content"), str) and not calls_tools:
            raise ValueError(f"message {i} ({m['role']}) has no 'content' string"
                             + (" (only an assistant's may be left out, for tool_calls)" if m.get("tool_calls") else ""))
    if not any(m["role"] == ROLE_ASSISTANT for m in messages):
        raise ValueError("the conversation has no assistant message to learn from")


def chat_example(tokenizer, messages: Sequence[dict], max_len: int | None = None, **template_kwargs) -> Example:
    """One conversation as an Example: labels on the assistant contents and their end-of-turn tokens.

    `template_kwargs` reach the template (e.g. `enable_thinking=False`); `max_len` keeps the first
    max_len tokens (the end of the conversation is cut). Raises ValueError for a malformed
    conversation, and `model.ChatTemplateError` (a ValueError) when the template refuses it.
    """
    check_conversation(messages)
    text = tokenizer.render_chat(messages, **template_kwargs)
    spans = [(start, stop) for start, _, stop in assistant_spans(tokenizer, messages, text, **template_kwargs)]
    ids, offsets = tokenizer.encode_with_offsets(text)

    def learnt(lo: int, hi: int) -> bool:  # overlaps a span; a zero-width token belongs where it stands
        return any((lo < b and hi > a) or (lo == hi and a <= lo < b) for a, b in spans)

    labels = [t if learnt(lo, hi) else IGNORE_INDEX for t, (lo, hi) in zip(ids, offsets)]
    return Example(ids, labels).cut(max_len)
