"""The pricer's prompt and answer, exactly as the course writes them.

    How much does this cost to the nearest dollar?

    <description>

    Price is $123.00

The model sees everything up to `Price is $` (the prompt) and learns to write `123.00` (the answer):
the loss runs on the answer tokens only.
"""
from __future__ import annotations

QUESTION = "How much does this cost to the nearest dollar?"
PREFIX = "Price is $"


def make_prompt(description: str) -> str:
    """The question, a blank line, the description, a blank line, and `Price is $`."""
    return f"{QUESTION}\n\n{description}\n\n{PREFIX}"


def make_answer(price: float) -> str:
    """The price to the nearest dollar with zero cents: 123.4 -> '123.00'."""
    return f"{price:.0f}.00"


def description_of(text: str) -> str:
    """The description inside a text that may already hold the whole prompt and answer.

    The course's prepared data stores `QUESTION\\n\\n<description>\\n\\nPrice is $123.00` in one
    `text` field; a bare description comes back unchanged (stripped).
    """
    if PREFIX in text:
        text = text[: text.rindex(PREFIX)]
    text = text.strip()
    if text.startswith(QUESTION):
        text = text[len(QUESTION):].strip()
    return text
