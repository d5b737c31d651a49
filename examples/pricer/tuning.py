"""The pricer learns from its own answers: pairs from its misses (DPO), a reward from its error (GRPO).

    pairs = miss_pairs(items, texts)          # chosen: the true price; rejected: what the model answered, where it missed
    rows = reward_rows(items)                 # {"prompt": ..., "price": ...}: what GRPO samples and price_reward scores
    price_reward(prompt, "1,234.00", price=1200.0)   # −|log ratio| (at least −3) + a bonus for a hit; −4: no number

A rejected answer is written as the answers the model was trained on are (`make_answer`: '412.00'), so a
pair differs in its price alone, not in how the price is written.
"""
from __future__ import annotations

import math
import random
import re
from typing import Sequence

from .chat import DiamondChat, price_answer
from .data import Item
from .metrics import GREEN, color_for, parse_price
from .prompt import make_answer

HIT_BONUS = 0.5          # on top of −|log ratio| for an answer within $40 or 20% of the truth
WORST = -3.0             # −|log ratio| is held above this: a guess 20 times off (log 20 ≈ 3) or worse
NO_NUMBER = -4.0         # an answer without a number: below any number


def price_reward(prompt, completion: str, price: float, **_) -> float:
    """max(−|log((guess + 1) / (price + 1))|, WORST), plus HIT_BONUS for a hit; NO_NUMBER when no number
    is written."""
    if not re.search(r"\d", completion):
        return NO_NUMBER
    guess = max(parse_price(completion), 0.0)
    reward = max(-abs(math.log((guess + 1) / (price + 1))), WORST)
    return reward + (HIT_BONUS if color_for(abs(guess - price), price) == GREEN else 0.0)


def miss_pairs(items: Sequence[Item], answers: Sequence[str]) -> list[dict]:
    """A preference row for each item the model missed: chosen the true price, rejected its own price."""
    pairs = []
    for item, text in zip(items, answers):
        guess = parse_price(text)
        if color_for(abs(guess - item.price), item.price) != GREEN and make_answer(guess) != item.answer:
            pairs.append({"prompt": item.prompt, "chosen": item.answer, "rejected": make_answer(guess)})
    return pairs


def reward_rows(items: Sequence[Item]) -> list[dict]:
    """GRPO's prompt rows: the prompt, and the price the reward compares each answer with."""
    return [{"prompt": item.prompt, "price": item.price} for item in items]


def diamond_chat_pairs(chats: Sequence[DiamondChat], seed: int) -> list[dict]:
    """The diamonds as a chat, as preference rows: chosen the true price's answer, rejected an answer half
    or twice the price (drawn from `seed`): always a miss, written as the answers are."""
    draw = random.Random(seed)
    return [{"prompt": c.prompt, "chosen": [{"role": "assistant", "content": price_answer(c.price)}],
             "rejected": [{"role": "assistant", "content": price_answer(c.price * draw.choice((0.5, 2.0)))}]}
            for c in chats]


def diamond_chat_rows(chats: Sequence[DiamondChat], seed: int | None = None) -> list[dict]:
    """The diamonds as a chat, as GRPO's prompt rows: the question, and the price `price_reward` reads."""
    return [{"prompt": c.prompt, "price": c.price} for c in chats]
