"""Validation: the mean cross-entropy per answer token over held-out data, the model in eval mode."""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Iterable, Iterator

import torch
from torch import nn

from .data import Example, as_examples, collate
from .loss import AnswerLossModule, answer_loss, answer_positions, unwrap


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """The model in eval mode within the block (no dropout: validation, reference log-probabilities,
    sampling), back in the mode it was in after, whatever happens."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@torch.no_grad()
def loss_totals(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], device, autocast) -> tuple[float, int]:
    """(summed answer-token loss, number of answer tokens) over the batches, the model in eval mode."""
    model = unwrap(model)  # the model, or the AnswerLossModule around it (FSDP runs the pair as one)
    loss_sum = model if isinstance(model, AnswerLossModule) else (
        lambda i, l, position_ids: answer_loss(model, i, l, reduction="sum", position_ids=position_ids))
    total, count = 0.0, 0
    with evaluating(model):
        for batch in batches:
            input_ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
            position_ids = batch["position_ids"].to(device) if "position_ids" in batch else None
            with autocast():
                total += loss_sum(input_ids, labels, position_ids=position_ids).item()
            count += int(answer_positions(labels, position_ids).sum())
    return total, count


def evaluate(model: nn.Module, batches_or_items, tokenizer=None, batch_size: int = 8, max_len: int | None = None,
             device: str | torch.device | None = None, autocast_dtype: torch.dtype | None = None,
             add_eos: bool = True) -> float:
    """Mean cross-entropy per answer token over a validation set.

    `batches_or_items`: (prompt, answer) string pairs (then `tokenizer` is required) or `Example`s
    (e.g. `chat_example`'s), or batch dicts with input_ids and labels (B, T) as `collate` makes them
    (and position_ids, packed rows as `collate_packed` makes them).
    """
    data = list(batches_or_items)
    if not data:
        raise ValueError("evaluate got no data: pass (prompt, answer) pairs or collated batches")
    device = device if device is not None else next(unwrap(model).parameters()).device
    if isinstance(data[0], dict):
        batches = data
    else:
        if tokenizer is None and not all(isinstance(x, Example) for x in data):
            raise ValueError("evaluate needs a tokenizer to turn (prompt, answer) pairs into token ids")
        examples, _ = as_examples(tokenizer, data, max_len, add_eos)
        batches = eval_batches(examples, batch_size, pad_id_of(tokenizer))
    total, count = loss_totals(model, batches, device, autocast_context(device, autocast_dtype))
    if count == 0:
        raise ValueError("evaluate: no answer tokens in the data")
    return total / count


def eval_batches(examples: list[Example], batch_size: int, pad_id: int) -> list[dict[str, torch.Tensor]]:
    ordered = sorted(examples, key=lambda e: len(e.input_ids))  # similar lengths together: little padding
    return [collate(ordered[i:i + batch_size], pad_id) for i in range(0, len(ordered), batch_size)]


def pad_id_of(tokenizer) -> int:
    for name in ("pad_id", "eos_id"):
        value = getattr(tokenizer, name, None)
        if value is not None and value >= 0:
            return value
    return 0  # never attended by a real token nor labelled: any id will do


def autocast_context(device, dtype: torch.dtype | None):
    if dtype is None:
        return nullcontext
    return lambda: torch.autocast(device_type=torch.device(device).type, dtype=dtype)
