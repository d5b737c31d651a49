"""The diamonds as a chat: a customer describes a diamond in a sentence and asks its price; the
assistant answers it as a person would.

    user:      How much is a 0.23 carat diamond, Ideal cut, color E, clarity SI2?
    assistant: About $326.

The data of `python examples/finetune.py` when it is given no --model and no --data: the demo written
as a chat. The diamonds are the pricer's (`diamond_rows`, in file order, the rows `load_source` reads)
and are split as `make demo` splits them (`split_items` with the demo's seed, `DEMO_SEED`, and the
sizes of `PRESETS["demo"]`: finetune.py's defaults), so the held-out diamonds are the demo's. Each conversation goes through the
model's own chat template, the loss on the assistant's answer and its end-of-turn token only
(`train.chat_example`); the answer is read back by the pricer's `parse_price` (the first number,
commas dropped: 'About $1,234.' -> 1234.0) and scored by its metrics.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Sequence

from .data import diamond_rows
from .metrics import PriceReport, parse_price, score
from .predict import chat_replies

# Three ways of asking, taken in turn, each naming the four Cs in the same order.
QUESTIONS = (
    "How much is a {carat} carat diamond, {cut} cut, color {color}, clarity {clarity}?",
    "I'm looking at a {carat} carat diamond: {cut} cut, color {color}, clarity {clarity}. What should it cost?",
    "What would you pay for a {carat} carat diamond of {cut} cut, color {color} and clarity {clarity}?",
)


def price_answer(price: float) -> str:
    """The assistant's answer: the price to the nearest dollar, with thousands separated: 1234.4 -> 'About $1,234.'"""
    return f"About ${price:,.0f}."


@dataclass(frozen=True)
class DiamondChat:
    """One diamond as a conversation: the customer's question and the true price."""

    question: str
    price: float

    @property
    def prompt(self) -> list[dict]:
        """The conversation up to the answer: what the model is asked."""
        return [{"role": "user", "content": self.question}]

    @property
    def messages(self) -> list[dict]:
        """The whole conversation, the answer included: what the model learns from."""
        return self.prompt + [{"role": "assistant", "content": price_answer(self.price)}]


def load_diamond_chats(path: str | None = None) -> list[DiamondChat]:
    """Every usable diamond (`diamond_rows`) as a DiamondChat, the questions' wording taken in turn."""
    return [DiamondChat(QUESTIONS[i % len(QUESTIONS)].format(**row), price)
            for i, (row, price) in enumerate(diamond_rows(path))]


def answer_budget(tokenizer, chats: Sequence[DiamondChat]) -> int:
    """New tokens enough for the longest answer among `chats` and the token that ends the turn."""
    return max(len(tokenizer.encode(price_answer(c.price))) for c in chats) + 1


def evaluate_chat_prices(model, tokenizer, chats: Sequence[DiamondChat], max_new_tokens: int,
                         batch_size: int = 64) -> tuple[PriceReport, list[str]]:
    """(report, replies): each question asked through the chat template (`chat_replies`, greedy), the
    first number of the reply taken as the guess and scored against the truth."""
    replies = chat_replies(model, tokenizer, [c.prompt for c in chats], max_new_tokens, batch_size)
    return score([parse_price(r) for r in replies], [c.price for c in chats], [c.question for c in chats]), replies


def write_chats_jsonl(chats: Sequence[DiamondChat], path: str) -> str:
    """The conversations as JSON Lines in OpenAI's shape, `{"messages": [...]}` a line (a temporary
    name, then renamed): the file `finetune.py --data` reads."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for c in chats:
            f.write(json.dumps({"messages": c.messages}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path
