"""Where a chat template writes each assistant turn, and the tokens that end a turn.

    spans = assistant_spans(tok, messages)     # [(start, content end, turn end)] character offsets
    end_of_turn_ids(tok)                       # SmolLM2: [2] (<|im_end|>); Llama 3: <|eot_id|>, EOS

The spans come from the rendering itself, for any template: the content of assistant message i is
replaced by a character found nowhere in the text (a sentinel) and the conversation rendered again;
the two renderings differ exactly where the template wrote that content. The end-of-turn is what
follows the sentinel when the conversation is cut after message i: the special tokens written right
after the content (`<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`, `<|end|>`, `</s>`), up to the first
thing that is not a special token. Training labels them (train/chat.py), generation stops at them,
and a GGUF export states them, so that llama.cpp and Ollama stop where the model stops.
"""
from __future__ import annotations

import os
from typing import Sequence

ROLE_ASSISTANT = "assistant"


def _sentinel(*texts: str) -> str:
    """A private-use character that none of the texts holds."""
    for code in range(0xE000, 0xF900):
        if not any(chr(code) in t for t in texts):
            return chr(code)
    raise ValueError("every private-use character occurs in the conversation: no sentinel is left")


def _leading_special(text: str, specials: list[str]) -> list[str]:
    """The special tokens `text` starts with, one after another (longest match first)."""
    out, pos = [], 0
    while True:
        token = next((t for t in specials if t and text.startswith(t, pos)), None)
        if token is None:
            return out
        out.append(token)
        pos += len(token)


def assistant_spans(tokenizer, messages: Sequence[dict], text: str | None = None,
                    **template_kwargs) -> list[tuple[int, int, int]]:
    """(start, content end, turn end) character offsets of each assistant turn in the rendered
    conversation `text`: [start, content end) is the content, [content end, turn end) its end-of-turn."""
    if text is None:
        text = tokenizer.render_chat(messages, **template_kwargs)
    specials = sorted(tokenizer.special_tokens, key=len, reverse=True)
    sentinel = _sentinel(text, *(m.get("content") or "" for m in messages))
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != ROLE_ASSISTANT:
            continue
        marked = [*messages[:i], {**message, "content": sentinel}, *messages[i + 1:]]
        other = tokenizer.render_chat(marked, **template_kwargs)
        if other.count(sentinel) != 1:
            raise ValueError(f"message {i}: the chat template writes an assistant's content {other.count(sentinel)} "
                             "times; only a content written once can be labelled")
        start = len(os.path.commonprefix([text, other]))
        end = len(text) - len(os.path.commonprefix([text[start:][::-1], other[start:][::-1]]))
        # the end-of-turn: the special tokens after the content when the conversation stops here
        last = other if i == len(messages) - 1 else tokenizer.render_chat(marked[:i + 1], **template_kwargs)
        turn_end = end
        for token in _leading_special(last[last.index(sentinel) + 1:], specials):
            if not text.startswith(token, turn_end):
                break
            turn_end += len(token)
        spans.append((start, end, turn_end))
    return spans


def end_of_turn_ids(tokenizer) -> list[int]:
    """The tokens that close an assistant's turn, where a reply stops: those the chat template writes
    right after an assistant's content, then EOS (without a chat template: EOS alone)."""
    eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    if tokenizer.chat_template is None:
        return eos
    probe = [{"role": "user", "content": "?"}, {"role": ROLE_ASSISTANT, "content": "!"}]
    text = tokenizer.render_chat(probe)
    (_, content_end, turn_end), = assistant_spans(tokenizer, probe, text)
    ids = tokenizer.encode(text[content_end:turn_end]) if turn_end > content_end else []
    return list(dict.fromkeys(ids + eos))
