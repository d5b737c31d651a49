"""Packing: whole examples laid end to end in rows of `max_len` tokens, so a batch is (almost) all tokens.

A padded batch of short and long examples is mostly padding: every row is as long as its longest
example, and the model runs over the padding all the same. Packing fills each row instead:

    examples of 9, 7, 5, 4, 3 and 2 tokens, max_len 12, best-fit decreasing:
        row 0   [9 tokens ······· | 3 ·· ]           the longest first; each example goes to the row
        row 1   [7 tokens ····· | 5 ···· ]           whose free space fits it most tightly
        row 2   [4 ··· | 2 · | pad × 6   ]
    position_ids  0 1 ... 8 0 1 2 | 0 1 ... 6 0 ... 4 | 0 1 2 3 0 1 | 0 ... 5

Position ids restart at 0 at each example: the model lets no token attend across a 0
(model/attention.py) and the loss never predicts an example's first token from the last token of
the one before (train/loss.py), so every example gets exactly the logits and gradients it would
get alone. A row shorter than the longest of its batch ends in padding: labels -100, positions
from 0 (a document of its own, which no token of an example attends).

The rows of an epoch are a function of (seed, epoch) alone, like `epoch_batches`, so resuming is
exact: the examples are shuffled, packed (equal lengths keep their shuffled order, so rows differ
from epoch to epoch), and the rows shuffled. The number of rows depends on the lengths only.
"""
from __future__ import annotations

import bisect
from typing import Sequence

import torch

from .data import IGNORE_INDEX, Example


def best_fit_decreasing(lengths: Sequence[int], capacity: int, order: Sequence[int] | None = None) -> list[list[int]]:
    """Pack items into rows of `capacity`: longest first, each into the fullest row it still fits.

    Returns rows as lists of item indices, every index exactly once. `order`: the items' order among
    equal lengths (default 0, 1, 2, ...). Best-fit decreasing needs asymptotically at most 11/9 of
    the fewest rows possible (Johnson, 1973); with many short items the rows come out nearly full.
    """
    idx = sorted(order if order is not None else range(len(lengths)), key=lambda i: -lengths[i])  # stable
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, row), sorted: the tightest fit is the first with space >= n
    for i in idx:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"item {i} has {n} tokens, more than a row of {capacity}: truncate to max_len first")
        j = bisect.bisect_left(free, (n, -1))
        if j == len(free):
            rows.append([i])
            space, r = capacity - n, len(rows) - 1
        else:
            space, r = free.pop(j)
            rows[r].append(i)
            space -= n
        if space > 0:
            bisect.insort(free, (space, r))
    return rows


def epoch_rows(lengths: Sequence[int], max_len: int, seed: int, epoch: int) -> list[list[int]]:
    """The packed rows of one epoch (lists of example indices), in the order they are trained on."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(lengths), generator=g).tolist()
    rows = best_fit_decreasing(lengths, max_len, order)
    return [rows[i] for i in torch.randperm(len(rows), generator=g).tolist()]


def fill(rows: Sequence[Sequence[int]], lengths: Sequence[int], max_len: int) -> float:
    """The share of the rows' max_len slots that hold a token of an example."""
    return sum(lengths[i] for row in rows for i in row) / (len(rows) * max_len)


def collate_packed(rows: Sequence[Sequence[Example]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Lay each row's examples end to end, padded on the right to the longest row.

    Returns input_ids, labels (-100 on padding) and position_ids, each (R, T); position ids restart
    at 0 at every example (and at the padding), which is how the model and the loss see the boundaries.
    """
    if not rows or not all(rows):
        raise ValueError("collate_packed needs at least one row, each of at least one example")
    T = max(sum(len(e.input_ids) for e in row) for row in rows)
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), T), dtype=torch.long)
    for r, row in enumerate(rows):
        t = 0
        for e in row:
            n = len(e.input_ids)
            input_ids[r, t:t + n] = torch.tensor(e.input_ids)
            labels[r, t:t + n] = torch.tensor(e.labels)
            position_ids[r, t:t + n] = torch.arange(n)
            t += n
        position_ids[r, t:] = torch.arange(T - t)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
