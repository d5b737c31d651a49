"""Direct preference optimisation (Rafailov et al. 2023): learn from pairs of completions, one preferred.

For a prompt x, a chosen completion y_c and a rejected one y_r, π the policy (the model with the
adapter being trained) and π_ref the reference, with log-ratios

    ρ_c = log π(y_c | x) − log π_ref(y_c | x)        ρ_r = log π(y_r | x) − log π_ref(y_r | x)

    sigmoid (DPO):  loss = −log σ(β (ρ_c − ρ_r))
    ipo (Azar et al. 2023):  loss = (ρ_c / |y_c| − ρ_r / |y_r| − 1 / (2β))²     |y|: the completion's tokens

(IPO divided by the lengths as TRL's `DPOTrainer` does.) `sft_weight` w adds w times the mean negative
log-likelihood of the chosen completions' tokens (TRL's loss_type=[..., "sft"], loss_weights=[1, w]; RPO):
DPO alone may lower the likelihood of the chosen answer as long as it lowers the rejected one's more,
and this term holds it up. The implicit rewards are β ρ_c and β ρ_r; TRL's
metrics follow from them: rewards/chosen, rewards/rejected, their margin, the share of pairs whose
chosen reward is the higher (accuracies), and the policy's log-probabilities logps/chosen, logps/rejected.

With LoRA the reference is no second model: it is the model before training, which the adapter
switched off (`reference="base"`) or the starting adapter (`reference="start"`, e.g. an SFT adapter
trained further) gives. Its log-probabilities are computed once, before the first step, and kept with
the pairs (and in every checkpoint), so a DPO step runs one forward pass of one model over the chosen
and rejected rows together: about an SFT step on twice the rows.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lora import adapters_disabled

from .logps import sequence_logps
from .objective import Objective, step_means
from .preference import PreferencePair, preference_batch, preference_pairs
from .validation import evaluating

LOSS_TYPES = ("sigmoid", "ipo")
REFERENCES = ("start", "base")
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")


def dpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
             ref_rejected_logps: torch.Tensor, beta: float = 0.1, loss_type: str = "sigmoid",
             chosen_lengths: torch.Tensor | None = None, rejected_lengths: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO's loss of each pair and its implicit rewards: (losses, chosen_rewards, rejected_rewards), each (B,).

    The four log-probabilities (B,) are sums over each completion's tokens; `ipo` also needs the
    completions' token counts (B,) for its length normalisation. The rewards β (log π − log π_ref) are
    detached: they are what TRL logs, not part of the gradient.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if not beta > 0:
        raise ValueError(f"beta must be positive, got {beta}")
    chosen_ratio = chosen_logps - ref_chosen_logps                         # ρ_c (B,)
    rejected_ratio = rejected_logps - ref_rejected_logps                   # ρ_r (B,)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    else:
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("loss_type='ipo' divides each log-ratio by its completion's tokens: pass chosen_lengths "
                             "and rejected_lengths")
        delta = chosen_ratio / chosen_lengths.clamp(min=1) - rejected_ratio / rejected_lengths.clamp(min=1)
        losses = (delta - 1 / (2 * beta)) ** 2
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


class PreferenceLoss(nn.Module):
    """The model with DPO's loss as its forward: steps 1 and 2 of a DPO step, in one module for DDP.

    forward(input_ids, labels, lengths, ref_logps, sft_scale=None): rows (2B, T) as `preference_batch`
    lays them out (the B chosen rows, then the B rejected), one pass through the model and the fused head;
    returns the loss summed over the B pairs. With `sft_weight`, each pair also carries its share of the
    chosen tokens' mean negative log-likelihood: sft_weight · sft_scale · (−log π(y_c)), sft_scale being
    the step's pairs over its chosen tokens. The sums of TRL's metrics accumulate in `totals` (`take_totals`).
    """

    def __init__(self, model: nn.Module, beta: float, loss_type: str, sft_weight: float = 0.0):
        super().__init__()
        self.model, self.beta, self.loss_type, self.sft_weight = model, beta, loss_type, sft_weight
        self.totals = torch.zeros(len(METRICS) + 1, dtype=torch.float64)   # the metrics' sums, and the pairs

    def forward(self, input_ids, labels, lengths, ref_logps, sft_scale=None):
        logps = sequence_logps(self.model, input_ids, labels)                # (2B,): one forward for both
        chosen, rejected = logps.chunk(2)
        ref_chosen, ref_rejected = ref_logps.chunk(2)
        len_chosen, len_rejected = lengths.chunk(2)
        losses, r_chosen, r_rejected = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, self.beta,
                                                self.loss_type, len_chosen, len_rejected)
        stats = torch.stack([r_chosen.sum(), r_rejected.sum(), (r_chosen > r_rejected).float().sum(),
                             (r_chosen - r_rejected).sum(), chosen.detach().sum(), rejected.detach().sum(),
                             torch.tensor(float(len(chosen)), device=chosen.device)])
        self.totals = self.totals.to(stats.device) + stats.double()
        if self.sft_weight:
            return losses.sum() - self.sft_weight * sft_scale * chosen.sum()
        return losses.sum()

    def take_totals(self) -> torch.Tensor:
        totals, self.totals = self.totals, torch.zeros_like(self.totals)
        return totals


def reference_logps(model: nn.Module, pairs: list[PreferencePair], reference: str, batch_size: int = 8,
                    pad_id: int = 0, device=None) -> torch.Tensor:
    """(n, 2) log π_ref(chosen), log π_ref(rejected) of each pair, the model in eval mode: the adapter as
    it is (`"start"`) or switched off (`"base"`).

    Computed through the very path a training step's forward takes (the fused LoRA projections and head
    run where a gradient is wanted, so it is wanted here and thrown away): at the first step the policy
    is its reference to the last bit, and every log-ratio is exactly 0, as in TRL."""
    if reference not in REFERENCES:
        raise ValueError(f"reference must be one of {REFERENCES}, got {reference!r}")
    out = []
    with evaluating(model), adapters_disabled(model) if reference == "base" else nullcontext(), torch.enable_grad():
        for i in range(0, len(pairs), batch_size):
            batch = preference_batch(pairs[i:i + batch_size], pad_id)
            logps = sequence_logps(model, batch["input_ids"].to(device), batch["labels"].to(device)).detach()
            out.append(torch.stack(logps.float().cpu().chunk(2), dim=1))         # (b, 2)
    return torch.cat(out) if out else torch.zeros(0, 2)


@dataclass
class DPO(Objective):
    """`train(..., objective=DPO(beta=0.1))`: the items are preference rows (train/preference.py).

    beta: how far the policy may move from the reference (a larger β keeps it closer); loss_type:
    "sigmoid" (DPO) or "ipo"; reference: "start" (the model as training starts, its adapter frozen at
    those values: a fresh adapter, B = 0, is the base exactly) or "base" (the adapter switched off);
    sft_weight: the weight of the chosen tokens' negative log-likelihood added to the loss (0: none).
    batch_size counts pairs (2 rows each).
    """

    beta: float = 0.1
    loss_type: str = "sigmoid"
    reference: str = "start"
    sft_weight: float = 0.0
    name: ClassVar[str] = "dpo"
    items: ClassVar[str] = "preference rows {'prompt', 'chosen', 'rejected'} or PreferencePairs"

    def __post_init__(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"DPO.loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if self.reference not in REFERENCES:
            raise ValueError(f"DPO.reference must be one of {REFERENCES}, got {self.reference!r}")
        if not self.beta > 0 or self.sft_weight < 0:
            raise ValueError(f"DPO.beta must be positive and sft_weight at least 0, got {self.beta}, {self.sft_weight}")
        self.ref: dict[str, torch.Tensor] = {}
        self.loss: PreferenceLoss | None = None

    def summary(self):
        return {"objective": self.name, "dpo_beta": self.beta, "dpo_loss_type": self.loss_type,
                "dpo_reference": self.reference, "dpo_sft_weight": self.sft_weight}

    def units(self, tokenizer, items, config, split):
        return preference_pairs(tokenizer, items, config.max_len, config.add_eos,
                                "train_items" if split == "train" else "val_items"), 0

    def loss_module(self, model):
        self.loss = PreferenceLoss(model, self.beta, self.loss_type, self.sft_weight)
        return self.loss

    def begin(self, run, saved):
        """The reference's log-probabilities of every pair the run will use, once: from the checkpoint when
        resuming (the starting adapter is gone by then), else from the model as it is now. Only the pairs
        the run's steps train on are read (a max_steps short of an epoch leaves the rest, kept as NaN and
        never looked up); every validation pair is."""
        used = run.plan.examples_used(run.total_steps)
        if saved is not None and "dpo_reference_logps" in saved:
            self.ref = dict(saved["dpo_reference_logps"])
            missing = [i for i in used if self.ref["train"][i].isnan().any()]
            if missing:  # a resumed run with more steps than the one that saved the checkpoint
                raise ValueError(f"the checkpoint holds the reference log-probabilities of the pairs its run's steps "
                                 f"used; {len(missing)} more pairs that this run of {run.total_steps} steps trains on "
                                 "have none, and the model they came from is gone: resume with the saved run's max_steps")
            return
        self.ref["train"] = torch.full((len(run.examples), 2), float("nan"))
        self.ref["train"][used] = reference_logps(run.model, [run.examples[i] for i in used], self.reference,
                                                  run.config.batch_size, run.pad_id, run.ctx.device)
        self.ref["val"] = reference_logps(run.model, run.val_examples, self.reference, run.config.batch_size,
                                          run.pad_id, run.ctx.device)

    def _batch(self, run, pairs_idx: list[int], split: str, sft_scale: float) -> dict[str, torch.Tensor]:
        pairs = run.examples if split == "train" else run.val_examples
        batch = preference_batch([pairs[i] for i in pairs_idx], run.pad_id)
        ref = self.ref[split][pairs_idx]                                       # (b, 2)
        batch["ref_logps"] = torch.cat([ref[:, 0], ref[:, 1]])                 # chosen rows, then rejected
        if self.sft_weight:
            batch["sft_scale"] = torch.tensor(sft_scale)
        return {k: v.to(run.ctx.device, non_blocking=True) for k, v in batch.items()}

    def batches(self, run, micro_rows, step):
        ctx = run.ctx
        n_pairs = sum(len(mb) for mb in micro_rows)
        scale = n_pairs / sum(len(run.examples[row[0]].chosen_ids) for mb in micro_rows for row in mb)
        micro_batches = [self._batch(run, [row[0] for row in mb[ctx.rank::ctx.world_size]], "train", scale)
                         for mb in micro_rows]
        n_tokens = sum(len(run.examples[row[0]].prompt_ids) * 2 + len(run.examples[row[0]].chosen_ids)
                       + len(run.examples[row[0]].rejected_ids) for mb in micro_rows for row in mb)
        return micro_batches, n_pairs, n_tokens

    def metrics(self, run):
        return step_means(self.loss.take_totals(), METRICS, run.ctx)

    @torch.no_grad()
    def validate(self, run):
        ctx, model = run.ctx, run.model
        self.loss.take_totals()
        shard = list(range(len(run.val_examples)))[ctx.rank::ctx.world_size]
        scale = len(run.val_examples) / sum(len(p.chosen_ids) for p in run.val_examples)
        loss_sum = torch.zeros((), dtype=torch.float64)
        with evaluating(model):
            for i in range(0, len(shard), run.config.batch_size):
                with run.autocast():
                    batch = self._batch(run, shard[i:i + run.config.batch_size], "val", scale)
                    loss_sum += self.loss(**batch).double().cpu()
        metrics = step_means(torch.cat([loss_sum[None], self.loss.take_totals().cpu()]), ("loss", *METRICS), ctx)
        return metrics.pop("loss"), metrics

    def state_dict(self):
        return {"dpo_reference_logps": dict(self.ref)}
