"""The seed's order of the items: held-out test, validation, then training; and what an adapter records
of it, so that scoring it later sees only items it never trained on.

    split = split_items(loaded.items, seed=0, test_size=200, val_size=64)    # the demo's split
    record = split_record(None, "four-cs", 0, 200, 64, len(split.train))      # -> save_adapter(split=...)
    items, rest = held_out(loaded.items, 200, None, record)                 # its 200 test diamonds
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass

from lora import read_trained_on

from .data import Item


@dataclass
class Split:
    train: list[Item]
    val: list[Item]
    test: list[Item]


def shuffled(items: list[Item], seed: int) -> list[Item]:
    """The items in the seed's order: the same seed gives the same order on every machine."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    return [items[i] for i in order]


def split_items(items: list[Item], seed: int, test_size: int, val_size: int,
                train_size: int | None = None) -> Split:
    """Shuffle with `seed`, then test = the first `test_size`, validation = the next `val_size`,
    train = the rest (its first `train_size` when given).

    The test items come first, so the same seed and test size give the same test set whatever
    the other sizes; a larger test set (eval_pricer's --n) extends into the validation items,
    which training never learns from.
    """
    for name, value in (("test_size", test_size), ("val_size", val_size)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    rest = len(items) - test_size - val_size
    if rest <= 0:
        raise ValueError(f"{len(items):,} items leave none to train on after test_size={test_size:,} "
                         f"and val_size={val_size:,}; lower them")
    if train_size is not None and not 0 < train_size <= rest:
        raise ValueError(f"train_size={train_size:,} but only {rest:,} items remain after the test and "
                         f"validation splits")
    order = shuffled(items, seed)
    test, val = order[:test_size], order[test_size:test_size + val_size]
    train = order[test_size + val_size:]
    return Split(train[:train_size] if train_size else train, val, test)


def split_record(data: str | None, description: str, seed: int, test_size: int, val_size: int,
                 train_size: int) -> dict:
    """What an adapter trained on, for its `trained_on.json` (lora.save_adapter's `split`): the data, the
    seed of its order and the sizes of `split_items`' three parts."""
    return {"data": _data_name(data), "description": description, "seed": seed, "test_size": test_size,
            "val_size": val_size, "train_size": train_size}


def _data_name(data: str | None) -> str:
    """'diamonds' for the embedded data, else the file's absolute path."""
    return "diamonds" if data in (None, "diamonds") else os.path.abspath(data)


def held_out(items: list[Item], n: int, seed: int | None, split: dict | None, source: str = "the adapter",
             data: str | None = None) -> tuple[list[Item], list[Item]]:
    """(the first `n` items of the seed's order, which training never saw; the rest of that order).

    With the adapter's recorded `split` the seed is its own: `seed` (a --seed flag) that disagrees with it
    is an error, and so is an `n` reaching past its test and validation items into the ones it trained
    on, or other data than it trained on. Without a record (a base model, an older adapter) `seed`
    alone decides (0, the demo's, when None).
    """
    if split is None:
        order = shuffled(items, 0 if seed is None else seed)
        return order[:n], order[n:]
    if seed is not None and seed != split["seed"]:
        raise ValueError(f"--seed {seed}: {source} was trained on the split of seed {split['seed']}; another "
                         f"seed's first {n} items include diamonds it trained on (leave --seed out)")
    if data is not None and _data_name(data) != split.get("data", "diamonds"):
        raise ValueError(f"--data {data}: {source} was trained on {split.get('data')}")
    unseen = split["test_size"] + split["val_size"]
    if n > unseen:
        raise ValueError(f"--n {n}: {source} never saw only the first {unseen} items of seed {split['seed']} "
                         f"(its {split['test_size']} test and {split['val_size']} validation items); the rest "
                         f"include the {split['train_size']:,} it trained on")
    order = shuffled(items, split["seed"])
    return order[:n], order[n:]


def adapter_split(adapter_dir: str, seed: int) -> dict | None:
    """The split an adapter trained on (its trained_on.json), to train it further on the same one: None for
    an adapter without a record; ValueError when `seed` is not the split's seed."""
    recorded = (read_trained_on(adapter_dir) or {}).get("split")
    if recorded and recorded["seed"] != seed:
        raise ValueError(f"--seed {seed}: {adapter_dir} was trained on the split of seed {recorded['seed']} "
                         f"(pass --seed {recorded['seed']})")
    return recorded
