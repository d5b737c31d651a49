"""From (prompt, answer) string pairs to padded batches of token ids with answer-only labels.

    prompt tokens   answer tokens  EOS   padding
    [BOS How ... $] [1 2 3 . 0 0]  [</s>] [pad pad]     input_ids
    [-100 ...  -100][1 2 3 . 0 0]  [</s>] [-100 -100]   labels (aligned with input_ids; the loss shifts them)

The prompt and the answer are tokenized separately, so the prompt's tokens are exactly those the
model sees at inference time, when it continues the prompt alone.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch.utils.data import Sampler

IGNORE_INDEX = -100  # the label of every position the loss skips (prompt and padding)


@dataclass
class Example:
    """One tokenized training item: `labels[i]` is `input_ids[i]` on the answer, -100 elsewhere."""

    input_ids: list[int]
    labels: list[int]

    @property
    def n_answer_tokens(self) -> int:
        # labels are shifted inside the loss, so position 0 never counts
        return sum(1 for y in self.labels[1:] if y != IGNORE_INDEX)

    def cut(self, max_len: int | None) -> "Example":
        """Its first `max_len` tokens (the end is cut, labels with it); itself when it fits or max_len is None.
        The one place an Example is cut to a length: chat_example, load_chat_jsonl and train() all call it."""
        if max_len is None or len(self.input_ids) <= max_len:
            return self
        return Example(self.input_ids[:max_len], self.labels[:max_len])


def build_examples(
    tokenizer, items: Sequence[tuple[str, str]], max_len: int | None = None, add_eos: bool = True
) -> tuple[list[Example], int]:
    """Tokenize (prompt, answer) pairs into `Example`s; returns (examples, number skipped).

    `tokenizer.encode(text, bos=...)` gives the ids; the prompt starts with BOS, the answer ends with
    EOS when `add_eos`. With `max_len`, the prompt is cut from the left so the whole answer fits.
    An empty answer with `add_eos` keeps its EOS and trains on it (stop right after the prompt);
    an item left with no answer token (an empty answer without `add_eos`, or an answer with its
    EOS longer than max_len - 1) is skipped and counted, with a warning, rather than trained on
    a truncated answer.
    """
    if max_len is not None and max_len < 2:
        raise ValueError(f"max_len must be at least 2 (one prompt token and one answer token), got {max_len}")
    items = list(items)
    examples, skipped = [], 0
    for i, item in enumerate(items):
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and all(isinstance(s, str) for s in item)):
            raise ValueError(f"item {i} must be a (prompt, answer) pair of strings, got {item!r:.80}")
        prompt, answer = item
        prompt_ids = list(tokenizer.encode(prompt, bos=True))
        answer_ids = list(tokenizer.encode(answer, bos=False)) if answer else []
        if add_eos and tokenizer.eos_id is not None:
            answer_ids.append(tokenizer.eos_id)
        if max_len is not None:
            if len(answer_ids) > max_len - 1:
                answer_ids = []          # the answer does not fit whole: skip the item
            prompt_ids = prompt_ids[-(max_len - len(answer_ids)):]
        if not answer_ids or not prompt_ids:
            skipped += 1
            continue
        examples.append(Example(prompt_ids + answer_ids, [IGNORE_INDEX] * len(prompt_ids) + answer_ids))
    if skipped:
        warnings.warn(
            f"{skipped} of {len(items)} items have no answer token to train on"
            + (f" within max_len={max_len}" if max_len is not None else "")
            + " and were skipped",
            stacklevel=2,
        )
    return examples, skipped


def as_examples(tokenizer, items: Sequence, max_len: int | None = None, add_eos: bool = True) -> tuple[list[Example], int]:
    """Training items as `Example`s; returns (examples, number skipped).

    (prompt, answer) pairs go through `build_examples`; `Example`s (e.g. from `train.chat_example`)
    are already tokenized and are kept as they are, cut to their first `max_len` tokens. An Example
    left with no label to learn is skipped and counted, with a warning, as a pair would be.
    """
    items = list(items)
    ready = [x for x in items if isinstance(x, Example)]
    if not ready:
        return build_examples(tokenizer, items, max_len, add_eos)
    pairs = [x for x in items if not isinstance(x, Example)]
    examples, skipped = build_examples(tokenizer, pairs, max_len, add_eos) if pairs else ([], 0)
    ready = [e.cut(max_len) for e in ready]
    kept = [e for e in ready if e.n_answer_tokens > 0]
    if len(kept) < len(ready):
        warnings.warn(f"{len(ready) - len(kept)} of {len(ready)} examples have no label to learn"
                      + (f" within max_len={max_len}" if max_len is not None else "") + " and were skipped",
                      stacklevel=2)
    return examples + kept, skipped + len(ready) - len(kept)


def collate(examples: Sequence[Example], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Pad a list of examples on the right to the longest row of this batch.

    Returns input_ids (B, T), labels (B, T) with -100 on padding, attention_mask (B, T) of 1/0.
    Right padding leaves every real token's causal context untouched, so the model may ignore the
    mask (and keep the fused causal attention): padding is never attended by a real token.
    """
    if not examples:
        raise ValueError("collate got an empty list of examples")
    T = max(len(e.input_ids) for e in examples)
    B = len(examples)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    for b, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[b, :n] = torch.tensor(e.input_ids)
        labels[b, :n] = torch.tensor(e.labels)
        attention_mask[b, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def epoch_batches(
    lengths: Sequence[int], batch_size: int, seed: int, epoch: int, group_by_length: bool = False
) -> list[list[int]]:
    """The micro-batches of one epoch as lists of example indices; every index exactly once.

    The order is a function of (seed, epoch) only, so a resumed run finds the same batches. With
    `group_by_length`, the shuffled indices are cut into mega-batches of 50 batches, each sorted
    by length and split into batches (rows of similar length, little padding), and the batches are
    shuffled again so the lengths do not drift through the epoch.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(lengths), generator=g).tolist()
    if not group_by_length:
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    mega = batch_size * 50
    batches = []
    for start in range(0, len(order), mega):
        chunk = sorted(order[start:start + mega], key=lambda i: -lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]


class LengthBucketSampler(Sampler[list[int]]):
    """A batch sampler for `torch.utils.data.DataLoader(batch_sampler=...)` over `epoch_batches`.

    Call `set_epoch(e)` before each epoch, as with `DistributedSampler`.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 42, group_by_length: bool = True):
        self.lengths, self.batch_size, self.seed, self.group_by_length = list(lengths), batch_size, seed, group_by_length
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        return iter(epoch_batches(self.lengths, self.batch_size, self.seed, self.epoch, self.group_by_length))

    def __len__(self) -> int:
        return -(-len(self.lengths) // self.batch_size)
