"""Group relative policy optimisation (Shao et al. 2024): learn from rewards of the model's own answers.

Each step first samples G completions of each prompt from the current policy (train/rollout.py), scores
them with the reward functions, and compares each completion with its own group:

    advantage_i = (r_i − mean(r_group)) / (std(r_group) + 1e-4)     std with Bessel's correction, as TRL's
                  scale_rewards="none" leaves the division out (Dr. GRPO), "batch" divides by the whole batch's std

Then, for every completion token t with log-probability log π(t) under the policy, log π_old(t) at
sampling time and log π_ref(t) under the reference:

    ratio = exp(log π(t) − log π_old(t))        k3 = exp(log π_ref − log π) − (log π_ref − log π) − 1
    loss_t = −min(ratio · A, clip(ratio, 1 − ε, 1 + ε_high) · A)  +  β · ratio · k3

(k3, Schulman's estimator of KL(π ‖ π_ref), times the ratio: its gradient is then the unbiased
reverse-KL gradient, as TRL's default use_bias_correction_kl), summed over the step's completion
tokens and divided by their number (TRL's default "dapo"
normalisation: every token of the step weighs the same, whatever its completion's length). The
sampler and the learner are one model: the samples are drawn with the adapter the step is about to
update, so π_old is π at this step (the ratio is 1 and only its gradient, A ∇log π, moves the adapter;
the clip bites when old log-probabilities come from elsewhere). β = 0 (the default, as TRL's) needs no
reference; β > 0 takes it from the adapter switched off ("base") or its values at the start ("start").
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, ClassVar, Sequence

import torch
from torch import nn

from lora import adapters_disabled, load_lora_state_dict, lora_state_dict

from .distributed import all_reduce_sum
from .logps import token_logps
from .objective import Objective, step_means
from .preference import completion_batch
from .rollout import prompt_rows, sample_completions, score
from .validation import evaluating

SCALES = ("group", "batch", "none")
REFERENCES = ("base", "start")


def grpo_advantages(rewards: torch.Tensor, group_size: int, scale_rewards: str = "group") -> torch.Tensor:
    """(B·G,) rewards, each prompt's G completions together -> (B·G,) advantages, as TRL's GRPOTrainer."""
    if scale_rewards not in SCALES:
        raise ValueError(f"scale_rewards must be one of {SCALES}, got {scale_rewards!r}")
    if group_size < 2 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not form groups of group_size={group_size} (at least 2)")
    groups = rewards.view(-1, group_size)                                  # (B, G)
    advantages = groups - groups.mean(dim=1, keepdim=True)                 # r − mean of its group
    if scale_rewards == "group":
        advantages = advantages / (groups.std(dim=1, keepdim=True) + 1e-4)
    elif scale_rewards == "batch":
        advantages = advantages / (rewards.std() + 1e-4)
    return advantages.flatten()


def grpo_loss(logps: torch.Tensor, advantages: torch.Tensor, old_logps: torch.Tensor | None = None,
              ref_logps: torch.Tensor | None = None, beta: float = 0.0, epsilon: float = 0.2,
              epsilon_high: float | None = None) -> torch.Tensor:
    """(N,) per-token losses from (N,) log-probabilities and each token's advantage (the module docstring's
    formula). old_logps None: on-policy, π_old = π detached (the ratio is 1, its gradient ∇log π)."""
    old = logps.detach() if old_logps is None else old_logps
    ratio = torch.exp(logps - old)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + (epsilon if epsilon_high is None else epsilon_high))
    losses = -torch.min(ratio * advantages, clipped * advantages)
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta > 0 adds the KL to the reference: pass ref_logps")
        d = ref_logps - logps
        losses = losses + beta * (torch.exp(d) - d - 1) * ratio
    return losses


class PolicyGradientLoss(nn.Module):
    """The model with GRPO's loss as its forward: steps 1 and 2 of a GRPO step, in one module for DDP.

    forward(input_ids, labels, advantages, ref_logps=None, old_logps=None): (R, T) prompt + completion rows
    with labels on the completions, (R,) advantages, (N,) log-probabilities of the N completion tokens
    under the reference and at sampling time (None: on-policy, the loop's case); returns the loss summed
    over the tokens. `totals` gathers the KL's sum and the tokens clipped.
    """

    def __init__(self, model: nn.Module, temperature: float, beta: float, epsilon: float, epsilon_high: float | None):
        super().__init__()
        self.model, self.temperature = model, temperature
        self.beta, self.epsilon, self.epsilon_high = beta, epsilon, epsilon_high
        self.totals = torch.zeros(2, dtype=torch.float64)                  # the KL's sum, the tokens

    def forward(self, input_ids, labels, advantages, ref_logps=None, old_logps=None):
        logps, rows = token_logps(self.model, input_ids, labels, self.temperature)   # (N,) one forward
        losses = grpo_loss(logps, advantages[rows], old_logps, ref_logps, self.beta, self.epsilon, self.epsilon_high)
        if ref_logps is not None:  # the KL's sum and its tokens, kept on the device: no sync in the step
            d = (ref_logps - logps).detach()
            stats = torch.stack([(torch.exp(d) - d - 1).sum().double(), torch.tensor(float(len(rows)), device=d.device,
                                                                                      dtype=torch.float64)])
            self.totals = self.totals.to(d.device) + stats
        return losses.sum()

    def take_totals(self) -> torch.Tensor:
        totals, self.totals = self.totals, torch.zeros_like(self.totals)
        return totals


@contextmanager
def adapter_values(model: nn.Module, values: dict[str, torch.Tensor]):
    """Within the block the adapter holds `values` (a `lora_state_dict`); its own are back after."""
    now = {k: v.clone() for k, v in lora_state_dict(model).items()}
    load_lora_state_dict(model, values)
    try:
        yield model
    finally:
        load_lora_state_dict(model, now)


@dataclass
class GRPO(Objective):
    """`train(..., objective=GRPO(rewards=[f], group_size=4))`: the items are prompt rows (train/rollout.py).

    batch_size counts prompts, each answered group_size times; max_new_tokens bounds a completion;
    temperature and top_p shape the sampling (the log-probabilities are taken at the same temperature);
    beta weighs the KL to the reference ("base": the adapter switched off, "start": its values when the
    run began); epsilon (epsilon_high) bound the ratio's clip.
    """

    rewards: Sequence[Callable] | Callable = ()
    group_size: int = 4
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    scale_rewards: str = "group"
    beta: float = 0.0
    epsilon: float = 0.2
    epsilon_high: float | None = None
    reference: str = "base"
    name: ClassVar[str] = "grpo"
    items: ClassVar[str] = "prompt rows {'prompt', ...fields} or PromptRows"
    METRICS: ClassVar[tuple[str, ...]] = ("reward", "reward_std", "completions/mean_length")

    def __post_init__(self) -> None:
        self.rewards = [self.rewards] if callable(self.rewards) else list(self.rewards)
        if not self.rewards or not all(callable(f) for f in self.rewards):
            raise ValueError("GRPO needs rewards: one or more functions reward(prompt, completion, **row) -> float")
        if self.group_size < 2:
            raise ValueError(f"GRPO.group_size must be at least 2 (a group compares its completions), got {self.group_size}")
        if self.scale_rewards not in SCALES or self.reference not in REFERENCES:
            raise ValueError(f"GRPO: scale_rewards must be one of {SCALES} and reference one of {REFERENCES}")
        if self.max_new_tokens < 1 or not self.temperature > 0:
            raise ValueError("GRPO: max_new_tokens must be at least 1 and temperature positive")
        self.tokenizer, self.loss, self.start_values, self.sampled = None, None, None, torch.zeros(4)

    def summary(self):
        return {"objective": self.name, "grpo_group_size": self.group_size, "grpo_max_new_tokens": self.max_new_tokens,
                "grpo_temperature": self.temperature, "grpo_beta": self.beta, "grpo_epsilon": self.epsilon,
                "grpo_scale_rewards": self.scale_rewards}

    def units(self, tokenizer, items, config, split):
        self.tokenizer = tokenizer
        return prompt_rows(tokenizer, items, config.max_len, self.max_new_tokens,
                           "train_items" if split == "train" else "val_items"), 0

    def loss_module(self, model):
        self.loss = PolicyGradientLoss(model, self.temperature, self.beta, self.epsilon, self.epsilon_high)
        return self.loss

    def begin(self, run, saved):
        if self.beta != 0.0 and self.reference == "start":  # the adapter's values at the start, kept for resuming
            start = (saved or {}).get("grpo_start_adapter")
            self.start_values = start if start is not None else {
                k: v.clone().cpu() for k, v in lora_state_dict(run.model).items()}

    def _eos_ids(self, model) -> list[int]:
        eos = model.config.eos_token_id
        ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        return sorted({*ids, *([self.tokenizer.eos_id] if self.tokenizer.eos_id is not None else [])})

    def text(self, completion: list[int]) -> str:
        """What a reward reads: the completion's text without special tokens (its end-of-sequence
        token and any other), as TRL decodes it."""
        return self.tokenizer.decode(completion, skip_special_tokens=True)

    def rollout(self, model, rows, generator, pad_id) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The sampling step for some prompts: their batch (with advantages, and the reference's token
        log-probabilities when β > 0) and the completions' rewards (B·G,)."""
        completions = sample_completions(model, rows, self.group_size, self.max_new_tokens, self._eos_ids(model),
                                         pad_id, self.temperature, self.top_p, generator)
        rewards = torch.tensor([score(self.rewards, rows[i // self.group_size], self.text(c))
                                for i, c in enumerate(completions)], dtype=torch.float32)
        batch = completion_batch([(rows[i // self.group_size].input_ids, c) for i, c in enumerate(completions)], pad_id)
        batch["advantages"] = grpo_advantages(rewards, self.group_size, self.scale_rewards)
        if self.beta != 0.0:
            batch["ref_logps"] = self.reference_logps(model, batch)
        return batch, rewards

    @torch.no_grad()
    def reference_logps(self, model, batch) -> torch.Tensor:
        device = model.model.embed_tokens.weight.device
        switch = adapters_disabled(model) if self.reference == "base" else adapter_values(model, self.start_values)
        with evaluating(model), switch:
            return token_logps(model, batch["input_ids"].to(device), batch["labels"].to(device), self.temperature)[0]

    def batches(self, run, micro_rows, step):
        ctx = run.ctx
        # the step's draws, from (seed, step, rank) alone: a resumed run samples the same completions
        generator = torch.Generator(device=ctx.device).manual_seed(
            (run.config.seed * 1_000_003 + step) * max(ctx.world_size, 1) + ctx.rank)
        policy = run.model  # the learner itself: the adapter as the last step left it
        micro_batches, stats, n_tokens = [], torch.zeros(4, dtype=torch.float64), 0
        for mb in micro_rows:
            rows = [run.examples[row[0]] for row in mb[ctx.rank::ctx.world_size]]
            batch, rewards = self.rollout(policy, rows, generator, run.pad_id)
            n_completion = int((batch["labels"][:, 1:] != -100).sum())
            n_tokens += int(batch["labels"].numel())
            stats += torch.tensor([rewards.sum().item(), rewards.view(-1, self.group_size).std(1).sum().item()
                                   * self.group_size, n_completion, len(rewards)], dtype=torch.float64)
            micro_batches.append({k: v.to(ctx.device, non_blocking=True) for k, v in batch.items()})
        self.sampled = stats  # the rewards' sum, their groups' std (× G), completion tokens, completions
        n_items = int(all_reduce_sum(stats[2:3].to(ctx.device), ctx).item())  # completion tokens, all ranks
        return micro_batches, n_items, n_tokens

    def metrics(self, run):
        out = step_means(self.sampled, self.METRICS, run.ctx)
        kl = step_means(self.loss.take_totals(), ("kl",), run.ctx)      # the KL's sum, the tokens
        return {**out, **kl} if self.beta != 0.0 else out

    @torch.no_grad()
    def validate(self, run):
        """The mean reward of G completions of each validation prompt, drawn from one fixed stream."""
        ctx, total = run.ctx, torch.zeros(2, dtype=torch.float64)  # the rewards' sum, the completions
        generator = torch.Generator(device=ctx.device).manual_seed(run.config.seed * 1_000_003 - 1 - ctx.rank)
        shard = run.val_examples[ctx.rank::ctx.world_size]
        for i in range(0, len(shard), run.config.batch_size):
            completions = sample_completions(run.model, shard[i:i + run.config.batch_size], self.group_size,
                                             self.max_new_tokens, self._eos_ids(run.model), run.pad_id,
                                             self.temperature, self.top_p, generator)
            total += torch.tensor([sum(score(self.rewards, shard[i + j // self.group_size], self.text(c))
                                       for j, c in enumerate(completions)), len(completions)], dtype=torch.float64)
        return None, step_means(total, ("reward",), ctx)

    def state_dict(self):
        return {"grpo_start_adapter": self.start_values} if self.start_values is not None else {}
