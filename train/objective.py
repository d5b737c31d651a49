"""What a way of fine-tuning changes in the loop: its data, its step 2, what it logs.

The loop (train/loop.py) is the same four steps for every method: 1 forward, 2 loss, 3 backward,
4 AdamW step, with accumulation, clipping, the cosine schedule, checkpoints and exact resume around
them. An `Objective` fills in what differs:

    SFT   (here)           units: Examples (prompt + answer, labels on the answer)
                           step 2: cross-entropy of the answer tokens, a mean over the step's answer tokens
    DPO   (train/dpo.py)   units: preference pairs, the reference's log-probabilities computed once
                           step 2: DPO's loss of each pair from the policy's log-probabilities, a mean over pairs
    GRPO  (train/grpo.py)  units: prompts; a sampling step before step 1 draws G completions of each
                           step 2: the clipped policy-gradient loss, a mean over the completion tokens

`loss_module(model)` is an nn.Module whose forward is steps 1 and 2 (DDP must see the forward),
returning the loss summed over the units of its micro-batch; `batches` says what the step's loss is a
mean over (`n_items`), so k accumulated micro-batches on any number of ranks make one step's gradient.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import nn

from .data import as_examples, collate
from .distributed import all_reduce_sum
from .fsdp import even_eval_batches
from .loss import AnswerLossModule
from .validation import eval_batches, loss_totals

if TYPE_CHECKING:  # the loop's Run, for the type hints only
    from .loop import Run


class Objective(ABC):
    """The hooks the loop calls: each method defines `units`, `loss_module` and `batches`; the other hooks'
    defaults are those every method shares."""

    name = "objective"
    items = "training items"                # what train() takes, as its errors say

    def summary(self) -> dict[str, Any]:
        """Its settings, for the run's hyperparameter table."""
        return {"objective": self.name}

    @abstractmethod
    def units(self, tokenizer, items: Sequence, config, split: str) -> tuple[list, int]:
        """The items as the units `DataPlan` orders (each with `.input_ids`): (units, number left out).
        `split` ("train" or "val") names the items in errors."""

    @abstractmethod
    def loss_module(self, model: nn.Module) -> nn.Module:
        """The module whose forward(**batch) is steps 1 and 2: the loss summed over its micro-batch."""

    def begin(self, run: "Run", saved: dict | None) -> None:
        """Before the first step (or the first after resuming from `saved`, a checkpoint's state)."""

    @abstractmethod
    def batches(self, run: "Run", micro_rows: list[list[list[int]]], step: int) -> tuple[list[dict], int, int]:
        """The step's micro-batches on the device (this rank's rows), what the loss is a mean over
        (all ranks), and the tokens they hold."""

    def metrics(self, run: "Run") -> dict[str, float]:
        """What the step logs besides its loss (means over the step, all ranks); read once a step."""
        return {}

    def validate(self, run: "Run") -> tuple[float | None, dict[str, float]]:
        """The validation loss (None: the method has none) and metrics, over every rank's share."""
        return None, {}

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps besides the loop's state, for `begin(run, saved)` on resume."""
        return {}


class SFT(Objective):
    """Supervised fine-tuning: cross-entropy on the answer tokens (labels -100 on the prompt)."""

    name = "sft"
    items = "(prompt, answer) string pairs or Examples"

    def units(self, tokenizer, items, config, split):
        return as_examples(tokenizer, items, config.max_len, config.add_eos)

    def loss_module(self, model):
        return AnswerLossModule(model)

    def batches(self, run, micro_rows, step):
        ctx = run.ctx
        step_examples = [run.examples[i] for mb in micro_rows for row in mb for i in row]
        n_answer_tokens = sum(e.n_answer_tokens for e in step_examples)
        n_tokens = sum(len(e.input_ids) for e in step_examples)
        micro_batches = [{k: v.to(ctx.device, non_blocking=True) for k, v in run.plan.collate(mb[ctx.rank::ctx.world_size]).items()}
                         for mb in micro_rows]  # each rank its share of the rows
        return micro_batches, n_answer_tokens, n_tokens

    def validate(self, run):
        config, ctx = run.config, run.ctx
        batches = eval_batches(run.val_examples[ctx.rank::ctx.world_size], config.batch_size, run.pad_id)
        if config.parallel == "fsdp":  # every forward is a collective: the same count on every rank
            batches = even_eval_batches(batches, ctx, collate(run.val_examples[:1], run.pad_id))
        total, count = loss_totals(run.loss_module, batches, ctx.device, run.autocast) if batches else (0.0, 0)
        if config.parallel == "fsdp":  # the root stays gathered after a forward without backward: free it
            run.loss_module.reshard()
        t = all_reduce_sum(torch.tensor([total, float(count)], dtype=torch.float64, device=ctx.device), ctx)
        return t[0].item() / max(t[1].item(), 1.0), {}


def step_means(totals: torch.Tensor, names: Sequence[str], ctx) -> dict[str, float]:
    """{name: sum over every rank / count}: `totals` (k + 1,) holds k sums and, last, what they count."""
    t = all_reduce_sum(totals.detach().double().to(ctx.device), ctx)
    return {name: (t[i] / t[-1].clamp(min=1.0)).item() for i, name in enumerate(names)}
