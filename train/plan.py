"""The data plan: which rows each optimizer step trains on, a function of (seed, step) alone.

Resuming at step s must find exactly the batches an uninterrupted run would: the order of an epoch
comes from `epoch_batches` (train/data.py) or, packed, `epoch_rows` (train/packing.py), both seeded
by (seed, epoch) only, and step s takes micro-batches k·grad_accum ... (k+1)·grad_accum - 1 of its epoch.
"""
from __future__ import annotations

import warnings

import torch

from .config import TrainConfig
from .data import Example, collate, epoch_batches
from .packing import collate_packed, epoch_rows


class DataPlan:
    """Which examples each optimizer step uses: a function of (seed, step) alone, so resuming is exact.

    A micro-batch is `batch_size` rows; a row is one example, or with `packing` whole examples
    filling max_len tokens (train/packing.py), their number the same every epoch.
    """

    def __init__(self, examples: list[Example], config: TrainConfig, world_size: int = 1, pad_id: int = 0):
        self.examples, self.config, self.world_size, self.pad_id = examples, config, world_size, pad_id
        self.lengths = [len(e.input_ids) for e in examples]
        n = len(epoch_rows(self.lengths, config.max_len, config.seed, 0)) if config.packing else len(examples)
        bs, w, what = config.batch_size, world_size, "packed rows" if config.packing else "examples"
        if bs < w:  # every micro-batch would be dropped below (each rank needs a row): no step could run
            raise ValueError(f"TrainConfig.batch_size is {bs}, fewer than the {w} processes: a micro-batch is split "
                             f"across the processes and each needs at least one row; set batch_size to {w} or more")
        sizes = [bs] * (n // bs) + ([n % bs] if n % bs else [])   # the micro-batches of an epoch, as cut below
        n_micro = sum(self._kept(size) for size in sizes)
        if n % bs and not self._kept(n % bs):
            warnings.warn(f"{n % bs} {what} of each epoch are left out: a micro-batch needs at least one row per rank ({w})")
        if n_micro == 0:
            raise ValueError(f"{n} training {what} cannot fill one micro-batch with a row for each of {w} processes")
        self.steps_per_epoch = -(-n_micro // config.grad_accum)
        self._epoch, self._batches = None, None

    def _micro_batches(self, epoch: int) -> list[list[list[int]]]:
        c = self.config
        if c.packing:
            rows = epoch_rows(self.lengths, c.max_len, c.seed, epoch)
            batches = [rows[i:i + c.batch_size] for i in range(0, len(rows), c.batch_size)]
        else:
            batches = [[[i] for i in b] for b in epoch_batches(self.lengths, c.batch_size, c.seed, epoch, c.group_by_length)]
        return [b for b in batches if self._kept(len(b))]

    def _kept(self, size: int) -> bool:
        """Whether a micro-batch of `size` rows is trained on: under DDP every rank needs a row of it."""
        return size >= self.world_size

    def step_batches(self, step: int) -> list[list[list[int]]]:
        """The micro-batches of 0-based optimizer step `step`: lists of rows, each a list of example indices."""
        epoch, k = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._batches, self._epoch = self._micro_batches(epoch), epoch
        ga = self.config.grad_accum
        return self._batches[k * ga:(k + 1) * ga]

    def examples_used(self, total_steps: int) -> list[int]:
        """The indices of the examples that steps 0 .. total_steps - 1 train on, sorted (max_steps may end a
        run before an epoch has used them all)."""
        return sorted({i for step in range(total_steps) for rows in self.step_batches(step)
                       for row in rows for i in row})

    def collate(self, rows: list[list[int]]) -> dict[str, torch.Tensor]:
        """Rows as tensors: input_ids and labels, and position_ids when packed."""
        if self.config.packing:
            return collate_packed([[self.examples[i] for i in row] for row in rows], self.pad_id)
        batch = collate([self.examples[row[0]] for row in rows], self.pad_id)
        return {"input_ids": batch["input_ids"], "labels": batch["labels"]}  # right padding: the loss needs no mask
