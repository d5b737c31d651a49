"""Scoring price guesses as the course's Tester does.

    error  = |guess - truth|
    RMSLE  = sqrt(mean((log(truth + 1) - log(guess + 1))²))      relative error, kind to cheap items
    green  : error < $40 or error / truth < 20%   (a hit)
    orange : error < $80 or error / truth < 40%
    red    : otherwise
    hit rate = share of green
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Sequence

from .prompt import PREFIX

GREEN, ORANGE, RED = "green", "orange", "red"
_ANSI = {GREEN: "\033[92m", ORANGE: "\033[93m", RED: "\033[91m"}
_RESET = "\033[0m"
_NUMBER = re.compile(r"[-+]?\d*\.\d+|\d+")


def parse_price(text: str) -> float:
    """The first number in a model's answer: after `Price is $` when the text holds it, commas allowed.

    '$1,299.00' -> 1299.0, '12.5' -> 12.5, '' -> 0.0, 'garbage' -> 0.0 (no number: a guess of 0).
    """
    if PREFIX in text:
        text = text.split(PREFIX, 1)[1]
    match = _NUMBER.search(text.replace(",", ""))
    return float(match.group()) if match else 0.0


def color_for(error: float, truth: float) -> str:
    """green, orange or red by the absolute and the relative error."""
    relative = error / truth if truth else math.inf
    if error < 40 or relative < 0.2:
        return GREEN
    if error < 80 or relative < 0.4:
        return ORANGE
    return RED


def squared_log_error(guess: float, truth: float) -> float:
    """(log(truth + 1) - log(guess + 1))²; a negative guess counts as 0."""
    return (math.log(truth + 1) - math.log(max(guess, 0.0) + 1)) ** 2


@dataclass
class PriceReport:
    """Guesses against truths, item by item, and the three summary figures."""

    guesses: list[float]
    truths: list[float]
    titles: list[str] | None = None

    def __post_init__(self) -> None:
        if len(self.guesses) != len(self.truths) or not self.truths:
            raise ValueError(f"need as many guesses as truths, at least one: got {len(self.guesses)} guesses "
                             f"and {len(self.truths)} truths")
        self.errors = [abs(g - t) for g, t in zip(self.guesses, self.truths)]
        self.colors = [color_for(e, t) for e, t in zip(self.errors, self.truths)]

    @property
    def mean_error(self) -> float:
        return sum(self.errors) / len(self.errors)

    @property
    def rmsle(self) -> float:
        return math.sqrt(sum(squared_log_error(g, t) for g, t in zip(self.guesses, self.truths)) / len(self.truths))

    @property
    def hit_rate(self) -> float:
        """Percentage of green guesses."""
        return 100.0 * self.colors.count(GREEN) / len(self.colors)

    def title(self, name: str = "") -> str:
        """The chart title: `Error=$… RMSLE=… Hits=…%`."""
        head = f"{name} " if name else ""
        return f"{head}Error=${self.mean_error:,.2f} RMSLE={self.rmsle:,.2f} Hits={self.hit_rate:.1f}%"

    def line(self, i: int, color: bool = True) -> str:
        """The course's per-item line, coloured by its verdict."""
        g, t, e = self.guesses[i], self.truths[i], self.errors[i]
        item = (self.titles[i] if self.titles else "")[:40]
        text = (f"{i + 1}: Guess: ${g:,.2f} Truth: ${t:,.2f} Error: ${e:,.2f} "
                f"SLE: {squared_log_error(g, t):,.2f} Item: {item}")
        return f"{_ANSI[self.colors[i]]}{text}{_RESET}" if color else text

    def lines(self, n: int = 20, color: bool = True) -> list[str]:
        return [self.line(i, color) for i in range(min(n, len(self.truths)))]


def score(guesses: Sequence[float], truths: Sequence[float], titles: Sequence[str] | None = None) -> PriceReport:
    return PriceReport([float(g) for g in guesses], [float(t) for t in truths], list(titles) if titles else None)


def constant_baseline(train_prices: Sequence[float], truths: Sequence[float]) -> PriceReport:
    """Guess the mean training price for every item: the floor any model must beat."""
    if not train_prices:
        raise ValueError("the constant baseline needs at least one training price")
    mean = sum(train_prices) / len(train_prices)
    return score([mean] * len(truths), truths)
